"""The ``pretrain-reuse`` command end to end: files in, files out, checked against numpy references.

Most tests call :func:`pretrain_reuse.cli.main` in-process (fast); a few run
``python -m pretrain_reuse`` in a subprocess to check the real exit status and stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.special import logsumexp

from _helpers import colour_folder
from pretrain_reuse import __version__
from pretrain_reuse.artifacts import load
from pretrain_reuse.cli import main
from pretrain_reuse.data.synthetic import feature_world
from pretrain_reuse.features import FeatureStore
from pretrain_reuse.models import create_backbone, save_backbone
from pretrain_reuse.selection import Selection
from pretrain_reuse.units import Units

D = 16
N_SRC = 60
N_TGT = 5
ERROR_PREFIX = "pretrain-reuse: error: "


# --------------------------------------------------------------------------------------------
# Helpers and inputs
# --------------------------------------------------------------------------------------------


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit status, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_ok(capsys, *argv) -> str:
    rc, out, err = cli(capsys, *argv)
    assert rc == 0, err
    return out


def read_sel(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def class_means(features: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Reference class means: plain numpy mean of the raw features of every class."""
    x = features.astype(np.float64)
    return np.stack([x[labels == c].mean(axis=0) for c in range(n)])


def top_k(scores, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-np.asarray(scores), kind="stable")[:k]]


def assert_ranked_prefix(obj: dict) -> None:
    """``selected`` is exactly the head of the ranking by ``scores``, most similar first."""
    scores = np.asarray(obj["scores"])
    sel = obj["selected"]
    assert len(set(sel)) == len(sel)
    assert sel == top_k(scores, len(sel))
    rest = np.setdiff1d(np.arange(len(scores)), sel)
    if len(rest):
        assert scores[sel].min() >= scores[rest].max()
    assert all(np.diff(scores[sel]) <= 0)


@pytest.fixture
def data(tmp_path):
    """Prototype matrices and labelled per-sample features of a source and a target task."""
    rng = np.random.default_rng(0)
    inp = tmp_path / "in"
    inp.mkdir()
    d = SimpleNamespace(root=tmp_path, inp=inp, out=tmp_path / "sel.json")

    # bare prototype matrices
    d.S = rng.standard_normal((N_SRC, D)).astype(np.float32)
    d.T = rng.standard_normal((N_TGT, D)).astype(np.float32)
    np.save(inp / "S.npy", d.S)
    np.save(inp / "T.npy", d.T)

    # per-sample features: classes of unequal sizes, samples shuffled
    centres = 2.0 * rng.standard_normal((N_SRC, D))
    d.src_sizes = rng.integers(3, 12, N_SRC)
    d.src_labels = rng.permutation(np.repeat(np.arange(N_SRC), d.src_sizes))
    d.src_feats = (centres[d.src_labels]
                   + rng.standard_normal((len(d.src_labels), D))).astype(np.float32)
    tgt_centres = centres[[7, 19, 33, 41, 52]] + 0.8 * rng.standard_normal((N_TGT, D))
    d.tgt_sizes = np.array([4, 9, 2, 6, 12])
    d.tgt_labels = rng.permutation(np.repeat(np.arange(N_TGT), d.tgt_sizes))
    d.tgt_feats = (tgt_centres[d.tgt_labels]
                   + rng.standard_normal((len(d.tgt_labels), D))).astype(np.float32)
    np.save(inp / "src_feats.npy", d.src_feats)
    np.save(inp / "src_labels.npy", d.src_labels)
    np.save(inp / "tgt_feats.npy", d.tgt_feats)
    np.save(inp / "tgt_labels.npy", d.tgt_labels)
    # the same class means, computed by hand
    np.save(inp / "src_means.npy", class_means(d.src_feats, d.src_labels, N_SRC).astype(np.float32))
    np.save(inp / "tgt_means.npy", class_means(d.tgt_feats, d.tgt_labels, N_TGT).astype(np.float32))

    d.names = [f"class{i:02d}" for i in range(N_SRC)]
    for i, n in ((5, "hawk"), (17, "owl"), (42, "wren")):
        d.names[i] = n
    (inp / "names.txt").write_text("\n".join(d.names) + "\n")
    return d


def select_args(d, *extra, source=None, target=None):
    return ["select", "--source", source or d.inp / "S.npy", "--target", target or d.inp / "T.npy",
            "--out", d.out, *extra]


# --------------------------------------------------------------------------------------------
# select: the contract
# --------------------------------------------------------------------------------------------


def test_select_uot_writes_top_k_selection_scores_params_and_meta(capsys, data):
    out = run_ok(capsys, *select_args(data, "--k", "10", "--method", "uot", "--metric", "cosine",
                                      "--eps-c", "0.01"))
    obj = read_sel(data.out)
    assert len(obj["selected"]) == 10
    assert all(0 <= u < N_SRC for u in obj["selected"])
    assert len(obj["scores"]) == N_SRC
    assert_ranked_prefix(obj)
    p = obj["params"]
    assert (p["method"], p["metric"], p["eps_c"], p["k"]) == ("uot", "cosine", 0.01, 10)
    assert (p["eps"], p["tau_a"], p["tau_b"]) == (1.0, 1.0, 100.0)  # the paper's defaults
    assert obj["meta"]["version"] == __version__
    assert obj["meta"]["seed"] == 0
    assert obj["meta"]["solver"]["converged"] is True
    assert f"selected 10 of {N_SRC}" in out
    assert {f for f in files_under(data.root) if not f.startswith("in")} == {"sel.json"}


def test_file_suffixes_in_upper_case_are_read_and_written_as_lower_case_ones(capsys, data):
    # files named on Windows or by cameras: S.NPY is the prototype matrix that S.npy is
    upper = data.inp / "UPPER"
    upper.mkdir()
    for name in ("S", "T"):
        shutil.copy(data.inp / f"{name}.npy", upper / f"{name}.NPY")
    run_ok(capsys, *select_args(data, "--k", "10"))
    run_ok(capsys, "select", "--source", upper / "S.NPY", "--target", upper / "T.NPY",
           "--k", "10", "--out", upper / "SEL.JSON")
    assert read_sel(upper / "SEL.JSON")["selected"] == read_sel(data.out)["selected"]
    assert list(load(upper / "SEL.JSON").selected) == read_sel(data.out)["selected"]


def test_a_single_process_verb_under_torchrun_is_refused_before_any_work(capsys, data,
                                                                         monkeypatch):
    # every torchrun process would select into the same file; embed and finetune share the work
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, _, err = cli(capsys, *select_args(data, "--k", "10"))
    assert rc == 2 and err.count("\n") == 1
    assert "select runs in one process, but torchrun started 2" in err
    assert "only embed and finetune" in err and not data.out.exists()
    monkeypatch.setenv("WORLD_SIZE", "1")
    run_ok(capsys, *select_args(data, "--k", "10"))
    assert len(read_sel(data.out)["selected"]) == 10


def numpy_uot_log_row_mass(cost, eps=1.0, tau_a=1.0, tau_b=100.0, iters=2000):
    """Reference: plain log-domain generalised Sinkhorn (Chizat et al. 2018) with unit weights,

    min_P <C,P> + eps KL(P || 1 1^T) + tau_a KL(P 1 || 1) + tau_b KL(P^T 1 || 1); returns log(P 1).
    """
    lam_a, lam_b = tau_a / (tau_a + eps), tau_b / (tau_b + eps)
    f, g = np.zeros(cost.shape[0]), np.zeros(cost.shape[1])
    for _ in range(iters):
        f_new = -lam_a * eps * logsumexp((g[None, :] - cost) / eps, axis=1)
        g_new = -lam_b * eps * logsumexp((f_new[:, None] - cost) / eps, axis=0)
        done = max(abs(f_new - f).max(), abs(g_new - g).max()) < 1e-13
        f, g = f_new, g_new
        if done:
            break
    return f / eps + logsumexp((g[None, :] - cost) / eps, axis=1)


def test_select_uot_scores_are_log_row_masses_of_the_papers_unbalanced_plan(capsys, data):
    run_ok(capsys, *select_args(data, "--k", "10", "--tol", "1e-10"))
    s = data.S.astype(np.float64)
    t = data.T.astype(np.float64)
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    ref = numpy_uot_log_row_mass((1.0 - s @ t.T) / 0.01)  # C = (1 - cos) / eps_c
    np.testing.assert_allclose(read_sel(data.out)["scores"], ref, atol=1e-6)
    assert read_sel(data.out)["selected"] == top_k(ref, 10)


def test_several_targets_in_one_call_select_as_one_call_each(capsys, data):
    # the batched solve (select_many) against the reference: one select per target, each from
    # the reference log-domain iterations above
    inp = data.inp
    np.save(inp / "T2.npy", data.S[[3, 8, 30]] + 0.1)  # a second task, near three source units
    outs = [data.root / "a.json", data.root / "b.json"]
    printed = run_ok(capsys, "select", "--source", inp / "S.npy", "--target", inp / "T.npy",
                     inp / "T2.npy", "--k", "5", "--tol", "1e-10", "--out", *outs)
    s = data.S.astype(np.float64)
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    for target, out in zip((data.T, data.S[[3, 8, 30]] + 0.1), outs, strict=True):
        t = target.astype(np.float64)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        ref = numpy_uot_log_row_mass((1.0 - s @ t.T) / 0.01)
        np.testing.assert_allclose(read_sel(out)["scores"], ref, atol=1e-6)
        assert read_sel(out)["selected"] == top_k(ref, 5)
        assert f"-> {out}; top:" in printed
    assert set(read_sel(outs[1])["selected"][:3]) == {3, 8, 30}


@pytest.mark.parametrize("targets, outs, labels, needle", [
    (2, 1, 0, "got 2 --target and 1 --out; give one output file per target"),
    (2, 2, 1, "got 2 --target and 1 --target-labels; give one labels file per target"),
    (2, "same", 0, "two targets would be written to the same --out"),
])
def test_several_targets_with_other_counts_of_outputs_or_labels_exit_2(capsys, data, targets,
                                                                       outs, labels, needle):
    out_files = ([data.root / "a.json"] * 2 if outs == "same"
                 else [data.root / f"{i}.json" for i in range(outs)])
    argv = ["select", "--source", data.inp / "S.npy", "--target", *[data.inp / "T.npy"] * targets,
            "--out", *out_files]
    if labels:
        argv += ["--target-labels", *[data.inp / "tgt_labels.npy"] * labels]
    rc, _, err = cli(capsys, *argv)
    assert rc == 2 and err.count("\n") == 1 and needle in err
    assert not any(f.exists() for f in out_files)


def test_select_on_labelled_samples_equals_select_on_hand_computed_class_means(capsys, data):
    inp = data.inp
    run_ok(capsys, *select_args(data, "--k", "10", "--source-labels", inp / "src_labels.npy",
                                "--target-labels", inp / "tgt_labels.npy",
                                source=inp / "src_feats.npy", target=inp / "tgt_feats.npy"))
    from_samples = read_sel(data.out)
    out2 = data.root / "sel_means.json"
    run_ok(capsys, "select", "--source", inp / "src_means.npy", "--target", inp / "tgt_means.npy",
           "--k", "10", "--out", out2)
    from_means = read_sel(out2)
    assert from_samples["selected"] == from_means["selected"]
    np.testing.assert_allclose(from_samples["scores"], from_means["scores"], rtol=1e-5, atol=1e-6)
    # unit sizes travel with labelled samples (and are what fractional k needs)
    assert from_samples["counts"] == data.src_sizes.tolist()
    assert "counts" not in from_means


def test_select_on_labelled_samples_shows_the_progress_of_the_class_means_unless_quiet(capsys,
                                                                                      data):
    # at ImageNet's 1.28M x 2048 the means take most of a minute, which was silent
    inp = data.inp
    args = select_args(data, "--k", "10", "--source-labels", inp / "src_labels.npy",
                       source=inp / "src_feats.npy")
    _, _, err = cli(capsys, *args)
    assert "unit means: 100%" in err and f"{len(data.src_labels)}/{len(data.src_labels)}" in err
    rc, _, err = cli(capsys, *args, "--quiet")
    assert rc == 0 and err == ""


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("target_kind", ["matrix", "labelled-samples"])
def test_greedy_ot_scores_match_brute_force_weighted_distances(capsys, data, metric, target_kind):
    if target_kind == "matrix":
        T, w, extra = data.T.astype(np.float64), np.full(N_TGT, 1.0 / N_TGT), []
        target = data.inp / "T.npy"
    else:  # target classes weighted by their share of the target samples
        T = class_means(data.tgt_feats, data.tgt_labels, N_TGT).astype(np.float32).astype(float)
        w = data.tgt_sizes / data.tgt_sizes.sum()
        target, extra = data.inp / "tgt_feats.npy", ["--target-labels", data.inp / "tgt_labels.npy"]
    run_ok(capsys, *select_args(data, "--k", "12", "--method", "greedy-ot", "--metric", metric,
                                *extra, target=target))
    S = data.S.astype(np.float64)
    if metric == "l2":
        dist = np.sqrt(((S[:, None, :] - T[None, :, :]) ** 2).sum(-1))
    else:
        dist = 1.0 - (S @ T.T) / np.outer(np.linalg.norm(S, axis=1), np.linalg.norm(T, axis=1))
    ref = -(dist * w[None, :]).sum(axis=1)
    obj = read_sel(data.out)
    np.testing.assert_allclose(obj["scores"], ref, rtol=1e-9, atol=1e-9)
    assert obj["selected"] == top_k(ref, 12)
    assert_ranked_prefix(obj)


def test_random_selection_is_seeded_valid_and_changes_with_the_seed(capsys, data):
    picks = {}
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = data.root / f"rand_{run}.json"
        run_ok(capsys, "select", "--source", data.inp / "S.npy", "--target", data.inp / "T.npy",
               "--k", "20", "--method", "random", "--seed", seed, "--out", out)
        obj = read_sel(out)
        assert obj["meta"]["seed"] == seed and obj["params"]["seed"] == seed
        picks[run] = obj["selected"]
    for sel in picks.values():
        assert len(sel) == 20 and len(set(sel)) == 20
        assert all(0 <= u < N_SRC for u in sel)
    assert picks["a"] == picks["b"]
    assert picks["a"] != picks["c"]


def test_label_selection_by_ids_keeps_the_given_order(capsys, data):
    run_ok(capsys, *select_args(data, "--k", "3", "--method", "label", "--ids", "4,2,9"))
    assert read_sel(data.out)["selected"] == [4, 2, 9]


def test_label_selection_without_k_keeps_every_named_unit(capsys, data):
    run_ok(capsys, *select_args(data, "--method", "label", "--ids", "4,2,9"))
    assert read_sel(data.out)["selected"] == [4, 2, 9]


@pytest.mark.parametrize("extra,needle", [
    (["--ids", "5"], "--method label"),  # ids without the label method would be ignored
    (["--k", "150%"], "--k 150% is not a share of the pool"),
    (["--method", "random", "--eps", "5", "--tau-b", "3"],
     "--eps, --tau-b would be ignored by --method random"),
    (["--method", "uot", "--seed", "3"], "--seed would be ignored by --method uot"),
    (["--method", "greedy-ot", "--eps-c", "0.1"], "--eps-c would be ignored by --method greedy-ot"),
])
def test_select_options_that_would_be_ignored_or_meaningless_exit_2(capsys, data, extra, needle):
    rc, _, err = cli(capsys, *select_args(data, *extra))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err
    assert not data.out.exists()


def test_label_selection_by_id_ranges_and_recall_of_relevant_ids(capsys, data):
    out = run_ok(capsys, *select_args(data, "--k", "4", "--method", "label", "--ids", "7-9,2",
                                      "--relevant", "8,2,30,31"))
    obj = read_sel(data.out)
    assert obj["selected"] == [7, 8, 9, 2]
    assert obj["meta"]["recall"] == 0.5
    assert "50.00%" in out


def test_label_selection_by_name_pattern_picks_the_matching_class_names(capsys, data):
    run_ok(capsys, *select_args(data, "--k", "3", "--method", "label", "--names",
                                "^(hawk|owl|wren)$", "--class-names", data.inp / "names.txt"))
    obj = read_sel(data.out)
    assert sorted(obj["selected"]) == [5, 17, 42]
    assert obj["selected_names"] == [data.names[u] for u in obj["selected"]]
    assert obj["unit_names"] == data.names


# --------------------------------------------------------------------------------------------
# units, and k as a fraction of samples
# --------------------------------------------------------------------------------------------


def test_units_class_method_gives_numpy_class_means_sizes_and_names(capsys, data):
    inp = data.inp
    out = run_ok(capsys, "units", "--features", inp / "src_feats.npy", "--labels",
                 inp / "src_labels.npy", "--class-names", inp / "names.txt",
                 "--out", data.root / "src.safetensors")
    u = load(data.root / "src.safetensors")
    assert isinstance(u, Units) and u.kind == "class"
    np.testing.assert_allclose(u.prototypes, class_means(data.src_feats, data.src_labels, N_SRC),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(u.counts, data.src_sizes)
    np.testing.assert_array_equal(u.assignment, data.src_labels)
    assert u.names == data.names
    assert u.member_ids(7) == [str(i) for i in np.flatnonzero(data.src_labels == 7)]
    assert u.meta["version"] == __version__
    assert f"wrote {N_SRC} class units" in out


def test_units_class_method_reads_a_feature_store_folder(capsys, data):
    ids = [f"img{i:04d}.jpg" for i in range(len(data.src_labels))]
    FeatureStore(features=data.src_feats, labels=data.src_labels, ids=ids,
                 class_names=data.names).save(data.root / "store", shard_size=100)
    run_ok(capsys, "units", "--features", data.root / "store", "--out",
           data.root / "u.safetensors")
    u = load(data.root / "u.safetensors")
    np.testing.assert_allclose(u.prototypes, class_means(data.src_feats, data.src_labels, N_SRC),
                               rtol=1e-6, atol=1e-6)
    assert u.names == data.names
    assert u.sample_ids == ids
    np.testing.assert_array_equal(u.counts, data.src_sizes)


def _kmeans(capsys, features, out, *extra):
    run_ok(capsys, "units", "--features", features, *extra, "--method", "kmeans", "--k", "8",
           "--n-iter", "8", "--seed", "0", "--quiet", "--out", out)
    return load(out)


def test_units_kmeans_runs_on_the_gpu_only_when_asked(capsys, data, tmp_path, monkeypatch):
    # it went to the GPU whenever torch saw one: other clusters than the CPU's for the same seed,
    # and a CUDA out-of-memory traceback for a pool larger than the GPU's free memory
    import pretrain_reuse.units as units_module

    inp = data.inp
    asked = []
    real = units_module.spherical_kmeans
    monkeypatch.setattr(units_module, "spherical_kmeans",
                        lambda *a, **kw: asked.append(kw["use_gpu"]) or real(*a, **kw))
    _kmeans(capsys, inp / "src_feats.npy", tmp_path / "cpu.safetensors")
    assert asked == [False]
    if not torch.cuda.is_available():
        rc, _, err = cli(capsys, "units", "--features", inp / "src_feats.npy", "--method", "kmeans",
                         "--k", "8", "--device", "cuda", "--out", tmp_path / "gpu.safetensors")
        assert rc == 2 and "torch sees no CUDA GPU; pass use_gpu=False (--device cpu)" in err
        assert not (tmp_path / "gpu.safetensors").exists()
    rc, _, err = cli(capsys, "units", "--features", inp / "src_feats.npy", "--labels",
                     inp / "src_labels.npy", "--device", "cuda", "--out", tmp_path / "c.safetensors")
    assert rc == 2 and "--device applies to --method kmeans only" in err


def test_units_kmeans_is_deterministic_and_prototypes_are_member_means(capsys, data):
    inp = data.inp
    a = _kmeans(capsys, inp / "src_feats.npy", data.root / "a.safetensors")
    b = _kmeans(capsys, inp / "src_feats.npy", data.root / "b.safetensors")
    # a store with labels: k-means reads the features only
    FeatureStore(features=data.src_feats, labels=data.src_labels).save(data.root / "store",
                                                                        shard_size=128)
    c = _kmeans(capsys, data.root / "store", data.root / "c.safetensors")

    assert a.kind == "cluster" and len(a) == 8
    assert a.assignment.shape == (len(data.src_feats),)
    assert (a.counts > 0).all() and a.counts.sum() == len(data.src_feats)
    x = data.src_feats.astype(np.float64)
    ref = np.stack([x[a.assignment == j].mean(axis=0) for j in range(8)])
    np.testing.assert_allclose(a.prototypes, ref, rtol=1e-5, atol=1e-6)
    # every sample sits in the cluster whose (spherical) centre is most cosine-similar
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    centres = np.stack([xn[a.assignment == j].sum(0) for j in range(8)])
    sim = xn @ (centres / np.linalg.norm(centres, axis=1, keepdims=True)).T
    assert (sim[np.arange(len(x)), a.assignment] >= sim.max(axis=1) - 1e-5).mean() > 0.95
    # same features and seed: same clusters, whether from .npy or a labelled store
    for other in (b, c):
        np.testing.assert_array_equal(other.prototypes, a.prototypes)
        np.testing.assert_array_equal(other.assignment, a.assignment)
    assert a.meta["seed"] == 0


def test_fractional_k_on_a_units_file_covers_that_share_of_samples_and_no_more(capsys, data):
    inp = data.inp
    run_ok(capsys, "units", "--features", inp / "src_feats.npy", "--labels",
           inp / "src_labels.npy", "--out", data.root / "src.safetensors")
    run_ok(capsys, "select", "--source", data.root / "src.safetensors", "--target",
           inp / "T.npy", "--k", "0.25", "--out", data.out)
    obj = read_sel(data.out)
    counts = data.src_sizes
    covered = counts[obj["selected"]].sum()
    assert covered >= 0.25 * counts.sum()
    assert covered - counts[obj["selected"][-1]] < 0.25 * counts.sum()
    assert_ranked_prefix(obj)
    assert 1 < len(obj["selected"]) < N_SRC
    # "25%" is the same request
    run_ok(capsys, "select", "--source", data.root / "src.safetensors", "--target",
           inp / "T.npy", "--k", "25%", "--out", data.root / "pct.json")
    assert read_sel(data.root / "pct.json")["selected"] == obj["selected"]


def test_fractional_k_reports_the_share_of_samples_the_selected_units_hold(capsys, data):
    # one large cluster closest to the target: 10% asked, 660 of the 1200 samples taken
    sizes = [660, 100, 100, 100, 120, 120]
    protos = np.random.default_rng(0).normal(size=(6, D))
    Units(prototypes=protos, kind="cluster", assignment=np.repeat(np.arange(6), sizes),
          sample_ids=[str(i) for i in range(sum(sizes))]).save(data.root / "clusters.safetensors")
    np.save(data.root / "near0.npy", protos[:1])
    out = run_ok(capsys, "select", "--source", data.root / "clusters.safetensors", "--target",
                 data.root / "near0.npy", "--k", "10%", "--out", data.out)
    assert read_sel(data.out)["selected"] == [0]
    assert "selected 1 of 6 source units (55.0% of the 1200 source samples; 10% asked) " in out


def test_units_files_on_both_sides_select_like_labelled_samples(capsys, data):
    inp = data.inp
    for side in ("src", "tgt"):
        run_ok(capsys, "units", "--features", inp / f"{side}_feats.npy", "--labels",
               inp / f"{side}_labels.npy", "--out", data.root / f"{side}.safetensors")
    for method in ("uot", "greedy-ot"):
        run_ok(capsys, "select", "--source", data.root / "src.safetensors", "--target",
               data.root / "tgt.safetensors", "--k", "10", "--method", method,
               "--out", data.root / f"units_{method}.json")
        run_ok(capsys, "select", "--source", inp / "src_feats.npy", "--source-labels",
               inp / "src_labels.npy", "--target", inp / "tgt_feats.npy", "--target-labels",
               inp / "tgt_labels.npy", "--k", "10", "--method", method,
               "--out", data.root / f"samples_{method}.json")
        a = read_sel(data.root / f"units_{method}.json")
        b = read_sel(data.root / f"samples_{method}.json")
        assert a["selected"] == b["selected"]
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-12)
        assert a["counts"] == data.src_sizes.tolist()
    # the selected units' members are real sample ids of the source
    u = load(data.root / "src.safetensors")
    sel = load(data.root / "units_uot.json")
    members = [i for unit in sel.selected for i in u.member_ids(unit)]
    assert len(members) == data.src_sizes[sel.selected].sum()


@pytest.fixture(scope="module")
def synthetic_selections(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    related = feature_world().related
    out = {}
    for method in ("uot", "greedy-ot"):
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(["select", "--source", "synthetic-features:pretrain",
                       "--target", "synthetic-features:target",
                       "--k", str(len(related)), "--method", method,
                       "--out", str(root / f"{method}.json")])
        assert rc == 0
        out[method] = read_sel(root / f"{method}.json")
    return related, out


def test_uot_on_the_embedded_synthetic_sets_recovers_every_related_class(synthetic_selections):
    related, sel = synthetic_selections
    obj = sel["uot"]
    assert len(obj["selected"]) == len(related)
    assert len(set(obj["selected"]) & set(related.tolist())) / len(related) == 1.0
    assert all(not n.startswith("hub/") for n in obj["selected_names"])


def test_greedy_ot_on_the_embedded_synthetic_sets_falls_for_the_hubs(synthetic_selections):
    related, sel = synthetic_selections
    obj = sel["greedy-ot"]
    assert len(set(obj["selected"]) & set(related.tolist())) / len(related) < 1.0
    assert any(n.startswith("hub/") for n in obj["selected_names"])


# --------------------------------------------------------------------------------------------
# user errors: exit 2, one line, no traceback, nothing written
# --------------------------------------------------------------------------------------------


def _write_bad_inputs(d) -> None:
    inp = d.inp
    rng = np.random.default_rng(1)
    np.save(inp / "vec.npy", np.ones(D))
    np.save(inp / "T8.npy", np.ones((N_TGT, 8)))
    nan = d.S.copy()
    nan[3, 2] = np.nan
    np.save(inp / "nan.npy", nan)
    nan_feats = d.src_feats.copy()
    nan_feats[11] = np.nan
    np.save(inp / "nan_feats.npy", nan_feats)
    (inp / "junk.safetensors").write_bytes(rng.bytes(600))
    (inp / "junk.npy").write_bytes(rng.bytes(600))
    raw = (inp / "S.npy").read_bytes()
    (inp / "trunc.npy").write_bytes(raw[: len(raw) // 2])
    np.save(inp / "short_labels.npy", d.src_labels[:-1])
    (inp / "few_names.txt").write_text("a\nb\n")
    zero_row = d.S.copy()
    zero_row[4] = 0.0
    np.save(inp / "zero_row.npy", zero_row)
    np.save(inp / "no_columns.npy", np.ones((N_SRC, 0)))
    np.save(inp / "huge.npy", d.S * np.float32(1e20))
    Selection(selected=[0], scores=np.zeros(N_SRC), params={}).save(inp / "a_selection.json")


def _sel(*extra, source="S.npy", target="T.npy"):
    """argv of a select call; file names (``*.npy``, ``*.txt``, ...) are in the input folder."""
    def argv(d):
        def in_inp(x):
            return d.inp / x if x.endswith((".npy", ".txt", ".safetensors", ".json")) else x

        return ["select", "--source", in_inp(source), "--target", in_inp(target),
                "--out", d.out, *map(in_inp, extra)]

    return argv


USER_ERRORS = {
    "missing source file": (_sel("--k", "3", source="nope.npy"), ["nope.npy", "does not exist"]),
    "missing labels file": (_sel("--k", "3", "--source-labels", "nope_labels.npy",
                                 source="src_feats.npy"), ["nope_labels.npy", "does not exist"]),
    "1-d source": (_sel("--k", "3", source="vec.npy"), ["vec.npy", "2-d", "(16,)"]),
    "dimension mismatch": (_sel("--k", "3", target="T8.npy"), ["dimension 16", "8"]),
    "NaN row in source prototypes": (_sel("--k", "3", source="nan.npy"), ["nan", "row 3"]),
    "NaN row in source samples": (_sel("--k", "3", "--source-labels", "src_labels.npy",
                                       source="nan_feats.npy"),
                                  ["--source ", "nan_feats.npy': features row 11 (sample '11') holds NaN"]),
    "all-zero unit with cosine": (_sel("--k", "3", source="zero_row.npy"),
                                  ["source unit 4", "all-zero", "metric l2"]),
    "all-zero unit with cosine greedy-ot": (_sel("--k", "3", "--method", "greedy-ot",
                                                 source="zero_row.npy"), ["source unit 4"]),
    "no feature columns": (_sel("--k", "3", source="no_columns.npy"), ["no columns"]),
    "k above unit count": (_sel("--k", "61"), ["k=61", "60 source units"]),
    "k zero": (_sel("--k", "0"), ["k=0"]),
    "k not a whole number": (_sel("--k", "2.5"), ["k=2.5"]),
    "k not a number": (_sel("--k", "ten"), ["'ten'", "not a number"]),
    "fractional k on bare prototypes": (_sel("--k", "0.25"), ["fraction", "units file"]),
    "whole float k": (_sel("--k", "2.0"), ["a float is a share of the source samples",
                                          "pass the integer 2 for 2 units"]),
    "unknown method": (_sel("--k", "3", "--method", "uto"), ["'uto'", "did you mean 'uot'"]),
    "unknown metric": (_sel("--k", "3", "--metric", "cosin"), ["metric", "did you mean 'cosine'"]),
    "non-positive eps_c": (_sel("--k", "3", "--eps-c", "0"), ["eps_c", "positive"]),
    "UOT beyond float32's range": (_sel("--k", "3", "--eps", "1e-10", "--dtype", "float32"),
                                   ["broke down", "float32", "larger eps (--eps)", "--dtype float64"]),
    # the cause is the cost's scale: the fix named eps only
    "UOT beyond float64's range": (_sel("--k", "3", "--eps-c", "1e-300"),
                                   ["broke down numerically in float64", "eps_c=1e-300",
                                    "larger eps_c (--eps-c"]),
    "infinite tau_a": (_sel("--k", "3", "--tau-a", "inf"), ["tau_a=inf", "scores tie"]),
    "label method without ids": (_sel("--k", "3", "--method", "label"), ["--ids", "--names"]),
    "label id out of range": (_sel("--k", "1", "--method", "label", "--ids", "60"),
                              ["unit id 60", "out of range"]),
    "non-integer unit ids": (_sel("--k", "2", "--method", "label", "--ids", "4,a"),
                             ["--ids", "'4,a'"]),
    "relevant id out of range": (_sel("--k", "2", "--relevant", "3,60"),
                                 ["--relevant id 60 is out of range for the 60 source "
                                  "units; pass ids 0..59"]),
    "names pattern without names": (_sel("--k", "1", "--method", "label", "--names", "owl"),
                                    ["--class-names"]),
    "names pattern matching nothing": (_sel("--k", "1", "--method", "label", "--names", "zzz",
                                            "--class-names", "names.txt"),
                                       ["'zzz' (--names) matches none of the unit names (",
                                        "a regular expression searched in each name"]),
    "class names of the wrong length": (_sel("--k", "3", "--class-names", "few_names.txt"),
                                        ["--class-names has 2 lines", "60 units"]),
    "corrupt safetensors units": (_sel("--k", "3", source="junk.safetensors"),
                                  ["junk.safetensors", "corrupt"]),
    "corrupt npy": (_sel("--k", "3", source="junk.npy"), ["junk.npy", "not a readable .npy"]),
    "truncated npy": (_sel("--k", "3", source="trunc.npy"), ["trunc.npy", "not a readable .npy"]),
    "truncated npy samples": (_sel("--k", "3", "--source-labels", "src_labels.npy",
                                   source="trunc.npy"), ["trunc.npy", "not a readable .npy"]),
    "labels length mismatch": (_sel("--k", "3", "--source-labels", "short_labels.npy",
                                    source="src_feats.npy"),
                               ["labels must be a vector", "one per feature row"]),
    "labels for a units file": (_sel("--k", "3", "--source-labels", "src_labels.npy",
                                     source="junk.safetensors"), ["labels", ".npy features only"]),
    "unknown flag": (_sel("--k", "3", "--bogus"), ["unrecognized arguments: --bogus"]),
    "unknown verb": (lambda d: ["selcet", "--out", d.out], ["selcet"]),
    "missing required flag": (lambda d: ["select", "--source", d.inp / "S.npy", "--out", d.out],
                              ["--target"]),
    "cuda on a CPU machine": (_sel("--k", "3", "--device", "cuda"), ["cuda", "no cuda gpu"]),
    "unknown synthetic set": (_sel("--k", "3", source="synthetic-features:pretrian"),
                              ["synthetic-features:pretrian",
                               "did you mean 'synthetic-features:pretrain'"]),
    "image data set as units": (_sel("--k", "3", source="synthetic:pretrain"),
                                ["image data set", "embed it first"]),
    "units without labels for class means": (
        lambda d: ["units", "--features", d.inp / "src_feats.npy", "--out", d.root / "u.safetensors"],
        ["labels"]),
    "units class means with k-means flags": (
        lambda d: ["units", "--features", d.inp / "src_feats.npy", "--labels",
                   d.inp / "src_labels.npy", "--k", "7", "--seed", "9", "--out", d.root / "u.safetensors"],
        ["--k, --seed apply to --method kmeans only"]),
    "units kmeans without k": (
        lambda d: ["units", "--features", d.inp / "src_feats.npy", "--method", "kmeans",
                   "--out", d.root / "u.safetensors"], ["--k"]),
    "units kmeans with more clusters than samples": (
        lambda d: ["units", "--features", d.inp / "src_feats.npy", "--method", "kmeans", "--k",
                   "1000", "--quiet", "--out", d.root / "u.safetensors"], ["k=1000"]),
    "units kmeans with labels and names it would ignore": (
        lambda d: ["units", "--features", d.inp / "src_feats.npy", "--labels",
                   d.inp / "src_labels.npy", "--class-names", d.inp / "names.txt", "--method",
                   "kmeans", "--k", "3", "--out", d.root / "u.safetensors"],
        ["--labels, --class-names apply to --method class only", "ignore labels"]),
    "an eps_c too small for float32": (_sel("--k", "3", "--eps-c", "1e-39", "--dtype", "float32"),
                                       ["distance / eps_c overflow float32", "raise eps_c"]),
    "a selection as source units": (_sel("--k", "3", source="a_selection.json"),
                                    ["a_selection.json", "holds a Selection, not units or features"]),
    "select into a file of the wrong kind, before the class means": (
        lambda d: ["select", "--source", d.inp / "src_feats.npy", "--source-labels",
                   d.inp / "src_labels.npy", "--target", d.inp / "T.npy", "--k", "3",
                   "--out", d.root / "sel.txt"], ["selection files are saved as .json"]),
    "l2 costs beyond float32": (_sel("--k", "3", "--metric", "l2", "--dtype", "float32",
                                     source="huge.npy"), ["l2 distances", "overflow float32",
                                                          "rescale the features"]),
    "units written as npy": (
        lambda d: ["units", "--features", d.inp / "src_feats.npy", "--labels",
                   d.inp / "src_labels.npy", "--out", d.root / "u.npy"], [".safetensors"]),
    "demo into a non-empty folder": (lambda d: ["demo", "--quick", "--out", d.inp],
                                     ["not empty", "not a demo run"]),
    "negative seed": (
        lambda d: ["units", "--features", d.inp / "src_feats.npy", "--method", "kmeans",
                   "--k", "3", "--seed", "-1", "--out", d.root / "u.safetensors"], ["--seed", "2**63"]),
    "demo with a seed too large for numpy": (
        lambda d: ["demo", "--quick", "--seed", str(2**64), "--out", d.root / "demo"], ["--seed"]),
}


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c) for c in USER_ERRORS])
def test_user_errors_exit_2_with_one_line_and_write_nothing(capsys, data, case):
    if case == "cuda on a CPU machine" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    argv_of, needles = USER_ERRORS[case]
    _write_bad_inputs(data)
    before = files_under(data.root)
    rc, _, err = cli(capsys, *argv_of(data))
    assert rc == 2
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(ERROR_PREFIX)
    assert "Traceback" not in err
    for needle in needles:
        assert needle.lower() in err.lower(), (needle, err)
    assert not data.out.exists()
    assert files_under(data.root) == before  # no output, no temporary file


def test_a_hard_target_marginal_is_written_as_inf_and_read_back(capsys, data):
    run_ok(capsys, *_sel("--k", "3", "--tau-b", "inf")(data))
    sel = read_sel(data.out)
    assert sel["params"]["tau_b"] == "inf" and float(sel["params"]["tau_b"]) == math.inf
    assert Selection.load(data.out).selected == sel["selected"]


def test_float32_stopped_by_rounding_is_not_converged_and_says_how_to_fix(capsys, data):
    rc, _, err = cli(capsys, *_sel("--k", "3", "--eps", "1e-6", "--dtype", "float32")(data))
    assert rc == 0 and read_sel(data.out)["meta"]["solver"]["converged"] is False
    assert "did not converge" in err and "--dtype float64" in err and "--eps-c" in err
    assert "--max-iter" not in err


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(capsys, data, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    before = files_under(data.root)
    rc, _, err = cli(capsys, *_sel("--k", "3")(data))
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "No space left on device; free disk space" in err
    assert files_under(data.root) == before


def test_user_error_in_a_subprocess_exits_2_with_one_stderr_line(data):
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain_reuse", "select", "--source", str(data.inp / "S.npy"),
         "--target", str(data.inp / "T.npy"), "--k", "3", "--method", "uto",
         "--out", str(data.out)],
        capture_output=True, text=True, cwd=data.root, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(ERROR_PREFIX) and "did you mean 'uot'" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not data.out.exists()
    assert not [p for p in data.root.rglob("*") if p.name.startswith(".")]


def test_python_dash_m_prints_the_version(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain_reuse", "--version"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"pretrain-reuse {__version__}"


# --------------------------------------------------------------------------------------------
# Regression tests of bugs found by review
# --------------------------------------------------------------------------------------------


def test_unknown_device_is_a_user_error(capsys, data):
    rc, _, err = cli(capsys, *select_args(data, "--k", "2", "--device", "gpu"))
    assert rc == 2 and err.startswith(ERROR_PREFIX) and "gpu" in err


def test_an_apple_gpu_on_another_machine_is_a_user_error(capsys, data):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU")
    rc, _, err = cli(capsys, *select_args(data, "--k", "2", "--device", "mps"))
    assert rc == 2 and err.startswith(ERROR_PREFIX) and "no Apple GPU" in err
    assert len(err.strip().splitlines()) == 1


def test_an_apple_gpu_is_refused_where_the_work_is_float64(capsys, data, monkeypatch):
    # a Mac's GPU has no float64: the selection and the games crashed with a traceback on it
    from pretrain_reuse.errors import PretrainReuseError
    from pretrain_reuse.knowledge.explain import ExplainConfig

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    rc, _, err = cli(capsys, *select_args(data, "--k", "2", "--device", "mps"))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert ("device='mps': the Apple GPU has no float64, which the selection computes in; use "
            "cpu") in err
    with pytest.raises(PretrainReuseError, match="which the explanation computes in; use cpu"):
        ExplainConfig(device="mps")


def test_demo_into_an_existing_file_is_a_user_error(capsys, data):
    rc, _, err = cli(capsys, "demo", "--quick", "--out", data.inp / "S.npy")
    assert rc == 2 and err.startswith(ERROR_PREFIX)


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_demo_with_no_threads_is_a_user_error(capsys, tmp_path, threads):
    rc, _, err = cli(capsys, "demo", "--quick", "--threads", threads, "--out", tmp_path / "d")
    assert rc == 2 and err.startswith(ERROR_PREFIX) and "--threads" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "d").exists()


def test_units_kmeans_clusters_unlabelled_npy_features(capsys, data):
    u = _kmeans(capsys, data.inp / "src_feats.npy", data.root / "u.safetensors")
    assert len(u) == 8 and u.counts.sum() == len(data.src_feats)


def test_k_of_100_percent_is_not_silently_one_unit(capsys, data):
    inp = data.inp
    run_ok(capsys, "units", "--features", inp / "src_feats.npy", "--labels",
           inp / "src_labels.npy", "--out", data.root / "src.safetensors")
    rc, _, _ = cli(capsys, "select", "--source", data.root / "src.safetensors", "--target",
                   inp / "T.npy", "--k", "100%", "--out", data.out)
    assert rc == 2 or len(read_sel(data.out)["selected"]) == N_SRC


@pytest.mark.parametrize("argv, flag", [
    (["units", "--features", "f.npy", "--method", "kmeans", "--k", "3", "--n-iter", "0"], "--n-iter"),
    (["units", "--features", "f.npy", "--method", "kmeans", "--k", "0"], "--k"),
    (["units", "--features", "f.npy", "--method", "kmeans", "--k", "3", "--max-points-per-unit", "-1"],
     "--max-points-per-unit"),
    (["select", "--source", "s.npy", "--target", "t.npy", "--max-iter", "0"], "--max-iter"),
    (["embed", "--model", "smallcnn", "--data", "d", "--workers", "-2"], "--workers"),
    (["experiment", "table2", "--clusters", "1"], "--clusters"),
    (["demo", "--threads", "zero"], "--threads"),
])
def test_a_bad_count_is_refused_naming_the_flag_before_any_work(tmp_path, capsys, argv, flag):
    """The library would name its Python parameter (n_iter), and only after loading the data."""
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pretrain-reuse: error: argument {flag}: must be an integer >= ") and \
        len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_select_names_string_labels_by_the_names_file_as_units_does(capsys, tmp_path):
    # labels that are names, with --class-names in another order than sorted: select put the
    # sorted numbering's unit 0 ('ant') under the file's first name ('zebra')
    rng = np.random.default_rng(0)
    centres = 10 * rng.standard_normal((3, 8))
    names = np.array(["zebra", "ant", "moose"])
    labels = np.repeat(names, 5)
    feats = (np.repeat(centres, 5, axis=0) + rng.standard_normal((15, 8))).astype(np.float32)
    np.save(tmp_path / "x.npy", feats)
    np.save(tmp_path / "y.npy", labels)
    (tmp_path / "names.txt").write_text("zebra\nant\nmoose\n")
    np.save(tmp_path / "t.npy", centres[[1]])  # near 'ant'
    run_ok(capsys, "select", "--source", tmp_path / "x.npy", "--source-labels", tmp_path / "y.npy",
           "--class-names", tmp_path / "names.txt", "--target", tmp_path / "t.npy", "--k", "1",
           "--out", tmp_path / "sel.json")
    run_ok(capsys, "units", "--features", tmp_path / "x.npy", "--labels", tmp_path / "y.npy",
           "--class-names", tmp_path / "names.txt", "--out", tmp_path / "u.safetensors")
    sel, units = load(tmp_path / "sel.json"), load(tmp_path / "u.safetensors")
    assert sel.selected == [1] and sel.unit_names[1] == "ant"  # the file's numbering, both verbs
    assert units.names == ["zebra", "ant", "moose"]


def _class_units_named_by(capsys, tmp_path: Path, feats: np.ndarray, classes: list[str],
                          lines: list[str]):
    """The class units of a pool (``tmp_path/pool``: 4 samples of each of ``classes``) that
    ``units --class-names`` makes with a names file of ``lines``."""
    FeatureStore(features=feats, labels=np.repeat(np.arange(len(classes)), 4), class_names=classes,
                 meta={"producer": "embed"}).save(tmp_path / "pool")
    (tmp_path / "names.txt").write_text("\n".join(lines) + "\n")
    run_ok(capsys, "units", "--features", tmp_path / "pool", "--class-names",
           tmp_path / "names.txt", "--out", tmp_path / "u.safetensors")
    return load(tmp_path / "u.safetensors")


def test_a_names_file_of_class_ids_and_words_names_each_class_by_its_id(capsys, tmp_path):
    # an image folder's classes are WordNet ids; ImageNet's LOC_synset_mapping.txt lists
    # "id words" lines in its own order, with lines for classes the pool lacks: line i named
    # unit i, so every unit took another class's name (or "classes without samples" were blamed
    # on unreadable images)
    rng = np.random.default_rng(0)
    ids = ["n03", "n01", "n02"]  # as a folder numbers them: sorted
    ids.sort()
    centres = 10 * rng.standard_normal((3, 8))
    feats = (np.repeat(centres, 4, axis=0) + rng.standard_normal((12, 8))).astype(np.float32)
    mapping = ["n09 extra class", "n03 wren, jenny wren", "n01 tench, Tinca tinca",
               "n02 goldfish, Carassius auratus"]
    units = _class_units_named_by(capsys, tmp_path, feats, ids, mapping)
    assert units.names == [mapping[2], mapping[3], mapping[1]]
    # the words select by name; the unit names keep the ids a fine-tuning pool is matched by
    np.save(tmp_path / "t.npy", centres[[2]])
    run_ok(capsys, "select", "--source", tmp_path / "u.safetensors", "--target", tmp_path / "t.npy",
           "--method", "label", "--names", "wren", "--out", tmp_path / "sel.json")
    assert load(tmp_path / "sel.json").selected == [2]
    # a file that neither fits the classes line by line nor names them by their ids
    (tmp_path / "other.txt").write_text("a\nb\n")
    rc, _, err = cli(capsys, "units", "--features", tmp_path / "pool", "--class-names",
                     tmp_path / "other.txt", "--out", tmp_path / "v.safetensors")
    assert rc == 2 and err.count("\n") == 1
    assert "--class-names has 2 lines for 3 classes" in err and "'n01'" in err
    # a mapping that lacks a class but has a line per class was applied line by line: the unit
    # of n01 was named "n03 owl", and --names owl selected it; an empty file was passed over
    (tmp_path / "short.txt").write_text("n03 owl\nn01 tench\nn04 shark\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    for names, needle in (("short.txt", "--class-names names 2 of the 3 classes by their names "
                                        "(lines that start with them), but no line starts with 'n02'"),
                          ("empty.txt", "holds no names (it is empty or blank)")):
        for argv in (["units", "--features", tmp_path / "pool"],
                     ["select", "--source", tmp_path / "pool", "--target", tmp_path / "t.npy",
                      "--method", "label", "--names", "owl"]):
            out = tmp_path / ("x.json" if argv[0] == "select" else "x.safetensors")
            rc, _, err = cli(capsys, *argv, "--class-names", tmp_path / names, "--out", out)
            assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "x.safetensors").exists()
    # bare names in the classes' order, some of which are the classes' own, name them by position
    names = _class_units_named_by(capsys, tmp_path, feats, ids, ["n01", "second", "n03"]).names
    assert names == ["n01", "second", "n03"]


def test_class_names_that_rename_the_classes_keep_the_datas_own_names(capsys, tmp_path):
    # folder names with spaces were matched by their first word only (so a file silently named
    # them line by line), and units renamed line by line lost the names their pool's classes
    # have, so that fine-tuning refused their selection as made over other data
    folders = ["golden retriever", "tabby", "tabby cat"]  # sorted, as an image folder numbers them
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((12, 8)).astype(np.float32)
    mapping = ["tabby cat, a pet", "zebra, a striped horse", "golden retriever a dog",
               "tabby\ta coat pattern"]
    units = _class_units_named_by(capsys, tmp_path, feats, folders, mapping)
    assert units.names == [mapping[2], mapping[3], mapping[0]]
    assert units.meta["data_class_names"] == folders
    (tmp_path / "abc.txt").write_text("alpha\nbeta\ngamma\n")  # line i names class i
    run_ok(capsys, "units", "--features", tmp_path / "pool", "--class-names", tmp_path / "abc.txt",
           "--out", tmp_path / "v.safetensors")
    assert load(tmp_path / "v.safetensors").meta["data_class_names"] == folders
    np.save(tmp_path / "t.npy", feats[:2])
    for source, names in ((tmp_path / "v.safetensors", ()),  # renamed by units, or by select
                          (tmp_path / "pool", ("--class-names", tmp_path / "abc.txt"))):
        run_ok(capsys, "select", "--source", source, *names, "--target", tmp_path / "t.npy",
               "--method", "label", "--names", "beta", "--out", tmp_path / "sel.json")
        selection = load(tmp_path / "sel.json")
        assert selection.selected == [1] and selection.unit_names == ["alpha", "beta", "gamma"]
        assert selection.meta["data_class_names"] == folders
    # names the data already has are not recorded twice
    assert "data_class_names" not in load(tmp_path / "pool", ).meta


def test_a_solve_cut_short_by_max_iter_is_warned_of_not_refused(capsys, tmp_path):
    # its optimality conditions are far off (599 nats here, beyond float32's exponent range) only
    # because it stopped early: the fix is --max-iter, not a larger eps or float64
    rng = np.random.default_rng(0)
    np.save(tmp_path / "s.npy", 10 * rng.standard_normal((200, 16)))
    np.save(tmp_path / "t.npy", 10 * rng.standard_normal((20, 16)))
    rc, _, err = cli(capsys, "select", "--source", tmp_path / "s.npy", "--target", tmp_path / "t.npy",
                     "--metric", "l2", "--k", "5", "--max-iter", "2", "--dtype", "float32",
                     "--out", tmp_path / "sel.json")
    assert rc == 0 and "did not converge in 2 iterations" in err and "raise max_iter (--max-iter)" in err
    solver = read_sel(tmp_path / "sel.json")["meta"]["solver"]
    assert solver["n_iter"] == 2 and max(solver["marginal_error_a"], solver["marginal_error_b"]) > 88


# --------------------------------------------------------------------------------------------
# A rerun of a finished command says so, and claims no work
# --------------------------------------------------------------------------------------------


def _stamps(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its modification time and size: what a rerun that has
    nothing to do must leave as it was."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*") if p.is_file()}


def test_a_rerun_of_a_finished_finetune_or_grid_says_so_and_claims_no_file(capsys, tmp_path):
    # it printed "wrote runs/vanilla/result.json" though no file changed
    common = ["finetune", "--model", "smallcnn-s", "--target", "synthetic:target", "--batch-size",
              8, "--max-steps", 2, "--quiet"]
    out = tmp_path / "run"
    assert "wrote" in run_ok(capsys, *common, "--out", out)
    before = _stamps(out)
    assert run_ok(capsys, *common, "--workers", 0, "--out", out) == (
        f"finetune: {out} is finished (same settings); nothing to do\n")
    assert _stamps(out) == before
    grid = tmp_path / "grid"
    first = run_ok(capsys, *common, "--grid", "lr=0.01,0.1", "--out", grid)
    best = first[first.index("best on validation"):first.index("; wrote")]
    # nothing to do, and the winner named again, as found in the grid's table
    assert run_ok(capsys, *common, "--grid", "lr=0.01,0.1", "--out", grid) == (
        f"finetune: {grid} is finished (same settings); nothing to do\n"
        f"{best}; in {grid / 'grid.csv'}\n")
    # a run that is missing is trained, and the grid says what it picked
    for p in sorted(grid.iterdir()):
        if p.is_dir():
            shutil.rmtree(p)
            break
    assert "best on validation" in run_ok(capsys, *common, "--grid", "lr=0.01,0.1", "--out", grid)


def test_a_rerun_of_a_finished_embed_says_so_and_embeds_nothing(capsys, tmp_path):
    # it printed "wrote 240 x 512 features to feats/pool" after an empty progress bar
    from PIL import Image

    for k in range(4):
        (tmp_path / "imgs" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (60 * k, 30, 200)).save(tmp_path / "imgs" / f"c{k % 2}" / f"{k}.png")
    argv = ["embed", "--model", "smallcnn-s", "--data", tmp_path / "imgs", "--shard-size", 2,
            "--quiet", "--out", tmp_path / "feats"]
    assert run_ok(capsys, *argv).startswith("wrote 4 x ")
    shards = _stamps(tmp_path / "feats" / "parts")
    assert run_ok(capsys, *argv) == (
        f"embed: {tmp_path / 'feats'} is finished (same settings); nothing to do\n")
    assert _stamps(tmp_path / "feats" / "parts") == shards
    # a missing shard is embedded again, and the line says what was written
    next((tmp_path / "feats" / "parts").iterdir()).unlink()
    assert run_ok(capsys, *argv).startswith("wrote 4 x ")


def test_every_option_with_a_default_shows_it_in_the_help():
    # embed's and evaluate's --batch-size, --device, --seed showed none (finetune's say theirs)
    from pretrain_reuse.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    embed, evaluate, select = (sub.choices[v].format_help() for v in ("embed", "evaluate", "select"))
    assert re.search(r"--batch-size BATCH_SIZE images \(sentences\) per forward pass; a stopped run "
                     r"resumes with the same one .{0,80}\), --workers may change \(default: 128\)",
                     " ".join(embed.split()))
    assert re.search(r"--seed SEED\s+initialises layers without weights \(default: 0\)", embed)
    assert re.search(r"--device DEVICE\s+cpu, cuda or cuda:N \(default: cpu\)", evaluate)
    assert "(default: None)" not in embed + evaluate + select  # no default: nothing shown
    assert "--quiet" in embed and "(default: False)" not in embed
    # select names the per-sample features the Quickstart passes it
    assert "a FeatureStore folder, whose class means are taken" in " ".join(select.split())


def test_a_second_command_writing_a_folder_in_use_is_one_line_and_writes_nothing(capsys, tmp_path):
    # a fine-tuning run started twice (two terminals, a job array): the second process would
    # overwrite the first's checkpoints; it is refused while the first holds the folder
    from test_artifacts import _Holder

    out = tmp_path / "run"
    out.mkdir()
    argv = ["finetune", "--model", "smallcnn-s", "--target", "synthetic:target", "--batch-size", 8,
            "--max-steps", 2, "--quiet", "--out", out]
    with _Holder(out) as other:
        assert other.ready == "locked"
        rc, _, err = cli(capsys, *argv)
        assert rc == 2 and err.count("\n") == 1
        assert f"out (--out) {str(out)!r} is in use by another process writing a fine-tuning " \
               "run there; wait for it to finish" in err
        assert list(out.iterdir()) == []
    assert "wrote" in run_ok(capsys, *argv)  # once it ended


def test_embed_into_a_folder_in_use_leaves_the_running_embeddings_marker(capsys, tmp_path):
    # a run that has written no shard yet looks stopped: a second embed forgot its marker (and
    # so broke the running one) before it was refused
    from test_artifacts import _Holder

    out = tmp_path / "feats"
    (out / "parts").mkdir(parents=True)
    (out / "embed.json").write_text(json.dumps({"kind": "embedding", "params": {}}))
    with _Holder(out) as other:
        assert other.ready == "locked"
        rc, _, err = cli(capsys, "embed", "--model", "smallcnn-s", "--data", "synthetic:target",
                         "--split", "test", "--quiet", "--out", out)
        assert rc == 2 and "is in use by another process writing an embedding there" in err
        assert (out / "embed.json").is_file() and (out / "parts").is_dir()


def test_embed_of_a_folder_with_a_file_name_that_is_not_utf8_is_refused_in_one_line(tmp_path,
                                                                                  capsys):
    # embed failed with a traceback (UnicodeEncodeError) when it wrote the sample ids
    colour_folder(tmp_path / "d", 2, 2, seed=0)
    Image.new("RGB", (16, 16)).save(bytes(tmp_path / "d" / "c0") + b"/caf\xe9.png")
    rc, _, err = cli(capsys, "embed", "--model", "smallcnn-s", "--data", tmp_path / "d", "--out",
                     tmp_path / "f")
    assert rc == 2 and err.count("\n") == 1 and not (tmp_path / "f").exists()
    assert "the file name b'c0/caf\\xe9.png' in" in err and "is not UTF-8" in err


def test_an_out_folder_inside_a_data_folder_it_reads_is_refused_before_anything_is_written(
        tmp_path, capsys):
    # embed --out pool/feats succeeded, and from then on every command reading pool (its own
    # rerun too) was refused: feats/ read as a class folder without images (a run's figures,
    # written inside a folder, would have been read as a class of images); an --out inside the
    # data set of --data ds --split test (ds/x beside ds/train) unmade its splits
    colour_folder(tmp_path / "pool", 3, 4, seed=0)
    for split in ("train", "test"):
        colour_folder(tmp_path / "target" / split, 2, 4, seed=1)
    torch.manual_seed(0)
    save_backbone(create_backbone("smallcnn-s", num_classes=2), tmp_path / "m.safetensors", {})
    model = ["--model", "smallcnn-s"]
    target, test = tmp_path / "target", tmp_path / "target" / "test"
    for argv, flag, data, where in (
            (["embed", *model, "--data", tmp_path / "pool", "--out", tmp_path / "pool" / "feats"],
             "--data", "pool", "lies inside"),
            (["finetune", *model, "--target", target, "--out", target / "run"], "--target",
             "target", "lies inside"),
            (["finetune", *model, "--target", target, "--grid", "lr=0.01,0.1", "--out",
              target / "grid"], "--target", "target", "lies inside"),
            (["finetune", *model, "--target", target / "train", "--target-test", test, "--out",
              test / "c0" / "run"], "--target-test", "target/test", "lies inside"),
            (["experiment", "fig4a", *model, "--source", tmp_path / "pool", "--target", target,
              "--k", 2, "--relevant", "0,1", "--out", tmp_path / "pool"], "--source", "pool", "is"),
            (["explain", *model, "--weights", tmp_path / "m.safetensors", "--data", test,
              "--players", "grid:2x2", "--samples", 1, "--out", test / "x"], "--data",
             "target/test", "lies inside"),
            (["explain", *model, "--weights", tmp_path / "m.safetensors", "--data", target,
              "--split", "test", "--players", "grid:2x2", "--samples", 1, "--out", target / "x"],
             "--data", "target", "lies inside"),
            (["knowledge", *model, "--pretrained", tmp_path / "m.safetensors", "--finetuned",
              tmp_path / "m.safetensors", "--data", target, "--split", "test", "--players",
              "grid:2x2", "--samples", 1, "--out", target / "k"], "--data", "target",
             "lies inside")):
        before = sorted(tmp_path.rglob("*"))
        rc, _, err = cli(capsys, *argv, "--quiet")
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert (f"{where} the data folder ({flag}) {str(tmp_path / data)!r}, where later commands "
                "would read what it writes as images; pass an out folder outside it") in err, err
        assert sorted(tmp_path.rglob("*")) == before, argv[0]
    # a hidden folder, which image folders skip, is let through
    run_ok(capsys, "embed", *model, "--data", tmp_path / "pool", "--out", tmp_path / "pool" / ".f",
           "--quiet")
    run_ok(capsys, "embed", *model, "--data", tmp_path / "pool", "--out", tmp_path / "pool" / ".f",
           "--quiet")  # and the data still reads as it did
