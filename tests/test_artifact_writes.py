"""How outputs land on disk: file modes follow the umask like a plain ``open``, a file output
pointed at a folder is refused before anything is written, an output folder that holds another
command's output is refused naming what it holds, and an embed of a list whose paths are all
missing (or of images none of which can be read) fails in one line and leaves no store.

Regression tests of review findings: ``.safetensors`` outputs were 0600 (safetensors replaces the
temporary file with its own 0600 one), ``select --out <folder>`` ended in a traceback, such an
embed left a 0-row store that a fixed rerun then refused, and ``finetune --out`` took a demo's or
an experiment's folder for a run of its own and replaced its run.json.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import pretrain_reuse
from pretrain_reuse.artifacts import atomic_path
from pretrain_reuse.cli import main
from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.features import FeatureStore
from test_embed import FILES, assert_one_line_error, cli, embed_ok, write_image

UMASK = 0o022


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def plain_file_mode(folder: Path) -> int:
    """The mode ``open(path, "w")`` gives under the current umask (the reference)."""
    path = folder / "plain.txt"
    with open(path, "w") as fh:
        fh.write("x")
    mode = mode_of(path)
    path.unlink()
    return mode


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def umask_022():
    old = os.umask(UMASK)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def features(tmp_path) -> Path:
    """Labelled per-sample features (.npy) of 4 classes, and target prototypes."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "feats.npy", rng.standard_normal((20, 8)).astype(np.float32))
    np.save(tmp_path / "labels.npy", np.repeat(np.arange(4), 5))
    np.save(tmp_path / "T.npy", rng.standard_normal((2, 8)).astype(np.float32))
    return tmp_path


def write_images(root: Path, names: list[str]) -> None:
    for i, (name, (_, _, size, mode)) in enumerate(zip(names, FILES, strict=False)):
        write_image(root / name, size, mode, i)


# --------------------------------------------------------------------------------------------
# File modes
# --------------------------------------------------------------------------------------------


def test_units_and_selection_written_by_the_cli_are_readable_by_others(capsys, features, umask_022):
    out = features / "out"
    rc, _, err = cli(capsys, "units", "--features", features / "feats.npy", "--labels",
                     features / "labels.npy", "--out", out / "u.safetensors")
    assert rc == 0, err
    rc, _, err = cli(capsys, "select", "--source", out / "u.safetensors", "--target",
                     features / "T.npy", "--k", "2", "--out", out / "sel.json")
    assert rc == 0, err
    assert mode_of(out / "u.safetensors") == 0o644 == plain_file_mode(out)
    assert mode_of(out / "sel.json") == 0o644


def test_embedded_feature_store_shards_and_index_are_readable_by_others(tmp_path, capsys,
                                                                        umask_022):
    write_images(tmp_path / "data" / "ant", ["a0.png", "a1.png"])
    store = tmp_path / "store"
    embed_ok(capsys, "--model", "smallcnn-s", "--data", tmp_path / "data", "--shard-size", 1,
             "--out", store)
    written = sorted(p for p in store.rglob("*") if p.is_file())
    assert [p.name for p in written] == ["embed.json", "index.json", "shard-00000.safetensors",
                                         "shard-00001.safetensors"]
    assert {p.name: mode_of(p) for p in written} == {p.name: 0o644 for p in written}


def test_saved_feature_store_shards_are_readable_by_others(tmp_path, umask_022):
    store = FeatureStore(features=np.ones((3, 4), np.float32), ids=["a", "b", "c"])
    path = store.save(tmp_path / "store")
    assert mode_of(path) == 0o755
    assert {p.name: mode_of(p) for p in path.iterdir()} == {
        "index.json": 0o644, "shard-00000.safetensors": 0o644}


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002], ids=oct)
def test_atomic_safetensors_file_gets_the_mode_of_a_plain_file_under_any_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "x.safetensors") as tmp:
            save_file({"a": np.zeros(3, np.float32)}, str(tmp))  # replaces tmp with a 0600 file
        expected = plain_file_mode(tmp_path)
    finally:
        os.umask(old)
    assert expected == 0o666 & ~umask
    assert mode_of(tmp_path / "x.safetensors") == expected
    assert files_under(tmp_path) == {"x.safetensors"}


# --------------------------------------------------------------------------------------------
# A file output that is an existing folder
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["select", "units"])
def test_file_output_that_is_a_folder_exits_2_in_one_line_and_writes_nothing(capsys, features,
                                                                             verb):
    folder = features / "feats" / ("tgt" if verb == "select" else "u.safetensors")
    folder.mkdir(parents=True)
    before = files_under(features)
    if verb == "select":
        argv = ["select", "--source", features / "T.npy", "--target", features / "T.npy",
                "--k", "1", "--out", folder]
    else:
        argv = ["units", "--features", features / "feats.npy", "--labels",
                features / "labels.npy", "--out", folder]
    rc, out, err = cli(capsys, *argv)
    assert_one_line_error(rc, err, repr(str(folder)), "is a folder", "pass a file path")
    assert ".tmp" not in err and out == ""
    assert files_under(features) == before  # no output and no temporary file, in or beside it


@pytest.mark.parametrize("verb", ["select", "units"])
def test_output_over_another_kind_of_file_exits_2_and_keeps_it(capsys, features, verb):
    """A mistyped --out must not replace a model, a result or data with units or a selection;
    the same kind of artifact is replaced (a rerun)."""
    victim = features / ("result.json" if verb == "select" else "model.safetensors")
    if verb == "select":
        victim.write_text('{"kind": "finetune-result"}')
        argv = ["select", "--source", features / "T.npy", "--target", features / "T.npy",
                "--k", "1", "--out", victim]
    else:
        save_file({"w": np.zeros(3, np.float32)}, str(victim), metadata={"artifact": "backbone"})
        argv = ["units", "--features", features / "feats.npy", "--labels",
                features / "labels.npy", "--out", victim]
    before = victim.read_bytes()
    rc, _, err = cli(capsys, *argv)
    assert_one_line_error(rc, err, repr(str(victim)), "exists and is not a")
    assert victim.read_bytes() == before
    again = features / ("sel.json" if verb == "select" else "u.safetensors")
    argv[argv.index(victim)] = again
    for _ in range(2):  # written, then replaced by the same kind
        rc, _, err = cli(capsys, *argv)
        assert rc == 0, err


# --------------------------------------------------------------------------------------------
# An output folder that holds another command's output
# --------------------------------------------------------------------------------------------

FINETUNE = ["finetune", "--model", "smallcnn-s", "--target", "synthetic:target", "--batch-size", 8,
            "--max-steps", 2, "--quiet"]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    """The folder of a finished fine-tuning run."""
    out = tmp_path_factory.mktemp("finetuned") / "run"
    assert main([str(a) for a in (*FINETUNE, "--out", out)]) == 0
    return out


@pytest.mark.parametrize("kind,holds", [("demo-run", "a demo run"),
                                        ("experiment-run", "an experiment")])
def test_finetune_into_a_demo_or_experiment_folder_exits_2_and_keeps_it(tmp_path, capsys, kind,
                                                                        holds):
    # its run.json was taken for that of a fine-tuning run stopped before its first checkpoint:
    # the run replaced it, and the demo or experiment then refused its own folder
    out = tmp_path / "folder"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"kind": kind, "params": {"seed": 0}}))
    (out / "timing.json").write_text("{}")
    before = snapshot(out)
    rc, _, err = cli(capsys, *FINETUNE, "--out", out)
    assert_one_line_error(rc, err, repr(str(out)), f"holds {holds}, not a fine-tuning run;",
                          "pass a new or empty folder")
    assert snapshot(out) == before


@pytest.mark.parametrize("argv,what", [
    (["demo", "--quick", "--quiet"], "a demo run"),
    (["experiment", "table1", "--model", "smallcnn", "--source", "synthetic:pretrain", "--target",
      "synthetic:target", "--seeds", "0", "--quiet"], "an experiment"),
])
def test_demo_or_experiment_into_a_fine_tuning_run_names_what_the_folder_holds(finetuned, capsys,
                                                                               argv, what):
    # it said the folder held a demo run made with other settings (lambda, plan, quick, ...)
    before = snapshot(finetuned)
    rc, _, err = cli(capsys, *argv, "--out", finetuned)
    assert_one_line_error(rc, err, repr(str(finetuned)), f"holds a fine-tuning run, not {what};")
    assert "settings" not in err and snapshot(finetuned) == before


GRID = [*FINETUNE, "--grid", "lr=0.01,0.1"]


@pytest.mark.parametrize("folder,holds", [("store", "a FeatureStore"),
                                          ("finetuned", "a fine-tuning run")])
def test_grid_search_into_another_commands_folder_exits_2_and_keeps_it(tmp_path, capsys, finetuned,
                                                                       folder, holds):
    # the grid wrote its runs, grid.csv and grid.json beside the files there
    out = finetuned if folder == "finetuned" else FeatureStore(
        features=np.ones((3, 4), np.float32), ids=["a", "b", "c"]).save(tmp_path / "store")
    before = snapshot(out)
    rc, _, err = cli(capsys, *GRID, "--out", out)
    assert_one_line_error(rc, err, repr(str(out)), f"holds {holds}, not a grid search;")
    assert snapshot(out) == before


def test_a_grid_folder_is_resumed_by_its_grid_and_named_to_a_single_run_and_load(tmp_path, capsys):
    out = tmp_path / "grid"
    rc, _, err = cli(capsys, *GRID, "--out", out)
    assert rc == 0, err
    with pytest.raises(PretrainReuseError, match="is a grid search, a folder of fine-tuning runs"):
        pretrain_reuse.load(out)  # it said "a folder without index.json, not a FeatureStore"
    runs = {tag: snapshot(out / tag) for tag in ("lr=0.01", "lr=0.1")}
    rows = json.loads((out / "grid.json").read_text())["rows"]
    rc, _, err = cli(capsys, *FINETUNE, "--out", out)
    assert_one_line_error(rc, err, "holds a grid search, not a fine-tuning run;")
    # a rerun finds every run finished and trains none again, also in the folder of a version
    # that wrote no marker for the grid
    for before_the_marker in (False, True):
        if before_the_marker:
            (out / "run.json").unlink()
        rc, _, err = cli(capsys, *GRID, "--out", out)
        assert rc == 0, err
        assert {tag: snapshot(out / tag) for tag in runs} == runs
        assert json.loads((out / "grid.json").read_text())["rows"] == rows


# --------------------------------------------------------------------------------------------
# embed of a list whose images are missing or unreadable
# --------------------------------------------------------------------------------------------


def test_embed_of_a_list_whose_paths_are_all_missing_exits_2_and_leaves_no_store(tmp_path, capsys):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "list.csv").write_text("path,label\nimgs/a.png,cat\nimgs/b.png,dog\nimgs/c.png,dog\n")
    write_images(tmp_path / "imgs", ["a.png", "b.png", "c.png"])  # beside the list's folder
    out = tmp_path / "feats"
    rc, _, err = cli(capsys, "embed", "--model", "smallcnn-s", "--data", lists / "list.csv",
                     "--out", out)
    assert_one_line_error(rc, err, "'imgs/a.png'", str(lists / "imgs" / "a.png"), "3 of 3",
                          "relative to the list file's folder")
    assert "features is empty" not in err
    assert not out.exists()
    # the fixed list then embeds into the same --out (nothing stale there to refuse it)
    (lists / "list.csv").write_text("path,label\n../imgs/a.png,cat\n../imgs/b.png,dog\n"
                                    "../imgs/c.png,dog\n")
    store = embed_ok(capsys, "--model", "smallcnn-s", "--data", lists / "list.csv", "--out", out)
    assert store.ids == ["../imgs/a.png", "../imgs/b.png", "../imgs/c.png"]


def test_embed_of_images_none_of_which_can_be_read_exits_2_and_leaves_no_store(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "imgs" / name).write_bytes(b"not an image")
    (tmp_path / "list.csv").write_text("imgs/a.png\nimgs/b.png\nimgs/gone.png\n")
    out = tmp_path / "feats"
    rc, _, err = cli(capsys, "embed", "--model", "smallcnn-s", "--data", tmp_path / "list.csv",
                     "--out", out)
    assert_one_line_error(rc, err, "none of its 3 images can be read", "'imgs/a.png'")
    assert not out.exists()


def test_embed_of_a_list_with_some_paths_missing_skips_and_reports_them(tmp_path, capsys):
    # documented in file_list: missing paths among existing ones are skipped like corrupt images
    write_images(tmp_path / "imgs", ["a.png", "b.png"])
    (tmp_path / "list.csv").write_text("imgs/a.png,0\nimgs/gone.png,1\nimgs/b.png,1\n")
    rc, out, err = cli(capsys, "embed", "--quiet", "--model", "smallcnn-s", "--data",
                       tmp_path / "list.csv", "--out", tmp_path / "feats")
    assert rc == 0, err
    assert "skipped 1 unreadable" in out
    store = FeatureStore.load(tmp_path / "feats")
    assert store.ids == ["imgs/a.png", "imgs/b.png"] and store.labels.tolist() == [0, 1]
    assert store.meta["skipped_ids"] == ["imgs/gone.png"]


# --------------------------------------------------------------------------------------------
# Temporary files a killed process leaves behind
# --------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def _temp(folder: Path, name: str, pid: int) -> Path:
    from pretrain_reuse.artifacts import _host_tag

    path = folder / f".{name}.{_host_tag()}-{pid}.0123456789abcdef.tmp"
    path.write_bytes(b"half a file")
    return path


def test_a_run_folder_a_kill_left_a_marker_temp_in_resumes_and_loses_the_temp(tmp_path):
    from pretrain_reuse.artifacts import claim_folder

    # killed while writing its marker: the folder holds only that half-written temporary file
    out = tmp_path / "run"
    out.mkdir()
    orphan = _temp(out, "run.json", _dead_pid())
    claim_folder(out, "demo-run", {"seed": 0}, what="a demo run")
    assert sorted(p.name for p in out.iterdir()) == ["run.json"] and not orphan.exists()


def test_temps_of_live_writers_are_kept_and_not_taken_for_foreign_files(tmp_path):
    from pretrain_reuse.artifacts import make_run_folder

    # another rank of this job writing its first file right now
    out = tmp_path / "run"
    out.mkdir()
    live = _temp(out, "split.json", os.getpid())
    assert make_run_folder(out, "a fine-tuning run", "run.json", kind="finetune-run") == out / "run.json"
    assert live.exists()


def test_rewriting_a_file_removes_what_a_killed_write_of_it_left(tmp_path):
    dead = _dead_pid()
    orphan = _temp(tmp_path, "checkpoint.safetensors", dead)
    other = _temp(tmp_path, "model.safetensors", dead)  # another file's: left for its own writer
    legacy = tmp_path / ".checkpoint.safetensors.fedcba9876543210.tmp"  # an earlier version's name
    legacy.write_bytes(b"x")
    with atomic_path(tmp_path / "checkpoint.safetensors") as tmp:
        tmp.write_bytes(b"whole")
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == b"whole"
    assert not orphan.exists() and not legacy.exists() and other.exists()
