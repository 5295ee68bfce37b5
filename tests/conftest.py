"""Test-wide settings: one torch thread.

The models in the tests are tiny; a second OpenMP thread buys little on 2 cores and, when the
machine is shared, makes every operation several times slower. Subprocesses inherit it through
OMP_NUM_THREADS.
"""

import contextlib
import io
import json
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")  # figures are written to files, never shown
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """One ``pretrain-reuse demo --quick`` run shared by the tests that inspect its outputs."""
    from pretrain_reuse.cli import main

    out = tmp_path_factory.mktemp("demo") / "run"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    return out, json.loads((out / "summary.json").read_text()), stdout.getvalue()
