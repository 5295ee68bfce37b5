"""``pretrain-reuse --help``, ``--version`` and a usage error import no heavy library (torch takes
seconds to import): the verbs import what they use. Each case runs in a fresh interpreter, since
this one has imported torch already."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pretrain_reuse import cli

#: Libraries only a verb's work needs (``ot`` is POT).
HEAVY = ("torch", "torchvision", "timm", "transformers", "kornia", "faiss", "ot", "shapiq",
         "matplotlib", "scipy", "pandas")


def _imported(importtime_log: str) -> set[str]:
    """Top-level packages in the ``-X importtime`` log (stderr)."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in importtime_log.splitlines() if line.startswith("import time:") and "|" in line}


@pytest.mark.parametrize("argv, status", [
    (["--help"], 0),
    (["--version"], 0),
    (["select", "--help"], 0),
    (["finetune", "--help"], 0),
    (["select", "--no-such-flag"], 2),
    ([], 2),
])
def test_help_version_and_usage_errors_import_no_heavy_library(argv, status):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pretrain_reuse", *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert _imported(proc.stderr).isdisjoint(HEAVY), sorted(_imported(proc.stderr) & set(HEAVY))


def test_building_the_parser_and_its_help_pages_imports_no_heavy_library():
    code = ("import sys; from pretrain_reuse import cli; cli.build_parser(); cli.help_pages(); "
            f"print(sorted(set({HEAVY!r}) & {{m.split('.')[0] for m in sys.modules}}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_the_parsers_method_and_metric_names_are_the_registries():
    from pretrain_reuse.selection import SELECTORS
    from pretrain_reuse.transport import METRICS

    assert tuple(SELECTORS) == cli.SELECT_METHODS
    assert tuple(METRICS) == cli.METRIC_NAMES


def test_the_run_script_keeps_the_callers_directory_for_relative_paths(tmp_path):
    # ./run changed into the repository, so `--data data/x` from elsewhere was "not found" and a
    # relative --out landed in the repository
    from pathlib import Path

    import numpy as np

    root = Path(__file__).resolve().parents[1]
    venv = root / ".venv"
    if not (venv / "bin" / "pretrain-reuse").exists() or \
            (root / "pyproject.toml").stat().st_mtime > (venv / ".installed").stat().st_mtime:
        pytest.skip("./run would first set up .venv (minutes)")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "s.npy", rng.standard_normal((6, 4)).astype(np.float32))
    np.save(tmp_path / "t.npy", rng.standard_normal((2, 4)).astype(np.float32))
    proc = subprocess.run([str(root / "run"), "select", "--source", "s.npy", "--target", "t.npy",
                           "--k", "2", "--out", "sel.json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "sel.json").is_file() and not (root / "sel.json").exists()
