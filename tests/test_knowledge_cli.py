"""explain / knowledge through the CLI: outputs that check out, and one-line errors."""

import dataclasses
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain_reuse import load
from pretrain_reuse.artifacts import hash_array, safetensors_header
from pretrain_reuse.cli import main
from pretrain_reuse.data import open_dataset
from pretrain_reuse.embed import preprocessed
from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.knowledge import (
    KnowledgeReport,
    discrimination_power,
    harsanyi_and,
    knowledge_report,
    set_ablation,
)
from pretrain_reuse.knowledge.analysis import (
    KnowledgeWarning,
    analyze_knowledge,
    counterfactual,
    load_analysis,
)
from pretrain_reuse.knowledge.contiguity import contiguity
from pretrain_reuse.knowledge.explain import ExplainConfig
from pretrain_reuse.knowledge.interactions import reconstruct_and, reconstruct_or
from pretrain_reuse.knowledge.metrics import knowledge_set, other_image_control, other_sample_partners
from pretrain_reuse.knowledge.sparsify import joint_and_or_interactions
from pretrain_reuse.models import create_backbone, save_backbone


def _classifier(path, classes: int, seed: int = 0, meta: dict | None = None):
    torch.manual_seed(seed)
    net = create_backbone("smallcnn-s", num_classes=classes)
    save_backbone(net, path, {"seed": seed} if meta is None else meta)
    return path


def _snapshot(path, step: int, seed: int, run: str | None = "sha256:run-a"):
    """A fine-tuning snapshot as finetune --snapshots writes it: its step and run (None: a
    snapshot of an earlier version, which records only the step)."""
    return _classifier(path, 10, seed, {"step": step} if run is None else {"step": step, "run": run})


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_explain_writes_exact_interactions_of_the_models_games(tmp_path, capsys):
    weights = _classifier(tmp_path / "m.safetensors", 10)
    rc, out, _ = _run(capsys, "explain", "--model", "smallcnn-s", "--weights", weights,
                      "--data", "synthetic:target", "--players", "parts", "--samples", 3,
                      "--quiet", "--out", tmp_path / "x")
    assert rc == 0 and "explained 3 samples with n=9 players" in out
    files = sorted((tmp_path / "x").glob("interactions-*.safetensors"))
    assert len(files) == 3
    # the faithfulness line: each sample's largest and mean error over the masks, averaged (the
    # "mean" it printed was the mean of the largest)
    errors = [load(f).faithfulness_error(0.05) for f in files]
    assert (f"largest over the masks {np.mean([e['max'] for e in errors]):.4f} (mean over samples; "
            f"median {np.median([e['max'] for e in errors]):.4f}, worst sample "
            f"{max(e['max'] for e in errors):.4f}), mean over the masks "
            f"{np.mean([e['mean'] for e in errors]):.4f}") in out
    for f in files:
        x = load(f)
        np.testing.assert_allclose(x.and_values, harsanyi_and(x.v), atol=1e-12)
        assert x.info["players"]["players"] == "masks" and x.n == 9
        assert x.meta["inputs"]["weights"] == str(weights) and x.meta["inputs"]["step"] is None
        assert x.meta["inputs"]["weights_hash"] == _sha256(weights)
        assert x.meta["inputs"]["data"] == "synthetic:target-0"
    # the cached games make a rerun reuse the work
    games = sorted((tmp_path / "x" / "games").glob("*.npy"))
    assert len(games) == 3


def test_knowledge_of_a_model_against_itself_preserves_everything(tmp_path, capsys):
    # the same network in all three roles: every salient interaction is preserved, none is new,
    # and the scratch model knows all of it (closed-form ratios 1, 0, 0)
    same = _classifier(tmp_path / "m.safetensors", 10)
    rc, out, _ = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained", same,
                      "--finetuned", same, "--scratch", same, "--data", "synthetic:target",
                      "--players", "grid:2x2", "--samples", 3, "--quiet", "--out", tmp_path / "k")
    assert rc == 0, out
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    overall = k["report"]["overall"]
    assert overall["preserve"]["mean"] == 1.0 and overall["discard"]["mean"] == 0.0
    assert overall["new"]["mean"] == 0.0 and overall["exclusive"]["mean"] == 0.0
    assert k["samples"]["n"] == 3
    # the other-image control says whether its pairs could be of different classes
    shared = k["other_image"]["same_class"]
    assert ("of the same class (the samples are of one class)" in out) == (shared == 3)
    assert (f"of another class except in {shared} of the 3 pairs" in out) == (0 < shared < 3)
    # nothing is discarded; the preserved knowledge is all of it, so its discrimination power is
    # the model's own (Li & Zhang's, over the samples of each class)
    assert k["discrimination"]["discard"]["purity"] is None
    xs = [load(f) for f in sorted((tmp_path / "k" / "finetuned").glob("interactions-*"))]
    by_class = {}
    for x in xs:
        by_class.setdefault(x.info["label"], []).append(x)
    expected = np.mean([discrimination_power(c).purity() for c in by_class.values()])
    assert k["discrimination"]["preserve"]["purity"] == pytest.approx(expected)
    assert "discrimination power preserve" in out


def test_knowledge_of_two_different_networks_reports_the_ratios_of_its_saved_interactions(
        tmp_path, capsys):
    # the fine-tuned role: the same network with its weights perturbed by ~50%, so that the two
    # agree on some samples' classes but not on all their interactions (3x3 cells: 511 of them)
    pre = _classifier(tmp_path / "pre.safetensors", 10)
    torch.manual_seed(0)
    net = create_backbone("smallcnn-s", num_classes=10)
    with torch.no_grad():
        for w in net.parameters():
            w.mul_(1.0 + 0.5 * torch.randn_like(w))
    ft = save_backbone(net, tmp_path / "ft.safetensors", {"seed": 0, "perturbed": 0.5})
    rc, _, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained", pre,
                      "--finetuned", ft, "--data", "synthetic:target", "--players", "grid:3x3",
                      "--samples", 3, "--quiet", "--out", tmp_path / "k")
    assert rc == 0, err
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    xs = {role: [load(f) for f in sorted((tmp_path / "k" / role).glob("interactions-*"))]
          for role in ("pretrained", "finetuned")}
    assert len(xs["pretrained"]) == len(xs["finetuned"]) == k["samples"]["n"] == 3
    params = k["meta"]["params"]
    report = knowledge_report(xs["pretrained"], xs["finetuned"], tau=params["tau"],
                              match=params["match"])
    again = report.to_dict()["overall"]
    assert k["report"]["overall"] == again
    # saved alone, the report records what it was computed from (it recorded no inputs)
    inputs = json.loads(report.save(tmp_path / "report.json").read_text())["meta"]["inputs"]
    assert inputs["pretrained_weights_hash"] == _sha256(pre)
    assert inputs["finetuned_weights_hash"] == _sha256(ft)
    assert inputs["finetuned_weights"] == str(ft) and inputs["data"] == "synthetic:target-0"
    assert json.loads(inputs["samples"]) == [x.info["sample"] for x in xs["finetuned"]]
    assert KnowledgeReport.load(tmp_path / "report.json").inputs == inputs
    # the two networks' knowledge differs: not the closed-form 1 / 0 of one network in both roles
    assert again["preserve"]["mean"] < 0.99 and again["discard"]["mean"] > 0.01
    # the other-image control: each sample's pre-trained knowledge against the fine-tuned
    # model's of its partner, of another class where the classes allow
    labels = [x.info["label"] for x in xs["pretrained"]]
    partners = other_sample_partners(labels)
    assert k["other_image"]["partners"] == partners.tolist()
    assert k["other_image"]["same_class"] == sum(labels[i] == labels[j] for i, j in enumerate(partners))
    control = other_image_control(xs["pretrained"], [xs["finetuned"][j] for j in partners],
                                  tau=params["tau"], match=params["match"])
    assert k["other_image"]["overall"] == {name: c.to_dict() for name, c in control.items()}


@pytest.mark.parametrize("argv,needle", [
    (["--players", "hex"], "grid:RxC"),
    (["--players", "grid:2x2", "--n", "9"], "n=9"),
    (["--baseline", "noise"], "baseline"),
    (["--players", "parts", "--data", "digits"], "part annotations"),
    # too many players: 2^n evaluations and memory, refused before any model runs
    (["--players", "grid:8x8"], "n=64: every sample needs 2^64"),
    (["--players", "grid:6x6", "--n", "21"], "explain 1..20 players"),
    (["--players", "grid:4x4", "--n", "0"], "n must be >= 1"),
    # (it said "n must be >= 1 ... --n N draws N cells", a flag not given)
    (["--players", "grid:0x3"], "a grid needs at least one row and one column"),
    # players that cannot cover the image: cells smaller than a pixel
    (["--players", "grid:64x64", "--n", "4"], "does not fit an input of 32x32 pixels"),
    # the text sample rules
    (["--max-position", "5"], "max_position applies to players=tokens"),
    # one model: joint-and-or was and-or under another name
    (["--decomposition", "joint-and-or"], "explain has one model: pass and-or"),
])
def test_explain_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, needle):
    weights = _classifier(tmp_path / "m.safetensors", 10)
    base = ["explain", "--model", "smallcnn-s", "--weights", weights, "--samples", 1, "--quiet",
            "--out", tmp_path / "x"]
    if "--data" not in argv:
        base += ["--data", "synthetic:target"]
    rc, _, err = _run(capsys, *base, *argv)
    assert rc == 2 and err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_model_without_the_datas_classes_is_a_user_error(tmp_path, capsys):
    weights = _classifier(tmp_path / "m7.safetensors", 7)
    rc, _, err = _run(capsys, "explain", "--model", "smallcnn-s", "--weights", weights, "--data",
                      "synthetic:target", "--samples", 1, "--quiet", "--out", tmp_path / "x")
    assert rc == 2 and "outputs 7 classes but the data has 10" in err


def test_knowledge_with_a_missing_model_file_is_a_user_error(tmp_path, capsys):
    ft = _classifier(tmp_path / "ft.safetensors", 10)
    rc, _, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained",
                      tmp_path / "nope.safetensors", "--finetuned", ft, "--data",
                      "synthetic:target", "--quiet", "--out", tmp_path / "k")
    assert rc == 2 and "--pretrained" in err and "does not exist" in err


@pytest.mark.parametrize("argv,needle", [(["--match", "foo"], "match"), (["--tau", "1.5"], "tau=1.5")])
def test_knowledge_options_are_checked_before_any_interaction_is_computed(tmp_path, capsys,
                                                                          argv, needle):
    same = _classifier(tmp_path / "m.safetensors", 10)
    rc, _, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained", same,
                      "--finetuned", same, "--data", "synthetic:target", "--players", "grid:2x2",
                      "--samples", 2, "--quiet", "--out", tmp_path / "k", *argv)
    assert rc == 2 and err.count("\n") == 1 and needle in err
    assert not (tmp_path / "k").exists()


def test_checkpoints_may_name_the_fine_tuning_run_folder(tmp_path, capsys):
    pre = _classifier(tmp_path / "pre.safetensors", 10)
    run = tmp_path / "run"
    rc, _, err = _run(capsys, "finetune", "--model", "smallcnn-s", "--weights", pre, "--target",
                      "synthetic:target", "--max-steps", 2, "--batch-size", 8, "--eval-every", 1,
                      "--snapshots", "--quiet", "--out", run)
    assert rc == 0, err
    snaps = sorted((run / "snapshots").glob("*.safetensors"))
    assert snaps
    # the fine-tuned model in both roles: the samples it classifies correctly are explainable
    ft = run / "model.safetensors"
    rc, _, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained", ft,
                      "--finetuned", ft, "--checkpoints", run,
                      "--data", "synthetic:target", "--players", "grid:2x2", "--samples", 2,
                      "--quiet", "--out", tmp_path / "k")
    assert rc == 0, err
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    assert len(k["convergence"]["similarity"]) == len(snaps)
    # every point of the curve names its snapshot file, its content hash and its step
    steps = [int(f.stem.split("-")[1]) for f in snaps]
    points = k["convergence"]["checkpoints"]
    assert [c["weights"] for c in points] == [str(f) for f in snaps]
    assert [c["step"] for c in points] == steps
    assert [c["weights_hash"] for c in points] == [_sha256(f) for f in snaps]
    inputs = k["meta"]["inputs"]
    assert inputs["checkpoints"] == points and inputs["data"] == "synthetic:target-0"
    assert inputs["models"]["finetuned"]["weights_hash"] == _sha256(ft)
    # the mode each weights file records is kept, so a report need not read the files again
    assert inputs["models"]["finetuned"]["mode"] == "vanilla"
    assert k["meta"]["params"]["candidates"] == 400
    # another tau with --games-from: no game is computed again, the snapshots' included
    rc, _, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained", ft,
                      "--finetuned", ft, "--checkpoints", run, "--data", "synthetic:target",
                      "--players", "grid:2x2", "--samples", 2, "--tau", 0.2, "--quiet",
                      "--games-from", tmp_path / "k", "--out", tmp_path / "k2")
    assert rc == 0, err
    folders = ["pretrained", "finetuned", *(f"checkpoint-{t:03d}" for t in range(len(snaps)))]
    for folder in folders:
        games = sorted((tmp_path / "k2" / folder / "games").glob("*.npy"))
        assert len(games) == 2 and all(
            g.samefile(tmp_path / "k" / folder / "games" / g.name) for g in games), folder


def test_knowledge_on_world_parts_reports_recovery_of_the_class_rules(tmp_path, capsys):
    # recompute precision/recall from the written interactions by brute force: the truth is the
    # Möbius sum of the scene's rule over all subsets, the prediction the salient entries
    # (one random network in both roles: two would rarely agree on a correct sample)
    same = _classifier(tmp_path / "m.safetensors", 10)
    rc, out, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained", same,
                        "--finetuned", same, "--data", "synthetic:target", "--players", "parts",
                        "--samples", 2, "--quiet", "--out", tmp_path / "k")
    assert rc == 0, err
    assert "class rules found by the fine-tuned model: precision" in out
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    data = open_dataset("synthetic:target", split="test")
    for role in ("pretrained", "finetuned"):
        precision, recall = [], []
        for f in sorted((tmp_path / "k" / role).glob("interactions-*.safetensors")):
            x = load(f)
            scene = data.scene(x.info["index"])
            v = [float(scene.rule_holds([s for s in range(9) if m >> s & 1])) for m in range(512)]
            truth = {s for s in range(1, 512) if sum(
                (-1) ** bin(s ^ t).count("1") * v[t] for t in range(512) if t & s == t) != 0}
            top = np.abs(x.and_values[1:]).max()
            pred = {s for s in range(1, 512) if abs(x.and_values[s]) > 0.05 * top}
            precision.append(len(pred & truth) / len(pred))
            recall.append(len(pred & truth) / len(truth))
        got = k["ground_truth"][role]["overall"]
        assert got["precision"]["mean"] == pytest.approx(np.mean(precision), abs=1e-12)
        assert got["recall"]["mean"] == pytest.approx(np.mean(recall), abs=1e-12)


def test_a_learned_baseline_never_gives_denser_interactions_than_its_zero_start(tmp_path, capsys):
    weights = _classifier(tmp_path / "m.safetensors", 10)
    common = ["explain", "--model", "smallcnn-s", "--weights", weights, "--data",
              "synthetic:target", "--players", "grid:2x2", "--samples", 2, "--quiet"]
    assert _run(capsys, *common, "--out", tmp_path / "zero")[0] == 0
    assert _run(capsys, *common, "--baseline", "learned", "--baseline-steps", 3,
                "--baseline-lr", 0.01, "--out", tmp_path / "learned")[0] == 0
    zero = [load(f) for f in sorted((tmp_path / "zero").glob("interactions-*.safetensors"))]
    learned = [load(f) for f in sorted((tmp_path / "learned").glob("interactions-*.safetensors"))]
    for z, x in zip(zero, learned, strict=True):
        assert x.info["index"] == z.info["index"] and x.info["baseline"] == "learned"
        assert np.abs(x.and_values).sum() <= np.abs(z.and_values).sum() + 1e-9
        np.testing.assert_allclose(x.and_values, harsanyi_and(x.v), atol=1e-12)
        # the fit is recorded: Σ|I_and| at the zero start and at the baseline kept
        fit = x.info["baseline_fit"]
        assert fit["steps"] == 3 and 0 <= fit["best_step"] <= 3 and z.info["baseline_fit"] is None
        assert fit["loss"] == pytest.approx(np.abs(harsanyi_and(x.v)).sum(), rel=1e-9)
        assert fit["loss_initial"] == pytest.approx(np.abs(harsanyi_and(z.v)).sum(), rel=1e-6)
    # a rerun reads the games and their fits from the cache (the interactions deleted: none is
    # finished); a game whose inside changed (a learned game has no end values to check) differs
    # from its recorded hash and is learned again, to the same game
    for f in (tmp_path / "learned").glob("interactions-*.safetensors"):
        f.unlink()
    changed = sorted((tmp_path / "learned" / "games").glob("*.npy"))[0]
    inside = np.load(changed)
    inside[2] += 1.0
    np.save(changed, inside)
    assert _run(capsys, *common, "--baseline", "learned", "--baseline-steps", 3,
                "--baseline-lr", 0.01, "--out", tmp_path / "learned")[0] == 0
    again = [load(f) for f in sorted((tmp_path / "learned").glob("interactions-*.safetensors"))]
    assert [x.info["baseline_fit"] for x in again] == [x.info["baseline_fit"] for x in learned]
    for x, y in zip(learned, again, strict=True):
        np.testing.assert_array_equal(x.v, y.v)


def test_a_run_that_would_not_fit_in_memory_is_refused(tmp_path, capsys, monkeypatch):
    # 3 samples x 2^9 games x 8 arrays x 8 bytes = 98,304 bytes > the 50,000 we pretend are free
    monkeypatch.setattr("pretrain_reuse.knowledge.explain._available_memory", lambda: 50_000)
    weights = _classifier(tmp_path / "m.safetensors", 10)
    rc, _, err = _run(capsys, "explain", "--model", "smallcnn-s", "--weights", weights, "--data",
                      "synthetic:target", "--players", "parts", "--samples", 3, "--quiet",
                      "--out", tmp_path / "x")
    assert rc == 2 and err.count("\n") == 1
    assert "3 samples with n=9 players needs about" in err and "--samples" in err
    assert not list((tmp_path / "x").glob("interactions-*"))


def test_weights_of_another_architecture_are_a_user_error(tmp_path, capsys):
    small = _classifier(tmp_path / "s.safetensors", 10)
    rc, _, err = _run(capsys, "explain", "--model", "smallcnn", "--weights", small, "--data",
                      "synthetic:target", "--samples", 1, "--quiet", "--out", tmp_path / "x")
    assert rc == 2 and err.count("\n") == 1
    assert "does not fit smallcnn" in err and "check the architecture" in err
    # a fine-tuning snapshot of another architecture among --checkpoints
    (tmp_path / "snaps").mkdir()
    torch.manual_seed(0)
    save_backbone(create_backbone("smallcnn", num_classes=10), tmp_path / "snaps" / "1.safetensors",
                  {})
    rc, _, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained", small,
                      "--finetuned", small, "--checkpoints", tmp_path / "snaps", "--data",
                      "synthetic:target", "--quiet", "--out", tmp_path / "k")
    assert rc == 2 and err.count("\n") == 1 and "does not fit smallcnn-s" in err


def test_checkpoints_of_another_run_or_not_models_are_refused(tmp_path, capsys):
    model = _classifier(tmp_path / "m.safetensors", 10)
    (tmp_path / "snaps").mkdir()
    for step in (1, 2):  # snapshots of another run: its final model is not --finetuned
        _snapshot(tmp_path / "snaps" / f"step-{step:07d}.safetensors", step, seed=step)
    knowledge = ["knowledge", "--model", "smallcnn-s", "--pretrained", model, "--finetuned", model,
                 "--data", "synthetic:target", "--players", "grid:2x2", "--samples", 2, "--quiet",
                 "--out", tmp_path / "k"]
    rc, _, err = _run(capsys, *knowledge, "--checkpoints", tmp_path / "snaps")
    assert rc == 2 and err.count("\n") == 1
    assert "the last of the 2 checkpoints is not the fine-tuned model" in err
    # an explain folder's interactions are not models (they failed as weights of smallcnn-s)
    assert _run(capsys, "explain", "--model", "smallcnn-s", "--weights", model, "--data",
                "synthetic:target", "--players", "grid:2x2", "--samples", 1, "--quiet", "--out",
                tmp_path / "x")[0] == 0
    rc, _, err = _run(capsys, *knowledge, "--checkpoints", tmp_path / "x")
    assert rc == 2 and err.count("\n") == 1
    assert "holds interactions-0000.safetensors, which is not a saved model" in err
    # a folder of several runs (an experiment's, a grid's, a demo's) is not one run's snapshots
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "run.json").write_text('{"kind": "experiment-run", "params": {}}')
    rc, _, err = _run(capsys, *knowledge, "--checkpoints", tmp_path / "exp")
    assert rc == 2 and err.count("\n") == 1
    assert "holds an experiment, not a fine-tuning run; pass the folder of one fine-tuning run" in err
    assert not (tmp_path / "k").exists()


def test_joint_decomposition_gives_identical_models_one_split(quick_demo, tmp_path, capsys):
    # the demo's linear probe and fine-tuned model, and the fine-tuned one again as scratch:
    # sparsified together, the identical games of "finetuned" and "scratch" get the same AND/OR
    # split, and every role's interactions reproduce its game up to the bounded noise
    demo, _, _ = quick_demo
    a = demo / "finetune" / "linear-probe-seed0" / "model.safetensors"
    b = demo / "finetune" / "vanilla-seed0" / "model.safetensors"
    rc, out, _ = _run(capsys, "knowledge", "--model", "smallcnn", "--pretrained", a,
                      "--finetuned", b, "--scratch", b, "--data", "synthetic:target",
                      "--players", "parts", "--samples", 2, "--decomposition", "joint-and-or",
                      "--quiet", "--out", tmp_path / "k")
    assert rc == 0, out
    ft = [load(p) for p in sorted((tmp_path / "k" / "finetuned").glob("interactions-*"))]
    sc = [load(p) for p in sorted((tmp_path / "k" / "scratch").glob("interactions-*"))]
    pre = [load(p) for p in sorted((tmp_path / "k" / "pretrained").glob("interactions-*"))]
    assert len(ft) == len(sc) == len(pre) == 2
    for x, y in zip(ft, sc, strict=True):
        np.testing.assert_allclose(x.and_values, y.and_values, atol=1e-6)
        np.testing.assert_allclose(x.or_values, y.or_values, atol=1e-6)
    for x, y in zip(ft, pre, strict=True):  # one joint problem per sample, over the three models
        assert x.meta["solver"]["loss"] == y.meta["solver"]["loss"]
        assert (x.meta["solver"]["model"], y.meta["solver"]["model"]) == (1, 0)
    for x in ft + pre:
        assert x.kind == "and-or"
        rebuilt = reconstruct_and(x.and_values) + reconstruct_or(x.or_values)
        np.testing.assert_allclose(rebuilt, x.v + x.noise, atol=1e-8)
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    assert k["report"]["overall"]["exclusive"]["mean"] == 0.0  # scratch knows all of it
    # the other-image control decomposes each pair's games together (the fine-tuned and scratch
    # games of the partner with the pre-trained one's), as the same-image games were
    other = k["other_image"]
    assert other["partners"] == [1, 0]
    pairs = joint_and_or_interactions(np.stack([[x.v for x in pre], [ft[1].v, ft[0].v],
                                                [sc[1].v, sc[0].v]]),
                                      qthres=pre[0].meta["params"]["qthres"] or 0.04)
    control = other_image_control([_on(x, y) for x, y in zip(pairs[0], pre, strict=True)],
                                  [_on(x, y) for x, y in zip(pairs[1], ft[::-1], strict=True)])
    assert other["overall"]["preserve"] == control["preserve"].to_dict()
    assert other["overall"]["new"] == control["new"].to_dict()
    # the two images share less than each image with itself
    assert other["overall"]["preserve"]["mean"] < k["report"]["overall"]["preserve"]["mean"]
    assert f"(chance {k['report']['chance']['preserve']['mean']:.3f}, other image " \
        f"{other['overall']['preserve']['mean']:.3f})" in out


def _on(x, game):
    """Interactions ``x`` with the info of the game ``game`` (the sample it explains)."""
    return dataclasses.replace(x, info=game.info)


def _sha256(path):
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _interactions(folder):
    return [load(f) for f in sorted(folder.glob("interactions-*.safetensors"))]


def _forget_identity(marker):
    """Make the marker of an explanation or analysis folder read as an earlier version wrote it,
    without the record of its settings and inputs: such a folder is rerun with any settings."""
    record = json.loads(marker.read_text())
    del record["identity"]
    marker.write_text(json.dumps(record))


def test_a_rerun_with_other_settings_or_inputs_is_refused_and_leaves_the_folder_as_it_was(
        tmp_path, capsys):
    model = _classifier(tmp_path / "a.safetensors", 10, seed=0)
    other = _classifier(tmp_path / "b.safetensors", 10, seed=1)
    explain = [*_explain_argv(model), "--out", tmp_path / "x"]
    assert _run(capsys, *explain)[0] == 0
    before = _contents(tmp_path / "x")
    for change, differs in ((["--samples", 1], "; samples: 2 before, 1 now)"),
                            (["--weights", other], "(models.model.state: \"sha256:"),
                            (["--tau", 0.1], "(tau: 0.05 before, 0.1 now)")):
        rc, out, err = _run(capsys, *explain, *change)
        assert rc == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"pretrain-reuse: error: out (--out) {str(tmp_path / 'x')!r} holds an "
                              "explanation run made with other settings or inputs "), err
        assert differs in err, err
        assert err.endswith("; rerun with the same settings to reuse it, or pass another --out, "
                            "or remove the folder\n"), err
        assert _contents(tmp_path / "x") == before
    assert _run(capsys, *explain, "--batch-size", 7)[0] == 0  # the same settings: reused
    assert len(_interactions(tmp_path / "x")) == 2
    knowledge = ["knowledge", "--model", "smallcnn-s", "--pretrained", model, "--finetuned", model,
                 "--data", "synthetic:target", "--players", "grid:2x2", "--samples", 2, "--quiet",
                 "--out", tmp_path / "k"]
    assert _run(capsys, *knowledge)[0] == 0
    summary = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    before = _contents(tmp_path / "k")
    for change, differs in ((["--scratch", other], "(models.scratch: null before, {"),
                            (["--match", "signed"], "(match: \"support\" before, \"signed\" now)")):
        rc, out, err = _run(capsys, *knowledge, *change)
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert "holds a knowledge analysis made with other settings or inputs " + differs in err, err
        assert f"pass another --out (with --games-from {tmp_path / 'k'} to take the games" in err
        assert _contents(tmp_path / "k") == before
    assert _run(capsys, *knowledge)[0] == 0
    assert json.loads((tmp_path / "k" / "knowledge.json").read_text())["report"] == summary["report"]
    # a folder that holds no analysis's games would silently compute every game again
    rc, _, err = _run(capsys, *knowledge[:-1], tmp_path / "k3", "--games-from", tmp_path / "none")
    assert rc == 2 and f"(--games-from) {tmp_path / 'none'} holds no games of a knowledge analysis" in err
    assert not (tmp_path / "k3").exists()
    # another tau into a new folder, with the games of the first: none is computed again
    rc, _, err = _run(capsys, *knowledge[:-1], tmp_path / "k2", "--tau", 0.2, "--games-from",
                      tmp_path / "k")
    assert rc == 0, err
    for role in ("pretrained", "finetuned"):
        games = sorted((tmp_path / "k2" / role / "games").glob("*.npy"))
        assert len(games) == 2 and all(
            g.samefile(tmp_path / "k" / role / "games" / g.name) for g in games)


def test_games_from_skips_a_damaged_copy_for_the_next_folders_game(tmp_path, capsys):
    model = _classifier(tmp_path / "m.safetensors", 10)
    knowledge = ["knowledge", "--model", "smallcnn-s", "--pretrained", model, "--finetuned", model,
                 "--data", "synthetic:target", "--players", "grid:2x2", "--samples", 2, "--quiet",
                 "--out"]
    assert _run(capsys, *knowledge, tmp_path / "k")[0] == 0
    shutil.copytree(tmp_path / "k", tmp_path / "copy")
    damaged = sorted((tmp_path / "copy" / "finetuned" / "games").glob("*.npy"))[0]
    v = np.load(damaged)
    v[5] += 1.0  # inside the game: its two ends, which the format check reads, stay intact
    np.save(damaged, v)
    rc, _, err = _run(capsys, *knowledge, tmp_path / "k2", "--tau", 0.2,
                      "--games-from", tmp_path / "copy", "--games-from", tmp_path / "k")
    assert rc == 0, err
    for role in ("pretrained", "finetuned"):
        for g in sorted((tmp_path / "k2" / role / "games").glob("*.npy")):
            # the first folder's copy where it is sound, the second's for the damaged one
            bad = role == "finetuned" and g.name == damaged.name
            first = tmp_path / ("k" if bad else "copy") / role / "games" / g.name
            assert g.samefile(first) and g.with_suffix(".json").samefile(first.with_suffix(".json"))
    # a damaged game in the folder itself is replaced by a sound one from --games-from
    (tmp_path / "k2" / "finetuned" / "games" / damaged.name).unlink()  # not written through the link
    np.save(tmp_path / "k2" / "finetuned" / "games" / damaged.name, v)
    assert _run(capsys, *knowledge, tmp_path / "k2", "--tau", 0.2, "--games-from", tmp_path / "k")[0] == 0
    assert (tmp_path / "k2" / "finetuned" / "games" / damaged.name).samefile(
        tmp_path / "k" / "finetuned" / "games" / damaged.name)


def test_a_crash_while_taking_an_earlier_versions_game_leaves_no_damaged_game_trusted(
        tmp_path, capsys, monkeypatch):
    # the damaged game's record was removed before the sound game was linked in its place: a
    # crash in between left the damaged game without a record, which the next run trusted as a
    # game of an earlier version
    import pretrain_reuse.knowledge.explain as explain_module

    model = _classifier(tmp_path / "m.safetensors", 10)
    knowledge = ["knowledge", "--model", "smallcnn-s", "--pretrained", model, "--finetuned", model,
                 "--data", "synthetic:target", "--players", "grid:2x2", "--samples", 2, "--quiet",
                 "--tau", 0.2, "--out"]
    assert _run(capsys, *knowledge, tmp_path / "k")[0] == 0
    shutil.copytree(tmp_path / "k", tmp_path / "old")
    for record in (tmp_path / "old").glob("*/games/*.json"):
        record.unlink()  # games of an earlier version, which wrote no records
    game = sorted((tmp_path / "k" / "finetuned" / "games").glob("*.npy"))[0]
    sound = np.load(game)
    damaged = sound.copy()
    damaged[5] += 1.0
    game.unlink()  # not written through a link
    np.save(game, damaged)
    (tmp_path / "k" / "knowledge.json").unlink()  # so that the rerun computes

    def crash(source, path):
        if str(path).endswith(".npy"):
            raise KeyboardInterrupt
        shutil.copyfile(source, path)

    monkeypatch.setattr(explain_module, "link_file", crash)
    rc, _, err = _run(capsys, *knowledge, tmp_path / "k", "--games-from", tmp_path / "old")
    assert rc == 130, err  # interrupted
    monkeypatch.undo()
    assert _run(capsys, *knowledge, tmp_path / "k")[0] == 0
    np.testing.assert_array_equal(np.load(game), sound)


def test_a_rerun_into_a_folder_of_an_earlier_version_with_other_settings_equals_a_fresh_run(
        tmp_path, capsys):
    # the game cache is keyed on what determines a game: another baseline or other weights
    # computed into a used folder give the same games as a fresh folder, not the old ones
    first = _classifier(tmp_path / "a.safetensors", 10, seed=0)
    other = _classifier(tmp_path / "b.safetensors", 10, seed=1)
    common = ["explain", "--model", "smallcnn-s", "--data", "synthetic:target",
              "--players", "grid:2x2", "--samples", 2, "--quiet"]
    reused = tmp_path / "reused"
    assert _run(capsys, *common, "--weights", first, "--out", reused)[0] == 0
    for k, change in enumerate((["--weights", first, "--baseline", "blur"], ["--weights", other])):
        _forget_identity(reused / "explain.json")
        assert _run(capsys, *common, *change, "--out", reused)[0] == 0
        fresh = tmp_path / f"fresh-{k}"
        assert _run(capsys, *common, *change, "--out", fresh)[0] == 0
        for x, y in zip(_interactions(reused), _interactions(fresh), strict=True):
            np.testing.assert_array_equal(x.v, y.v)
            assert x.info == y.info


def test_the_mean_baseline_is_the_datas_mean_whatever_samples_are_explained(tmp_path, capsys):
    # the same sample explained among 3 or among 6 gets the same game, and with every pixel a
    # player v(∅) is the model's output on the mean image of the whole test split
    weights = _classifier(tmp_path / "m.safetensors", 10)
    common = ["explain", "--model", "smallcnn-s", "--weights", weights, "--data",
              "synthetic:target", "--players", "grid:2x2", "--baseline", "mean",
              "--mean-samples", 100_000, "--quiet"]
    assert _run(capsys, *common, "--samples", 3, "--out", tmp_path / "three")[0] == 0
    assert _run(capsys, *common, "--samples", 6, "--out", tmp_path / "six")[0] == 0
    six = {x.info["index"]: x for x in _interactions(tmp_path / "six")}
    for x in _interactions(tmp_path / "three"):
        np.testing.assert_array_equal(x.v, six[x.info["index"]].v)
    model = create_backbone("smallcnn-s", weights=str(weights)).eval()
    data = preprocessed(open_dataset("synthetic:target", split="test"), model.preprocess)
    mean = torch.stack([data.load(i).double() for i in range(len(data))]).mean(0).float()
    with torch.no_grad():
        z = model(mean[None])[0].double()
    for x in six.values():
        y = x.info["label"]
        expected = z[y] - torch.logsumexp(torch.cat([z[:y], z[y + 1:]]), 0)
        assert x.v[0] == pytest.approx(float(expected), abs=1e-5)


def test_grid_cells_are_drawn_per_sample_with_the_seed_and_the_samples_index(tmp_path, capsys):
    # Liu et al. (NeurIPS 2023) seed the draw per sample: 4 of the 4 central cells of a 6x6 grid
    # are chosen again for every sample, by default_rng([seed, index])
    weights = _classifier(tmp_path / "m.safetensors", 10)
    rc, _, err = _run(capsys, "explain", "--model", "smallcnn-s", "--weights", weights, "--data",
                      "synthetic:target", "--players", "grid:6x6", "--n", 4, "--samples", 4,
                      "--seed", 3, "--quiet", "--out", tmp_path / "x")
    assert rc == 0, err
    names = []
    for x in _interactions(tmp_path / "x"):
        pool = [(r, c) for r in range(1, 5) for c in range(1, 5)]
        pick = np.sort(np.random.default_rng([3, x.info["index"]]).choice(16, 4, replace=False))
        assert x.info["player_names"] == [f"cell {pool[i][0]},{pool[i][1]}" for i in pick]
        assert x.info["players"]["seed"] == [3, x.info["index"]]
        names.append(tuple(x.info["player_names"]))
    assert len(set(names)) > 1


def test_the_analysis_reports_neighbouring_players_of_the_cells_drawn_for_each_sample(tmp_path,
                                                                                     capsys):
    # 5 of the 16 central cells of a 6x6 grid per sample, some of them with no drawn neighbour:
    # the adjacency is that of the sample's own cells (sharing an edge, named "cell r,c")
    model = _classifier(tmp_path / "m.safetensors", 10)
    rc, out, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained", model,
                        "--finetuned", model, "--data", "synthetic:target", "--players",
                        "grid:6x6", "--n", 5, "--samples", 3, "--quiet", "--out", tmp_path / "k")
    assert rc == 0, err
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    pre, ft = (_interactions(tmp_path / "k" / role) for role in ("pretrained", "finetuned"))
    adjacency = []
    for x in ft:
        cells = [tuple(map(int, name[5:].split(","))) for name in x.info["player_names"]]
        adjacency.append(np.array([[abs(r - q) + abs(c - d) == 1 for q, d in cells]
                                   for r, c in cells]))
    assert k["contiguity"] == contiguity(knowledge_report(pre, ft), adjacency).to_dict()
    kept = k["contiguity"]["preserve"]
    assert kept["items"] > 0 and k["contiguity"]["new"]["items"] == 0
    preserve = k["report"]["overall"]["preserve"]  # the ratio's standard error over the samples
    chance = k["report"]["chance"]["preserve"]["mean"]  # and its level with random salient sets
    assert "(± standard error over them; chance: the ratio if the other model's salient " in out
    other = k["other_image"]["overall"]["preserve"]["mean"]  # and another image's knowledge
    assert (f"preserve {preserve['mean']:.3f} ± {preserve['sem']:.3f} (chance {chance:.3f}, "
            f"other image {other:.3f})") in out
    assert (f"preserved interactions of neighbouring players {kept['contiguous_share']:.3f} "
            f"(chance {kept['chance_share']:.3f})") in out


def _check_by_hand(xs, weights, background: str, baseline: str = "zero", model: str = "smallcnn-s"):
    """Each game of ``xs`` (grid:4x4 cells of the model's input) is the model's log-odds on every
    coalition's input masked here by hand: the players not in S show the baseline (zero, or
    ``shrink``: each value moved 2 toward 0), the pixels of no player the baseline
    (``baseline``), the image (``original``) or, averaged over the 10 games, a x + (1 - a) b for
    a = 0.1 ... 1.0 (``integrated``)."""
    net = create_backbone(model, weights=str(weights)).eval()
    data = preprocessed(open_dataset("synthetic:target", split="test"), net.preprocess)
    side = net.spec.input_size[0] // 4  # a 4x4 grid
    levels = {"baseline": [0.0], "original": [1.0], "integrated": [k / 10 for k in range(1, 11)]}
    for x in xs:
        assert x.meta["params"]["background"] == background
        image = data.load(x.info["index"])
        b = torch.zeros_like(image)
        if baseline == "shrink":
            b = torch.where(image > 2, image - 2, torch.where(image < -2, image + 2, b))
            assert b.abs().max() > 0.1  # not the zero baseline: the check would not tell them apart
        cells = [tuple(map(int, name[5:].split(","))) for name in x.info["player_names"]]
        for s in range(1 << x.n):
            expected = []
            for a in levels[background]:
                masked = a * image + (1 - a) * b
                for i, (r, c) in enumerate(cells):
                    cell = (slice(None), slice(r * side, (r + 1) * side), slice(c * side, (c + 1) * side))
                    masked[cell] = (image if s >> i & 1 else b)[cell]
                with torch.no_grad():
                    z = net(masked[None])[0].double()
                y = x.info["label"]
                expected.append(float(z[y] - torch.logsumexp(torch.cat([z[:y], z[y + 1:]]), 0)))
            assert x.v[s] == pytest.approx(np.mean(expected), abs=1e-5)


def test_background_original_keeps_the_pixels_of_no_player_in_every_masked_input(tmp_path,
                                                                                capsys):
    # 3 of the 16 cells of a 4x4 grid are players; the other 13 are background: the zero
    # baseline under --background baseline (the default), the image under original
    weights = _classifier(tmp_path / "m.safetensors", 10)
    common = ["--data", "synthetic:target", "--players", "grid:4x4", "--n", 3, "--samples", 2,
              "--quiet"]
    explain = ["explain", "--model", "smallcnn-s", "--weights", weights, *common]
    assert _run(capsys, *explain, "--out", tmp_path / "baseline")[0] == 0
    assert _run(capsys, *explain, "--background", "original", "--out", tmp_path / "original")[0] == 0
    for background in ("baseline", "original"):
        _check_by_hand(_interactions(tmp_path / background), weights, background)
    # the two are different games of the same players, cached apart; a rerun with the other
    # background is another setting, refused naming it
    for x, y in zip(_interactions(tmp_path / "baseline"), _interactions(tmp_path / "original"),
                    strict=True):
        assert x.info["player_names"] == y.info["player_names"] and x.info["game"] != y.info["game"]
        assert np.abs(x.v - y.v).max() > 1e-3
    rc, _, err = _run(capsys, *explain, "--background", "original", "--out", tmp_path / "baseline")
    assert rc == 2 and '(background: "baseline" before, "original" now)' in err, err
    # knowledge takes the same flag for every model it explains
    rc, _, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained", weights,
                      "--finetuned", weights, *common, "--background", "original",
                      "--out", tmp_path / "k")
    assert rc == 0, err
    summary = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    assert summary["meta"]["params"]["background"] == "original"
    for role in ("pretrained", "finetuned"):
        _check_by_hand(_interactions(tmp_path / "k" / role), weights, "original")


def test_the_integrated_background_and_the_shrink_baseline_are_the_games_written_out(tmp_path,
                                                                                     capsys):
    # Li & Zhang's integrated background (10 blends of image and baseline) and Liu et al.'s
    # shrink baseline reach every masked input; another background is refused on rerun. Shrink
    # on a network with ImageNet's normalisation: smallcnn's inputs lie within ±1, where it is zero
    small = _classifier(tmp_path / "m.safetensors", 10)
    torch.manual_seed(0)
    resnet = tmp_path / "resnet.safetensors"
    save_backbone(create_backbone("torchvision:resnet18", num_classes=10), resnet, {})
    base = ["--data", "synthetic:target", "--samples", 2, "--quiet"]
    common = [*base, "--players", "grid:4x4", "--n", 3]
    for model, weights, background, baseline in (("smallcnn-s", small, "integrated", "zero"),
                                                 ("torchvision:resnet18", resnet, "baseline", "shrink")):
        out = tmp_path / f"{background}-{baseline}"
        rc, _, err = _run(capsys, "explain", "--model", model, "--weights", weights, *common,
                          "--background", background, "--baseline", baseline, "--out", out)
        assert rc == 0 and "warning" not in err, err
        _check_by_hand(_interactions(out), weights, background, baseline, model)
    rc, _, err = _run(capsys, "explain", "--model", "smallcnn-s", "--weights", small, *common,
                      "--out", tmp_path / "integrated-zero")
    assert rc == 2 and '(background: "integrated" before, "baseline" now)' in err, err
    # where they change nothing, they say so: smallcnn's inputs; players that cover the image
    for flags, needle in ((["--players", "grid:4x4", "--n", 3, "--baseline", "shrink"],
                           "baseline 'shrink' is the zero baseline on these images: every value "
                           "of the model's normalised input lies within ±2 of 0"),
                          (["--players", "grid:2x2", "--background", "integrated"],
                           "background 'integrated' is 'baseline' on these samples: the players "
                           "cover every pixel")):
        rc, _, err = _run(capsys, "explain", "--model", "smallcnn-s", "--weights", small, *base,
                          *flags, "--out", tmp_path / "same")
        assert rc == 0 and err.count("warning: ") == 1 and needle in err, err
        shutil.rmtree(tmp_path / "same")


def test_joint_decomposition_keeps_the_explain_meta_and_decomposes_checkpoints_alone(tmp_path,
                                                                                    capsys):
    model = _classifier(tmp_path / "m.safetensors", 10)
    (tmp_path / "snaps").mkdir()
    for step, seed in ((1, 1), (2, 0)):  # the last snapshot is the fine-tuned model (seed 0)
        _snapshot(tmp_path / "snaps" / f"step-{step:07d}.safetensors", step, seed=seed)
    rc, _, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained", model,
                      "--finetuned", model, "--checkpoints", tmp_path / "snaps", "--data",
                      "synthetic:target", "--players", "grid:2x2", "--samples", 2,
                      "--decomposition", "joint-and-or", "--quiet", "--out", tmp_path / "k")
    assert rc == 0, err
    for x in _interactions(tmp_path / "k" / "finetuned"):
        assert x.meta["producer"] == "knowledge.explain"
        assert x.meta["params"]["decomposition"] == "joint-and-or"
        assert x.meta["inputs"]["weights"] == str(model)
        assert x.meta["solver"]["producer"] == "pretrain_reuse.knowledge.joint_and_or_interactions"
    for x in _interactions(tmp_path / "k" / "checkpoint-000"):
        assert x.kind == "and-or"
        assert x.meta["solver"]["producer"] == "pretrain_reuse.knowledge.and_or_interactions"
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    assert k["meta"]["checkpoint_decomposition"] == "and-or"


def test_a_smaller_rerun_leaves_no_outputs_of_the_earlier_run(tmp_path, capsys):
    model = _classifier(tmp_path / "m.safetensors", 10)
    (tmp_path / "snaps").mkdir()
    for step, seed in ((1, 1), (2, 0)):  # the last snapshot is the fine-tuned model (seed 0)
        _snapshot(tmp_path / "snaps" / f"step-{step:07d}.safetensors", step, seed=seed)
    explain = ["explain", "--model", "smallcnn-s", "--weights", model, "--data", "synthetic:target",
               "--players", "grid:2x2", "--quiet"]
    assert _run(capsys, *explain, "--samples", 4, "--out", tmp_path / "x")[0] == 0
    _forget_identity(tmp_path / "x" / "explain.json")  # an earlier version's: rerun as asked
    assert _run(capsys, *explain, "--samples", 2, "--out", tmp_path / "x")[0] == 0
    assert _run(capsys, *explain, "--samples", 2, "--out", tmp_path / "fresh")[0] == 0
    assert len(_interactions(tmp_path / "x")) == 2
    for x, y in zip(_interactions(tmp_path / "x"), _interactions(tmp_path / "fresh"), strict=True):
        assert x.info == y.info
    knowledge = ["knowledge", "--model", "smallcnn-s", "--pretrained", model, "--finetuned", model,
                 "--data", "synthetic:target", "--players", "grid:2x2", "--samples", 2, "--quiet",
                 "--out", tmp_path / "k"]
    assert _run(capsys, *knowledge, "--scratch", model, "--checkpoints", tmp_path / "snaps")[0] == 0
    assert {p.name for p in (tmp_path / "k").iterdir()} >= {
        "scratch", "checkpoint-000", "checkpoint-001", "convergence.png"}
    _forget_identity(tmp_path / "k" / "knowledge.json")
    assert _run(capsys, *knowledge)[0] == 0
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        "finetuned", "knowledge.json", "preserved.png", "pretrained", "purity.png", "ratios.png",
        "ratios_by_order.png", "strength_by_order.png"]  # purity.png: the two samples are of one class


def test_a_rerun_stopped_halfway_leaves_a_folder_that_reads_as_unfinished(tmp_path, capsys,
                                                                           monkeypatch):
    import pretrain_reuse.knowledge.analysis as analysis
    from pretrain_reuse import load
    from pretrain_reuse.errors import PretrainReuseError

    model = _classifier(tmp_path / "m.safetensors", 10)
    knowledge = ["knowledge", "--model", "smallcnn-s", "--pretrained", model, "--finetuned", model,
                 "--data", "synthetic:target", "--players", "grid:2x2", "--quiet", "--out", tmp_path / "k"]
    assert _run(capsys, *knowledge, "--samples", 4)[0] == 0
    _forget_identity(tmp_path / "k" / "knowledge.json")  # an earlier version's: rerun as asked
    save = analysis.save_explanations

    def stop_after_the_first_model(xs, model, dataset, cfg, folder, tau):
        save(xs, model, dataset, cfg, folder, tau)
        raise KeyboardInterrupt

    # a rerun with other settings, stopped once the first model's files are rewritten: the
    # folder now mixes the two runs, and must not read as the first, finished one
    monkeypatch.setattr(analysis, "save_explanations", stop_after_the_first_model)
    assert _run(capsys, *knowledge, "--samples", 2)[0] == 130
    for path in (tmp_path / "k", tmp_path / "k" / "finetuned"):  # pretrained/ was rewritten whole
        with pytest.raises(PretrainReuseError, match="has not finished"):
            load(path)
    monkeypatch.setattr(analysis, "save_explanations", save)
    assert _run(capsys, *knowledge, "--samples", 2)[0] == 0
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    assert k["samples"]["n"] == 2 and "finished" not in k
    assert len(_interactions(tmp_path / "k" / "finetuned")) == 2


def test_the_counterfactual_check_reports_the_rank_correlation(tmp_path, capsys):
    # the pairs (measured, predicted) of the preserved sets and of as many random sets, as
    # counterfactual() gives them; their correlations by scipy
    stats = pytest.importorskip("scipy.stats")
    model = _classifier(tmp_path / "m.safetensors", 10)
    rc, _, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained", model,
                      "--finetuned", model, "--data", "synthetic:target", "--players", "grid:2x2",
                      "--samples", 4, "--quiet", "--out", tmp_path / "k")
    assert rc == 0, err
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    rng = np.random.default_rng([0, 13])
    preserved, random = [], []
    for x in _interactions(tmp_path / "k" / "finetuned"):
        sets = sorted(s for s in range(1, 16) if ("and", s) in x.salient(0.05))
        pairs = counterfactual(x, sets, 0.05, rng)
        preserved += pairs["preserved"]
        random += pairs["random"]
    measured, predicted = np.array(preserved + random).T
    cf = k["counterfactual"]
    assert cf["n_sets"] == len(preserved) > 2
    assert cf["prediction_spearman"] == pytest.approx(stats.spearmanr(predicted, measured)[0])
    assert cf["prediction_pearson"] == pytest.approx(stats.pearsonr(predicted, measured)[0])


def test_the_analysis_reports_each_knowledge_set_alone_as_set_ablation_gives_it(tmp_path, capsys):
    # one network in both roles (two random ones agree on no sample): all knowledge preserved
    model = _classifier(tmp_path / "m.safetensors", 10)
    rc, out, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained", model,
                        "--finetuned", model, "--data", "synthetic:target", "--players",
                        "grid:2x2", "--samples", 3, "--quiet", "--out", tmp_path / "k")
    assert rc == 0, err
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    pre, ft = (_interactions(tmp_path / "k" / role) for role in ("pretrained", "finetuned"))
    assert k["ablation"] == set_ablation(knowledge_report(pre, ft), ft).to_dict()
    alone = k["ablation"]["preserve"]
    assert (f"preserved knowledge alone: fidelity R² {alone['fidelity']['mean']:.3f}, share of the "
            f"output {alone['share']['mean']:.3f}") in out
    assert list(k["ablation"]) == ["salient", "preserve", "new"]
    assert k["ablation"]["salient"]["fidelity"]["n_used"] == 3
    assert k["ablation"]["preserve"] == k["ablation"]["salient"] and k["ablation"]["new"]["items"] == 0
    # the pre-trained side: the same network, so all of its knowledge is kept, none dropped
    assert k["ablation_pretrained"] == set_ablation(knowledge_report(pre, ft), pre,
                                                    model="pretrained").to_dict()
    assert list(k["ablation_pretrained"]) == ["salient", "preserve", "discard"]
    assert k["ablation_pretrained"]["discard"]["items"] == 0


def _someone_elses_folder(folder):
    """A folder with files named like the outputs a rerun of explain or knowledge replaces
    (interactions-*, salient.png; checkpoint-*, preserved.png) and the bytes of every file."""
    (folder / "checkpoint-notes").mkdir(parents=True)
    for name in ("salient.png", "interactions-draft.safetensors", "preserved.png",
                 "checkpoint-notes/a.txt", "notes.txt"):
        (folder / name).write_text(f"my {name}")
    return _contents(folder)


def _contents(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _explain_argv(model):
    return ["explain", "--model", "smallcnn-s", "--weights", model, "--data", "synthetic:target",
            "--players", "grid:2x2", "--samples", 2, "--quiet"]


def test_explain_refuses_a_folder_of_someone_elses_and_leaves_it_as_it_was(tmp_path, capsys):
    model = _classifier(tmp_path / "m.safetensors", 10)
    before = _someone_elses_folder(tmp_path / "mine")
    rc, _, err = _run(capsys, *_explain_argv(model), "--out", tmp_path / "mine")
    assert rc == 2 and err.count("\n") == 1
    assert "is not empty and not an explanation run; pass a new or empty folder" in err
    assert _contents(tmp_path / "mine") == before
    # its own folder is its to rewrite: a smaller rerun leaves only its own outputs
    assert _run(capsys, *_explain_argv(model), "--out", tmp_path / "x")[0] == 0
    _forget_identity(tmp_path / "x" / "explain.json")
    assert _run(capsys, *_explain_argv(model), "--samples", 1, "--out", tmp_path / "x")[0] == 0
    assert len(_interactions(tmp_path / "x")) == 1


def test_knowledge_refuses_a_folder_of_someone_elses_and_resumes_its_own(tmp_path, capsys):
    model = _classifier(tmp_path / "m.safetensors", 10)
    knowledge = ["knowledge", "--model", "smallcnn-s", "--pretrained", model, "--finetuned", model,
                 "--data", "synthetic:target", "--players", "grid:2x2", "--samples", 2, "--quiet"]
    before = _someone_elses_folder(tmp_path / "mine")
    rc, _, err = _run(capsys, *knowledge, "--out", tmp_path / "mine")
    assert rc == 2 and err.count("\n") == 1
    assert "is not empty and not a knowledge analysis; pass a new or empty folder" in err
    assert _contents(tmp_path / "mine") == before
    # only files named like an analysis's figures and folders (none an explanation): not its
    (tmp_path / "mine" / "notes.txt").unlink()
    (tmp_path / "mine" / "salient.png").unlink()
    (tmp_path / "mine" / "interactions-draft.safetensors").unlink()
    before = _contents(tmp_path / "mine")
    rc, _, err = _run(capsys, *knowledge, "--out", tmp_path / "mine")
    assert rc == 2 and "is not empty and not a knowledge analysis" in err
    assert _contents(tmp_path / "mine") == before
    # an explain folder is not a knowledge analysis, and the other way round
    assert _run(capsys, *_explain_argv(model), "--out", tmp_path / "x")[0] == 0
    assert "not a knowledge analysis" in _run(capsys, *knowledge, "--out", tmp_path / "x")[2]
    # a run stopped before knowledge.json holds only the models' folders: a rerun resumes it
    assert _run(capsys, *_explain_argv(model), "--out", tmp_path / "k" / "pretrained")[0] == 0
    assert _run(capsys, *knowledge, "--out", tmp_path / "k")[0] == 0
    assert (tmp_path / "k" / "knowledge.json").exists()
    assert "not an explanation run" in _run(capsys, *_explain_argv(model), "--out", tmp_path / "k")[2]


def _explained_with_cache(tmp_path, capsys, samples: int):
    """An explain run into tmp_path/x: its argv, interactions and cached games."""
    model = _classifier(tmp_path / "m.safetensors", 10)
    argv = ["explain", "--model", "smallcnn-s", "--weights", model, "--data", "synthetic:target",
            "--players", "grid:2x2", "--samples", samples, "--quiet", "--out", tmp_path / "x"]
    assert _run(capsys, *argv)[0] == 0
    return argv, _interactions(tmp_path / "x"), sorted((tmp_path / "x" / "games").glob("*.npy"))


def test_a_corrupt_cached_game_is_computed_again(tmp_path, capsys):
    # the game cache is a cache: a truncated file, random bytes, or an array of another shape
    # or dtype is recomputed and written over, and the rerun equals the first run
    argv, first, games = _explained_with_cache(tmp_path, capsys, samples=4)
    assert len(games) == 4
    games[0].write_bytes(games[0].read_bytes()[:100])
    games[1].write_bytes(np.random.default_rng(0).bytes(300))
    np.save(games[2], np.zeros(3))
    np.save(games[3], np.load(games[3]).astype(np.float32))
    rc, _, err = _run(capsys, *argv)
    assert rc == 0, err
    for x, y in zip(first, _interactions(tmp_path / "x"), strict=True):
        np.testing.assert_array_equal(x.v, y.v)
    by_name = {x.info["game"]: x.v for x in first}
    for path in games:
        stored = np.load(path, allow_pickle=False)
        np.testing.assert_array_equal(stored, by_name[path.stem.split("-")[1]])
        assert stored.dtype == np.float64


@pytest.mark.parametrize("argv,needle", [
    (["--decomposition", "and-or", "--qthres", "-1"], "qthres=-1.0 must be a finite number >= 0"),
    (["--decomposition", "and-or", "--qthres", "nan"], "qthres=nan"),
    # the world's parts are all 9 slots: n would be ignored
    (["--players", "parts", "--n", "4"], "n=4 does not apply to players='parts'"),
])
def test_settings_that_cannot_apply_are_refused_before_any_game(tmp_path, capsys, argv, needle):
    weights = _classifier(tmp_path / "m.safetensors", 10)
    rc, _, err = _run(capsys, "explain", "--model", "smallcnn-s", "--weights", weights, "--data",
                      "synthetic:target", "--players", "grid:2x2", "--samples", 1, "--quiet",
                      "--out", tmp_path / "x", *argv)
    assert rc == 2 and err.count("\n") == 1 and needle in err
    assert not (tmp_path / "x").exists()


def test_a_model_with_nan_outputs_is_refused_naming_the_sample(tmp_path, capsys):
    # outputs that overflow give NaN games: refused on the chosen samples' outputs before
    # anything is written
    rc, _, err = _run(capsys, "explain", "--model", "smallcnn-s", "--weights",
                      _nan_classifier(tmp_path / "nan.safetensors"), "--data", "synthetic:target",
                      "--players", "grid:2x2", "--samples", 2, "--quiet", "--out", tmp_path / "x")
    assert rc == 2 and err.count("\n") == 1
    assert "its output on sample 'target-0/" in err and "is NaN or infinite (2 of the 2" in err
    assert not (tmp_path / "x").exists()


def test_the_python_api_refuses_checkpoints_that_do_not_end_at_the_finetuned_model(tmp_path):
    from pretrain_reuse.knowledge.analysis import analyze_knowledge
    from pretrain_reuse.knowledge.explain import ExplainConfig

    finetuned, other = (create_backbone("smallcnn-s", weights=_snapshot(
        tmp_path / f"{step}.safetensors", step, seed=step)) for step in (1, 2))
    data = open_dataset("synthetic:target", split="test")
    with pytest.raises(PretrainReuseError, match="the last of the 2 checkpoints is not the fine"):
        analyze_knowledge({"pretrained": other, "finetuned": finetuned}, data,
                          ExplainConfig(players="grid:2x2", samples=2), tmp_path / "k",
                          checkpoints=[other, finetuned], progress=False)
    assert not (tmp_path / "k").exists()
    # a model that was never saved records no step: the curve has no x
    with pytest.raises(PretrainReuseError, match=r"checkpoints\[0\] records no training step"):
        analyze_knowledge({"pretrained": other, "finetuned": finetuned}, data,
                          ExplainConfig(players="grid:2x2", samples=2), tmp_path / "k",
                          checkpoints=[create_backbone("smallcnn-s", num_classes=10), finetuned],
                          progress=False)
    assert not (tmp_path / "k").exists()


def test_the_python_api_names_a_path_or_name_given_for_a_loaded_object(tmp_path):
    from pretrain_reuse.knowledge.analysis import analyze_knowledge
    from pretrain_reuse.knowledge.explain import ExplainConfig, explain

    net = create_backbone("smallcnn-s", num_classes=10)
    data = open_dataset("synthetic:target", split="test")
    cfg = ExplainConfig(players="grid:2x2", samples=2)
    with pytest.raises(PretrainReuseError, match="the data must be an ImageDataset or TextDataset, "
                                                 "got str; open it with"):
        explain(net, "synthetic:target", np.arange(2), cfg)
    with pytest.raises(PretrainReuseError, match="the finetuned model must be a Backbone, got str"):
        analyze_knowledge({"pretrained": net, "finetuned": "m.safetensors"}, data, cfg,
                          tmp_path / "k")
    with pytest.raises(PretrainReuseError, match=r"cfg must be an ExplainConfig, got dict; build "
                                                 r"it with ExplainConfig\(\*\*fields\)"):
        explain(net, data, np.arange(2), {"players": "grid:2x2"})
    with pytest.raises(PretrainReuseError, match=r"a role of models='Scratch' is not one of "
                                                 r".*did you mean 'scratch'"):
        analyze_knowledge({"pretrained": net, "finetuned": net, "Scratch": net}, data, cfg,
                          tmp_path / "k")
    # a path that holds no games would silently compute every game again
    (tmp_path / "empty" / "pretrained").mkdir(parents=True)
    with pytest.raises(PretrainReuseError, match=r"games_from \(--games-from\) .*empty holds no games"):
        analyze_knowledge({"pretrained": net, "finetuned": net}, data, cfg, tmp_path / "k",
                          games_from=[tmp_path / "empty"])
    assert not (tmp_path / "k").exists()


def test_games_without_any_effect_give_undefined_entries_not_a_crash(tmp_path):
    # a constant model: v(N) = v(∅) on every sample, so the normalised faithfulness errors and
    # the knowledge ratios are undefined; knowledge.json says so (None, and how many samples)
    from pretrain_reuse.knowledge.analysis import analyze_knowledge
    from pretrain_reuse.knowledge.explain import ExplainConfig

    net = create_backbone("smallcnn-s", num_classes=10)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    data = open_dataset("synthetic:target", split="test")
    with pytest.warns(KnowledgeWarning, match="the pretrained and finetuned models are the same") \
            as caught:
        summary = analyze_knowledge({"pretrained": net, "finetuned": net}, data,
                                    ExplainConfig(players="grid:2x2", samples=2), tmp_path / "k",
                                    progress=False)
    assert caught[0].filename == __file__  # the caller's line, not the package's
    assert summary["other_image"]["overall"]["preserve"]["mean"] is None  # undefined too
    faith = summary["faithfulness"]["finetuned"]
    assert faith["max"] is None and faith["max_over_samples"] is None and faith["undefined"] == 2
    assert summary["report"]["overall"]["preserve"]["mean"] is None
    assert json.loads((tmp_path / "k" / "knowledge.json").read_text())["faithfulness"] == \
        summary["faithfulness"]
    assert (tmp_path / "k" / "ratios.png").exists()


def test_a_constant_model_prints_undefined_ratios_and_errors_instead_of_crashing(tmp_path, capsys):
    net = create_backbone("smallcnn-s", num_classes=10)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    save_backbone(net, tmp_path / "zero.safetensors", {"test": "constant"})
    common = ["--model", "smallcnn-s", "--data", "synthetic:target", "--players", "grid:2x2",
              "--samples", "2", "--quiet"]
    rc, out, err = _run(capsys, "knowledge", *common, "--pretrained", tmp_path / "zero.safetensors",
                        "--finetuned", tmp_path / "zero.safetensors", "--out", tmp_path / "k")
    assert rc == 0, err
    assert "preserve n/a, discard n/a" in out
    rc, out, err = _run(capsys, "explain", *common, "--weights", tmp_path / "zero.safetensors",
                        "--out", tmp_path / "e")
    assert rc == 0, err
    assert "(tau=0.05, in units of |v(N) - v(∅)|): undefined" in out and "nan" not in out


def test_explain_refuses_a_bad_tau_before_any_game(tmp_path, capsys):
    rc, _, err = _run(capsys, "explain", "--model", "smallcnn-s", "--data", "synthetic:target",
                      "--tau", "1.5", "--quiet", "--out", tmp_path / "e")
    assert rc == 2 and "tau=1.5 must be a relative threshold" in err and err.count("\n") == 1
    assert not (tmp_path / "e").exists()


def _nan_classifier(path):
    """A classifier whose outputs are NaN: weights near float32's largest value overflow (weights
    that are NaN themselves are refused when the file is read)."""
    net = create_backbone("smallcnn-s", num_classes=10)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(3e38)
    save_backbone(net, path, {})
    return path


def test_an_unreadable_image_is_passed_over_as_every_command_skips_it(tmp_path, capsys):
    """It was refused when the seed happened to draw it, and always once every readable image
    was needed (--samples 4 of 4)."""
    from pretrain_reuse.data import open_dataset
    from pretrain_reuse.knowledge.explain import choose_samples

    (_image_folder(tmp_path / "imgs", per_class=3) / "c1" / "1.png").write_bytes(b"not a png")
    data = open_dataset(tmp_path / "imgs")
    bad = data.ids.index("c1/1.png")
    for seed in range(4):
        chosen = choose_samples(data, 5, seed)
        assert bad not in chosen and len(chosen) == 5  # the 5 readable ones, whatever the seed
    weights = _classifier(tmp_path / "m2.safetensors", 2)
    rc, out, err = _run(capsys, "explain", "--model", "smallcnn-s", "--weights", weights, "--data",
                        tmp_path / "imgs", "--samples", 6, "--out", tmp_path / "x")
    assert rc == 0 and out.startswith("explained 5 samples")
    assert "note: 5 of the 6 samples asked for are readable images; explained those" in err
    (tmp_path / "imgs" / "c0" / "0.png").write_bytes(b"")
    for name in ("0.png", "2.png"):
        (tmp_path / "imgs" / "c1" / name).write_bytes(b"")
    for name in ("1.png", "2.png"):
        (tmp_path / "imgs" / "c0" / name).write_bytes(b"")
    with pytest.raises(PretrainReuseError, match="none of the 6 samples drawn from"):
        choose_samples(open_dataset(tmp_path / "imgs"), 2, 0)


@pytest.mark.parametrize("argv,needle", [
    # a model with NaN weights is named, whichever role it plays: an all-NaN output is not
    # "correct" for class 0 (argmax of NaN), nor are the other models explained first
    (["--scratch", "NAN"], "scratch smallcnn-s: its output on sample"),
    (["--pretrained", "NAN"], "pretrained smallcnn-s: its output on sample"),
    # a model over other classes is named, not reported as classifying nothing correctly
    (["--pretrained", "M12"], "pretrained smallcnn-s: the model outputs 12 classes but the data has 10"),
    # players that do not fit the models' input are refused before the first model is explained
    (["--players", "grid:33x1", "--n", "3"], "grid 33x1 does not fit an input of 32x32 pixels"),
])
def test_knowledge_checks_every_model_before_writing_anything(tmp_path, capsys, argv, needle):
    same = _classifier(tmp_path / "m.safetensors", 10)
    files = {"NAN": _nan_classifier(tmp_path / "nan.safetensors"),
             "M12": _classifier(tmp_path / "m12.safetensors", 12)}
    # the later of a repeated flag wins: argv overrides these
    rc, _, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained", same,
                      "--finetuned", same, "--data", "synthetic:target", "--players", "grid:2x2",
                      "--samples", 2, "--quiet", "--out", tmp_path / "k",
                      *[files.get(a, a) for a in argv])
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "k").exists()


def test_discrimination_power_is_not_printed_or_drawn_for_a_class_of_one_sample(tmp_path, capsys):
    # the purity of a single sample's interactions is 1 whatever they are: not a finding
    same = _classifier(tmp_path / "m.safetensors", 10)
    knowledge = ["knowledge", "--model", "smallcnn-s", "--pretrained", same, "--finetuned", same,
                 "--data", "synthetic:target", "--players", "grid:2x2", "--quiet", "--out", tmp_path / "k"]
    rc, out, err = _run(capsys, *knowledge, "--samples", 2)
    assert rc == 0, err
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    assert list(k["samples"]["per_class"].values()) == [2]
    assert (tmp_path / "k" / "purity.png").exists()
    assert "discrimination power preserve 1.000, discard n/a, new n/a" in out  # the same model twice
    _forget_identity(tmp_path / "k" / "knowledge.json")
    rc, out, err = _run(capsys, *knowledge, "--samples", 1)
    assert rc == 0, err
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    assert list(k["samples"]["per_class"].values()) == [1]
    # the class's own purity is recorded; the mean over classes of two samples or more has none
    assert list(k["discrimination"]["preserve"]["by_class"].values()) == [
        {"purity": 1.0, "n_samples": 1}]
    assert k["discrimination"]["preserve"]["purity"] is None
    assert "discrimination power n/a (no class has two samples" in out
    assert not (tmp_path / "k" / "purity.png").exists()  # the earlier run's figure is removed


def _image_folder(root, classes: int = 2, per_class: int = 2):
    from PIL import Image

    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for k in range(per_class):
            Image.new("RGB", (32, 32), (60 * k, 90 * c, 0)).save(root / f"c{c}" / f"{k}.png")
    return root


def test_outputs_record_the_split_tau_and_resolved_data_path(tmp_path, capsys, monkeypatch):
    weights = _classifier(tmp_path / "m.safetensors", 10)
    rc, _, err = _run(capsys, "explain", "--model", "smallcnn-s", "--weights", weights, "--data",
                      "synthetic:target", "--split", "train", "--players", "grid:2x2", "--samples",
                      1, "--tau", 0.2, "--quiet", "--out", tmp_path / "x")
    assert rc == 0, err
    x = load(tmp_path / "x" / "interactions-0000.safetensors")
    assert x.meta["params"]["split"] == "train" and x.meta["params"]["tau"] == 0.2
    assert x.meta["inputs"]["data"] == "synthetic:target-0" and x.meta["inputs"]["data_path"] is None
    rc, _, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained", weights,
                      "--finetuned", weights, "--data", "synthetic:target", "--players", "grid:2x2",
                      "--samples", 1, "--quiet", "--out", tmp_path / "k")
    assert rc == 0, err
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    assert k["kind"] == "knowledge-report" and k["meta"]["params"]["split"] == "test"
    # an image folder given relative to the working directory is recorded by its absolute path
    _image_folder(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    two = _classifier(tmp_path / "m2.safetensors", 2)
    rc, _, err = _run(capsys, "explain", "--model", "smallcnn-s", "--weights", two, "--data",
                      "imgs", "--players", "grid:2x2", "--samples", 1, "--quiet", "--out", "e")
    assert rc == 0, err
    x = load(tmp_path / "e" / "interactions-0000.safetensors")
    assert x.meta["inputs"]["data_path"] == str((tmp_path / "imgs").resolve())
    assert x.meta["params"]["split"] is None


def test_knowledge_screens_until_it_has_the_samples_asked(tmp_path):
    from pretrain_reuse.knowledge.analysis import analyze_knowledge
    from pretrain_reuse.knowledge.explain import ExplainConfig

    torch.manual_seed(0)
    net = create_backbone("smallcnn-s", num_classes=10)
    data = open_dataset("synthetic:target", split="test")
    # 3 samples screened at a time: a model right on ~1 in 10 needs many rounds for 4 samples
    with pytest.warns(KnowledgeWarning, match="same network"):
        summary = analyze_knowledge({"pretrained": net, "finetuned": net}, data,
                                    ExplainConfig(players="grid:2x2", samples=4), tmp_path / "k",
                                    candidates=3, progress=False)
    assert summary["samples"]["n"] == 4 and summary["samples"]["screened"] > 3
    for i in summary["samples"]["ids"]:
        k = data.ids.index(i)
        x = preprocessed(data, net.preprocess).load(k)
        assert int(net(x[None]).argmax()) == data.labels[k]


@pytest.mark.parametrize("call,needle", [
    (lambda api: api["explain"](np.array([10**6])), "indices (shape (1,), dtype int64, range"),
    (lambda api: api["explain"](np.array([], int)), "non-empty 1-D array"),
    (lambda api: api["explain"](np.array([0.5])), "integer sample positions"),
    (lambda api: api["cfg"](n="4"), "n must be an integer or None, got '4'"),
    (lambda api: api["cfg"](samples=None), "samples must be an integer, got None"),
    (lambda api: api["cfg"](seed=-1), "seed must be an integer in [0, 2**63)"),
    (lambda api: api["cfg"](players="grid:3x3", n=12), "n=12 players but the 3x3 grid has 9 cells"),
    (lambda api: api["cfg"](background="outside"),
     "background='outside' is not one of 'baseline', 'original'"),
    (lambda api: api["cfg"](players="tokens", background="baseline"),
     "background='baseline' does not apply to players=tokens"),
    (lambda api: api["knowledge"](candidates=0), "candidates=0 must be an integer >= 1"),
])
def test_api_misuse_raises_one_line_errors(tmp_path, call, needle):
    from pretrain_reuse.errors import PretrainReuseError
    from pretrain_reuse.knowledge.analysis import analyze_knowledge
    from pretrain_reuse.knowledge.explain import ExplainConfig, explain

    net = create_backbone("smallcnn-s", num_classes=10)
    data = open_dataset("synthetic:target", split="test")
    cfg = ExplainConfig(players="grid:2x2", samples=1)
    api = {"explain": lambda idx: explain(net, data, idx, cfg, tmp_path / "x", progress=False),
           "cfg": lambda **kw: ExplainConfig(**kw),
           "knowledge": lambda **kw: analyze_knowledge({"pretrained": net, "finetuned": net}, data,
                                                       cfg, tmp_path / "x", progress=False, **kw)}
    with pytest.raises(PretrainReuseError) as e:
        call(api)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()


def test_the_same_network_in_two_roles_is_a_warning(tmp_path, capsys):
    # vanilla fine-tuning without --weights is a scratch run: "finetuned" and "scratch" then
    # know exactly the same, which the ratios would report without a word
    model = _classifier(tmp_path / "m.safetensors", 10)
    copy = tmp_path / "copy.safetensors"  # another file, the same weights
    copy.write_bytes(model.read_bytes())
    rc, _, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained", model,
                      "--finetuned", copy, "--data", "synthetic:target", "--players", "grid:2x2",
                      "--samples", 1, "--out", tmp_path / "k")
    assert rc == 0, err
    assert ("warning: the pretrained and finetuned models are the same network (equal weights), "
            "so their knowledge is identical; check --pretrained and --finetuned") in err


KNOWLEDGE_2X2 = ["knowledge", "--model", "smallcnn-s", "--data", "synthetic:target", "--players",
                 "grid:2x2", "--samples", 2]


def test_checkpoints_are_ordered_by_the_step_they_record_not_by_name(tmp_path, capsys):
    # file names in another order than the steps (the reviewer's a/b/c/z copies of steps
    # 33, 11, 22, 44): the curve runs over the recorded steps and ends at the final model
    final = _classifier(tmp_path / "final.safetensors", 10, seed=0)
    (tmp_path / "snaps").mkdir()
    for name, step, seed in (("a", 33, 3), ("b", 11, 1), ("c", 22, 2), ("z", 44, 0)):
        _snapshot(tmp_path / "snaps" / f"{name}.safetensors", step, seed)
    rc, _, err = _run(capsys, *KNOWLEDGE_2X2, "--pretrained", final, "--finetuned", final,
                      "--checkpoints", tmp_path / "snaps", "--quiet", "--out", tmp_path / "k")
    assert rc == 0, err
    curve = json.loads((tmp_path / "k" / "knowledge.json").read_text())["convergence"]
    assert curve["steps"] == [11, 22, 33, 44]
    assert [c["step"] for c in curve["checkpoints"]] == [11, 22, 33, 44]
    assert [c["weights"] for c in curve["checkpoints"]] == [
        str(tmp_path / "snaps" / f"{name}.safetensors") for name in "bcaz"]
    assert curve["similarity"][-1] == 1.0  # the last point is the final model itself
    # and each point is its snapshot's: the IoU of its own interactions with the final ones
    final_sets = [knowledge_set(x) for x in _interactions(tmp_path / "k" / "checkpoint-003")]
    for t, s in enumerate(curve["similarity"]):
        ious = [len(a.keys() & b.keys()) / len(a.keys() | b.keys()) for a, b in zip(
            (knowledge_set(x) for x in _interactions(tmp_path / "k" / f"checkpoint-{t:03d}")),
            final_sets, strict=True)]
        assert s == pytest.approx(np.mean(ious))
    assert [load(f).meta["inputs"]["step"] for f in sorted(
        (tmp_path / "k").glob("checkpoint-*/interactions-0000.safetensors"))] == [11, 22, 33, 44]


@pytest.mark.parametrize("snapshots,needle", [
    # (file name, step, seed, run); the fine-tuned model is seed 0
    ([("a", 1, 1, "sha256:run-a"), ("b", None, 0, "sha256:run-a")],
     "checkpoints (--checkpoints): b.safetensors records no training step"),
    ([("a", 1, 1, "sha256:run-a"), ("b", 1, 2, "sha256:run-a"), ("c", 2, 0, "sha256:run-a")],
     "a.safetensors and b.safetensors both record step 1"),
    ([("a", 1, 1, "sha256:run-a"), ("b", 1, 2, "sha256:run-b"), ("c", 2, 0, "sha256:run-b")],
     "checkpoints (--checkpoints) mix the snapshots of several runs (a.safetensors: run "
     "sha256:run-a; b.safetensors: run sha256:run-b)"),
    ([("a", 1, 1, None), ("b", 2, 2, "sha256:run-a"), ("c", 3, 0, "sha256:run-b")],
     "mix the snapshots of several runs (b.safetensors: run sha256:run-a; c.safetensors: run "
     "sha256:run-b)"),
])
def test_snapshots_without_a_step_of_the_same_step_or_of_two_runs_are_refused(
        tmp_path, capsys, snapshots, needle):
    final = _classifier(tmp_path / "final.safetensors", 10, seed=0)
    (tmp_path / "snaps").mkdir()
    for name, step, seed, run in snapshots:
        path = tmp_path / "snaps" / f"{name}.safetensors"
        _snapshot(path, step, seed, run) if step else _classifier(path, 10, seed)
    rc, _, err = _run(capsys, *KNOWLEDGE_2X2, "--pretrained", final, "--finetuned", final,
                      "--checkpoints", tmp_path / "snaps", "--quiet", "--out", tmp_path / "k")
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "k").exists()


def test_snapshots_of_an_earlier_version_are_read_with_a_warning(tmp_path, capsys):
    # snapshots that record only their step (no run): still read, in step order, and the
    # command says what it could not check
    final = _classifier(tmp_path / "final.safetensors", 10, seed=0)
    (tmp_path / "snaps").mkdir()
    for name, step, seed in (("x", 2, 0), ("y", 1, 1)):
        _snapshot(tmp_path / "snaps" / f"{name}.safetensors", step, seed, run=None)
    rc, _, err = _run(capsys, *KNOWLEDGE_2X2, "--pretrained", final, "--finetuned", final,
                      "--checkpoints", tmp_path / "snaps", "--out", tmp_path / "k")
    assert rc == 0, err
    assert ("warning: the checkpoints record no run (snapshots of an earlier version): that they "
            "are one run's is checked only by their steps and by the last being the finetuned "
            "model\n") in err
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    assert k["convergence"]["steps"] == [1, 2]


def test_snapshots_of_a_run_resumed_by_this_version_are_read_with_a_warning(tmp_path, capsys):
    # a run started by an earlier version and resumed by this one: its first snapshots record
    # no run, the later ones do; they are one run's, not several
    final = _classifier(tmp_path / "final.safetensors", 10, seed=0)
    (tmp_path / "snaps").mkdir()
    for name, step, seed, run in (("x", 1, 1, None), ("y", 2, 2, "sha256:run-a"),
                                  ("z", 3, 0, "sha256:run-a")):
        _snapshot(tmp_path / "snaps" / f"{name}.safetensors", step, seed, run)
    rc, _, err = _run(capsys, *KNOWLEDGE_2X2, "--pretrained", final, "--finetuned", final,
                      "--checkpoints", tmp_path / "snaps", "--out", tmp_path / "k")
    assert rc == 0, err
    assert ("warning: 1 of the 3 checkpoints (x.safetensors) record no run (snapshots of an "
            "earlier version, before the run was resumed)") in err
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    assert k["convergence"]["steps"] == [1, 2, 3]


def test_a_fine_tuning_run_records_its_identity_in_every_snapshot(tmp_path, capsys):
    pre = _classifier(tmp_path / "pre.safetensors", 10)
    run = tmp_path / "run"
    assert _run(capsys, "finetune", "--model", "smallcnn-s", "--weights", pre, "--target",
                "synthetic:target", "--max-steps", 2, "--batch-size", 8, "--eval-every", 1,
                "--snapshots", "--quiet", "--out", run)[0] == 0
    snaps = sorted((run / "snapshots").glob("*.safetensors"))
    identity = _sha256(run / "run.json")
    metas = [json.loads(safetensors_header(f)["meta"]) for f in snaps]
    assert [(m["step"], m["run"]) for m in metas] == [(int(f.stem.split("-")[1]), identity)
                                                      for f in snaps]
    # and, as every artifact, what made it: producer, settings, seed, inputs and versions (it
    # recorded the step and the run alone)
    final = json.loads(safetensors_header(run / "model.safetensors")["meta"])
    for m in metas:
        assert m["producer"] == "finetune.snapshot" and m["seed"] == 0
        assert m["params"] == final["params"] and m["inputs"] == final["inputs"]
        assert m["version"] == final["version"] and m["environment"] == final["environment"]


def test_the_roles_take_every_mode_of_finetune_once():
    # knowledge may not import finetune: its table of modes must follow finetune's
    from pretrain_reuse.finetune import MODES
    from pretrain_reuse.knowledge.analysis import ROLE_MODES

    modes = [m for ms in ROLE_MODES.values() for m in ms]
    assert sorted(modes) == sorted(MODES)


def _finetuned_as(path, mode: str, shift: int):
    """A classifier whose file records that finetune trained it in ``mode``: one network with
    its weights shifted by ``shift`` x 1e-4, so that the models differ but agree on samples."""
    torch.manual_seed(0)
    net = create_backbone("smallcnn-s", num_classes=10)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1e-4 * shift)
    save_backbone(net, path, {"producer": "finetune", "params": {"mode": mode}})
    return path


def test_models_not_given_by_role_are_one_line(tmp_path):
    # a list of models failed with "AttributeError: 'list' object has no attribute 'keys'"
    model = create_backbone("smallcnn-s", num_classes=10)
    with pytest.raises(PretrainReuseError, match="models must be a dict of the roles' models, "
                                                 r"\{'pretrained': ..., 'finetuned': ..., 'scratch': "
                                                 r"...\}, got list"):
        analyze_knowledge([model, model], open_dataset("synthetic:target", split="test"),
                          ExplainConfig(players="grid:2x2", samples=1), tmp_path / "k")
    assert not (tmp_path / "k").exists()


def test_swapped_roles_are_a_warning_in_the_cli_and_the_api(tmp_path, capsys):
    probe = _finetuned_as(tmp_path / "probe.safetensors", "linear-probe", 1)
    tuned = _finetuned_as(tmp_path / "tuned.safetensors", "reuse", 2)
    scratch = _finetuned_as(tmp_path / "scratch.safetensors", "scratch", 3)
    argv = [*KNOWLEDGE_2X2, "--out", tmp_path / "k"]
    # the right roles: not a word
    rc, _, err = _run(capsys, *argv, "--pretrained", probe, "--finetuned", tuned, "--scratch",
                      scratch, "--quiet")
    assert rc == 0 and err == "", err
    rc, _, err = _run(capsys, *argv, "--pretrained", probe, "--finetuned", tuned, "--scratch",
                      scratch)
    assert rc == 0 and "warning" not in err
    argv = [*KNOWLEDGE_2X2, "--out", tmp_path / "swapped"]  # other models: another folder
    # --quiet silenced these warnings too, though it promises that warnings still print
    rc, _, err = _run(capsys, *argv, "--pretrained", tuned, "--finetuned", probe, "--scratch",
                      probe, "--quiet")
    assert rc == 0
    warned = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warned == [
        "warning: the finetuned and scratch models are the same network (equal weights), so "
        "their knowledge is identical; check --finetuned and --scratch",
        f"warning: the pretrained model {str(tuned)!r} was trained in mode 'reuse', but the "
        "pretrained role takes mode linear-probe; are the roles swapped? (check --pretrained)",
        f"warning: the finetuned model {str(probe)!r} was trained in mode 'linear-probe', but "
        "the finetuned role takes mode vanilla or reuse or reuse-unlabeled or co-tuning; are the "
        "roles swapped? (check --finetuned)",
        f"warning: the scratch model {str(probe)!r} was trained in mode 'linear-probe', but the "
        "scratch role takes mode scratch; are the roles swapped? (check --scratch)"]
    models = {"pretrained": create_backbone("smallcnn-s", weights=tuned),
              "finetuned": create_backbone("smallcnn-s", weights=probe)}
    with pytest.warns(KnowledgeWarning) as record:
        analyze_knowledge(models, open_dataset("synthetic:target", split="test"),
                          ExplainConfig(players="grid:2x2", samples=2), tmp_path / "api",
                          progress=False)
    assert [str(w.message) for w in record] == [line.removeprefix("warning: ")
                                                for line in warned[1:3]]


def test_a_damaged_or_incomplete_analysis_is_recomputed_by_a_rerun(tmp_path, capsys):
    # a truncated interactions file, a deleted one, then no knowledge.json either: the folder
    # is still the analysis's, and a rerun writes it again as it was
    model = _classifier(tmp_path / "m.safetensors", 10)
    scratch = _classifier(tmp_path / "s.safetensors", 10, seed=0)  # the same weights, another file
    argv = [*KNOWLEDGE_2X2, "--pretrained", model, "--finetuned", model, "--scratch", scratch,
            "--quiet", "--out", tmp_path / "k"]
    assert _run(capsys, *argv)[0] == 0
    first = {role: _interactions(tmp_path / "k" / role) for role in ("pretrained", "finetuned")}
    summary = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    assert load_analysis(tmp_path / "k")[0] == summary
    damaged = tmp_path / "k" / "finetuned" / "interactions-0001.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:300])
    (tmp_path / "k" / "finetuned" / "explain.json").unlink()  # its folder is still the analysis's
    assert load_analysis(tmp_path / "k") is None
    rc, _, err = _run(capsys, *argv)
    assert rc == 0, err
    assert load_analysis(tmp_path / "k") is not None
    (tmp_path / "k" / "pretrained" / "interactions-0000.safetensors").unlink()
    assert load_analysis(tmp_path / "k") is None
    (tmp_path / "k" / "knowledge.json").unlink()
    rc, _, err = _run(capsys, *argv)
    assert rc == 0, err
    _, explained = load_analysis(tmp_path / "k")
    for role, xs in first.items():
        for x, y in zip(xs, explained[role], strict=True):
            np.testing.assert_array_equal(x.and_values, y.and_values)
    again = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    assert again["report"] == summary["report"] and again["samples"] == summary["samples"]


def test_an_analysis_of_an_earlier_version_is_recomputed_by_a_rerun(tmp_path, capsys):
    # its knowledge.json lacks an entry this version writes (the report reads it): a demo
    # rerun on its folder must recompute it, not skip it and then fail in the report
    model = _classifier(tmp_path / "m.safetensors", 10)
    (tmp_path / "snaps").mkdir()
    _snapshot(tmp_path / "snaps" / "a.safetensors", 1, 0)
    argv = [*KNOWLEDGE_2X2, "--pretrained", model, "--finetuned", model, "--checkpoints",
            tmp_path / "snaps", "--quiet", "--out", tmp_path / "k"]
    assert _run(capsys, *argv)[0] == 0
    summary = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    assert load_analysis(tmp_path / "k") is not None
    del summary["convergence"]["steps"]
    (tmp_path / "k" / "knowledge.json").write_text(json.dumps(summary))
    assert load_analysis(tmp_path / "k") is None
    assert _run(capsys, *argv)[0] == 0
    assert load_analysis(tmp_path / "k")[0]["convergence"]["steps"] == [1]
    # nor one without the chance levels or the other-image control (a demo rerun read them)
    for entry in ("chance", "other_image"):
        summary = json.loads((tmp_path / "k" / "knowledge.json").read_text())
        del (summary["report"] if entry == "chance" else summary)[entry]
        (tmp_path / "k" / "knowledge.json").write_text(json.dumps(summary))
        assert load_analysis(tmp_path / "k") is None
        assert _run(capsys, *argv)[0] == 0
        again = load_analysis(tmp_path / "k")[0]
        assert entry in (again["report"] if entry == "chance" else again)


def test_a_cached_game_that_is_not_the_models_is_computed_again(tmp_path, capsys):
    # a valid .npy of the right shape and dtype, but not the model's game (zeroed, or another
    # model's values): its v(N) and v(∅) differ from two forward passes, so it is redone; one
    # whose ends are intact but a value inside changed differs from the content hash recorded
    # beside it, and is redone too; the games that are the model's are reused as they are (not
    # written again), also one of an earlier version that records no hash, whose record is
    # then written
    argv, first, games = _explained_with_cache(tmp_path, capsys, samples=5)
    np.save(games[0], np.zeros(16))
    np.save(games[1], np.load(games[1]) + 0.5)
    inside = np.load(games[3])
    inside[5] += 0.5
    np.save(games[3], inside)
    games[4].with_suffix(".json").unlink()
    stamp = 1_000_000_000_000_000_000
    for path in (games[2], games[4]):
        os.utime(path, ns=(stamp, stamp))
    assert _run(capsys, *argv)[0] == 0
    for x, y in zip(first, _interactions(tmp_path / "x"), strict=True):
        np.testing.assert_array_equal(x.v, y.v)
    by_name = {x.info["game"]: x.v for x in first}
    for path in games:
        np.testing.assert_array_equal(np.load(path), by_name[path.stem.split("-")[1]])
    assert games[2].stat().st_mtime_ns == games[4].stat().st_mtime_ns == stamp
    record = json.loads(games[4].with_suffix(".json").read_text())
    assert record == {"game_sha256": hash_array(np.load(games[4]))}


@pytest.mark.parametrize("trained", [["c1", "c0"], ["c0", "c1"]])
def test_data_is_matched_to_the_classes_the_model_was_trained_on_by_name(tmp_path, capsys,
                                                                         trained):
    """A run's test folder numbers its classes in sorted order, its list file (classes.txt) in
    another: each image is explained as the model's class of its folder's name."""
    import json as _json

    _image_folder(tmp_path / "imgs")
    weights = _classifier(tmp_path / "m.safetensors", 2,
                          meta={"producer": "finetune", "inputs": {"class_names": _json.dumps(trained)}})
    rc, _, err = _run(capsys, "explain", "--model", "smallcnn-s", "--weights", weights, "--data",
                      tmp_path / "imgs", "--samples", 4, "--quiet", "--out", tmp_path / "x")
    assert rc == 0, err
    explained = _interactions(tmp_path / "x")
    assert len(explained) == 4
    for x in explained:
        folder = x.info["sample"].split("/")[0]
        assert x.info["class"] == folder and x.info["label"] == trained.index(folder), x.info


def test_data_of_classes_the_model_was_not_trained_on_is_refused(tmp_path, capsys):
    """As many classes is not the same classes: every label would explain another class."""
    import json as _json

    _image_folder(tmp_path / "imgs")
    weights = _classifier(tmp_path / "m.safetensors", 2, meta={
        "producer": "finetune", "inputs": {"class_names": _json.dumps(["c0", "cat"])}})
    rc, _, err = _run(capsys, "explain", "--model", "smallcnn-s", "--weights", weights, "--data",
                      tmp_path / "imgs", "--samples", 2, "--quiet", "--out", tmp_path / "x")
    assert rc == 2 and "the data's classes (c1) are not classes of the training data (c0, cat)" \
        in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
    # in knowledge, the model of a role is the likelier mistake (a backbone's own classifier
    # where its linear probe belongs): the message names the role and that fix
    rc, _, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained", weights,
                      "--finetuned", weights, "--data", tmp_path / "imgs", "--players", "grid:2x2",
                      "--samples", 2, "--quiet", "--out", tmp_path / "k")
    assert rc == 2 and err.count("\n") == 1, err
    assert ("the data's classes (c1) are not classes of the pretrained model (--pretrained) (c0, "
            "cat); pass as the pretrained model a classifier over the data's classes (for a "
            "pre-trained backbone, its linear probe: finetune --mode linear-probe)") in err
    assert not (tmp_path / "k").exists()
    # a name given to two classes cannot be matched: refused, not mapped to the last of them
    weights = _classifier(tmp_path / "m2.safetensors", 2, meta={
        "producer": "finetune", "inputs": {"class_names": _json.dumps(["c1", "c1"])}})
    rc, _, err = _run(capsys, "explain", "--model", "smallcnn-s", "--weights", weights, "--data",
                      tmp_path / "imgs", "--samples", 2, "--quiet", "--out", tmp_path / "x")
    assert rc == 2 and "the training data names two classes 'c1'" in err, err


def test_a_pretrained_model_over_other_classes_is_pointed_to_the_linear_probe(tmp_path, capsys):
    weights = _classifier(tmp_path / "m.safetensors", 7)
    rc, _, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained", weights,
                      "--finetuned", _classifier(tmp_path / "f.safetensors", 10), "--data",
                      "synthetic:target", "--players", "grid:2x2", "--samples", 2, "--quiet",
                      "--out", tmp_path / "k")
    assert rc == 2 and "the classifier of finetune --mode linear-probe" in err, err


def _stamps(folder):
    """Every file under ``folder`` with its modification time and bytes."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_a_rerun_of_a_finished_analysis_or_explanation_writes_nothing_and_says_so(tmp_path, capsys):
    # it redid all the work (every interaction file, figure and knowledge.json) and said nothing
    model = _classifier(tmp_path / "m.safetensors", 10)
    (tmp_path / "snaps").mkdir()
    for step, seed in ((1, 1), (2, 0)):  # the last snapshot is the fine-tuned model (seed 0)
        _snapshot(tmp_path / "snaps" / f"step-{step:07d}.safetensors", step, seed=seed)
    out = tmp_path / "k"
    argv = [*KNOWLEDGE_2X2, "--pretrained", model, "--finetuned", model, "--checkpoints",
            tmp_path / "snaps", "--quiet", "--out", out]
    rc, first, err = _run(capsys, *argv)
    assert rc == 0 and first.startswith("knowledge over 2 samples"), err
    before = _stamps(out)
    rc, again, err = _run(capsys, *argv, "--batch-size", 7)  # a setting that changes nothing
    # the analysis's doubts are still said (also under --quiet), and no progress: nothing done
    same = ("warning: the pretrained and finetuned models are the same network (equal weights), "
            "so their knowledge is identical; check --pretrained and --finetuned\n")
    assert (rc, again, err) == (0, f"knowledge: {out} is finished (same settings); nothing to do\n",
                                same)
    assert _stamps(out) == before
    rc, again, err = _run(capsys, *[a for a in argv if a != "--quiet"])
    assert again.endswith("is finished (same settings); nothing to do\n")
    assert err == same  # no progress bar: nothing done
    assert _stamps(out) == before
    # a missing figure, a missing snapshot's salient.png or a changed cached game is redone
    for damage in (lambda: (out / "ratios.png").unlink(),
                   lambda: (out / "checkpoint-000" / "salient.png").unlink(),
                   lambda: np.save(next((out / "finetuned" / "games").glob("*.npy")), np.zeros(16))):
        damage()
        rc, again, err = _run(capsys, *argv)
        assert rc == 0 and again == first, err
        assert _run(capsys, *argv)[1].endswith("nothing to do\n")
    # explain: the same
    explain = [*_explain_argv(model), "--out", tmp_path / "x"]
    rc, first, err = _run(capsys, *explain)
    assert rc == 0 and first.startswith("explained 2 samples"), err
    before = _stamps(tmp_path / "x")
    assert _run(capsys, *explain)[1] == (
        f"explain: {tmp_path / 'x'} is finished (same settings); nothing to do\n")
    assert _stamps(tmp_path / "x") == before
    (tmp_path / "x" / "interactions-0001.safetensors").unlink()
    assert _run(capsys, *explain)[1] == first
    assert len(_interactions(tmp_path / "x")) == 2


def _constant(path, label: int):
    """A classifier that answers ``label`` for every input."""
    net = create_backbone("smallcnn-s", num_classes=10)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.bias[label] = 1.0
    return save_backbone(net, path, {"constant": label})


def test_no_sample_correct_for_every_model_names_each_models_count_and_the_fixes(tmp_path, capsys):
    # it said only "check that the models were trained on this data", when the models were weak
    zeros, ones = _constant(tmp_path / "0.safetensors", 0), _constant(tmp_path / "1.safetensors", 1)
    rc, out, err = _run(capsys, *KNOWLEDGE_2X2, "--pretrained", zeros, "--finetuned", ones,
                        "--quiet", "--out", tmp_path / "k")
    data = open_dataset("synthetic:target", split="test")
    right = [int((data.labels == c).sum()) for c in (0, 1)]
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert (f"none of the {len(data)} samples is classified correctly by every model (correct of "
            f"them: pretrained {right[0]}, finetuned {right[1]})") in err
    assert "train it longer or better" in err
    assert "pass more data to screen (knowledge's --data and --split" in err
    assert "trained on this data's classes" in err
    assert not (tmp_path / "k").exists()


def test_a_folder_written_before_the_background_setting_reruns_as_finished_and_records_it(tmp_path, capsys):
    # markers of earlier versions record no background: the rerun with the same flags was
    # refused as "background: null before, "baseline" now"
    model = _classifier(tmp_path / "m.safetensors", 10)

    def forget_background(path):
        marker = json.loads(path.read_text())
        identity = dict(marker["identity"])
        del marker["identity"]["background"], marker["identity"]["labels"]
        path.write_text(json.dumps(marker))
        return identity

    def rerun_records_them(argv, marker):
        identity = forget_background(marker)
        results = {p: p.stat().st_mtime_ns for p in marker.parent.rglob("*") if p != marker}
        # nothing computed or written again...
        assert _run(capsys, *argv)[1].endswith("is finished (same settings); nothing to do\n")
        assert {p: p.stat().st_mtime_ns for p in marker.parent.rglob("*") if p != marker} == results
        # ...but the marker records them: data relabelled later is no longer taken as it is then
        assert json.loads(marker.read_text())["identity"] == identity

    explain = [*_explain_argv(model), "--out", tmp_path / "x"]
    assert _run(capsys, *explain)[0] == 0
    rerun_records_them(explain, tmp_path / "x" / "explain.json")
    # the earlier version's value is the image default, so the other one is still refused
    rc, _, err = _run(capsys, *explain, "--background", "original")
    assert rc == 2 and '(background: "baseline" before, "original" now)' in err, err
    knowledge = [*KNOWLEDGE_2X2, "--pretrained", model, "--finetuned", model, "--quiet",
                 "--out", tmp_path / "k"]
    assert _run(capsys, *knowledge)[0] == 0
    rerun_records_them(knowledge, tmp_path / "k" / "knowledge.json")


def test_explain_and_knowledge_note_a_model_whose_outputs_are_matched_by_position(
        tmp_path, capsys):
    # a model that names no classes explained the data's named classes by position, unsaid
    # (evaluate said so); one that records its finetune run's class names is matched by name
    names = list(open_dataset("synthetic:target", split="test").class_names)
    unnamed = _classifier(tmp_path / "unnamed.safetensors", 10)
    named = _classifier(tmp_path / "named.safetensors", 10, meta={
        "producer": "finetune", "inputs": {"class_names": json.dumps(names)}})
    common = ("--model", "smallcnn-s", "--data", "synthetic:target", "--players", "grid:2x2",
              "--samples", 2)
    note = ("none of the data's classes (neither class names a finetune run records nor a "
            "Hugging Face id2label), so the data's classes were explained by position")
    rc, _, err = _run(capsys, "explain", *common, "--weights", unnamed, "--out", tmp_path / "a")
    assert rc == 0 and f"note: the model names {note}" in err
    rc, _, err = _run(capsys, "explain", *common, "--weights", named, "--out", tmp_path / "b")
    assert rc == 0 and "by position" not in err
    rc, _, err = _run(capsys, "knowledge", *common, "--pretrained", unnamed, "--finetuned", named,
                      "--out", tmp_path / "k")
    assert rc == 0 and f"note: the pretrained model names {note}" in err


@pytest.mark.parametrize("command", ["evaluate", "explain"])
def test_unlabelled_images_are_refused_with_how_to_label_them(tmp_path, capsys, command):
    # the errors named Python functions (open_dataset) or no fix at all
    (tmp_path / "flat").mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / "flat" / f"{i}.png")
    weights = _classifier(tmp_path / "m.safetensors", 10)
    rc, _, err = _run(capsys, command, "--model", "smallcnn-s", "--weights", weights,
                      "--data", tmp_path / "flat", "--quiet", "--out", tmp_path / "o.json")
    assert rc == 2 and err.count("\n") == 1
    assert (f"needs labelled samples (the class of each), but {str(tmp_path / 'flat')!r} holds "
            "unlabelled images; put each class's images in a folder of its own") in err
    assert not (tmp_path / "o.json").exists()


def test_counterfactual_predictions_equal_a_sum_over_the_salient_interactions_lost():
    # the prediction of removing the players of S: every salient AND interaction that shares a
    # player with S, and every OR one all of whose players S removes (a plain loop as reference)
    from pretrain_reuse.knowledge import and_or_interactions, planted_game

    [x] = and_or_interactions(planted_game(6, {(0, 1): 1.0, (2, 3, 4): -0.7}, noise=0.3, seed=2))
    salient = x.salient(0.05)
    full = (1 << 6) - 1
    sets = [0b000011, 0b011100, 0b100001, 0b111111]
    result = counterfactual(x, sets, 0.05, np.random.default_rng(0))
    for s, (measured, predicted) in zip(sets, result["preserved"], strict=True):
        lost = [v for (kind, t), v in salient.items()
                if (kind == "and" and t & s) or (kind == "or" and t and t & ~s == 0)]
        assert predicted == pytest.approx(sum(lost), abs=1e-12)
        assert measured == x.v[full] - x.v[full ^ s]
    # the random sets have the sizes of the chosen ones
    assert len(result["random"]) == len(sets)


def test_explain_holds_its_folder_until_the_interactions_are_written(tmp_path, capsys, monkeypatch):
    # the folder was locked only while the games were computed: a second explain could start
    # while the first decomposed them and wrote its interactions
    import pretrain_reuse.knowledge.explain as explain_module
    from test_artifacts import _Holder

    model = _classifier(tmp_path / "m.safetensors", 10)
    seen, save = [], explain_module.save_explanations

    def save_seen_from_another_process(*args, **kwargs):
        with _Holder(tmp_path / "x") as other:
            seen.append(other.ready)
        return save(*args, **kwargs)

    monkeypatch.setattr(explain_module, "save_explanations", save_seen_from_another_process)
    assert _run(capsys, *_explain_argv(model), "--out", tmp_path / "x")[0] == 0
    assert seen == [""]  # the other process could not take it


@pytest.mark.parametrize("flag, value, reader", [("--baseline-steps", 7, "learned"),
                                                 ("--baseline-radius", 0.2, "learned"),
                                                 ("--mean-samples", 50, "mean")])
def test_a_setting_the_baseline_does_not_read_is_refused(tmp_path, capsys, flag, value, reader):
    # it was taken and changed nothing, but a rerun without it was refused as "other settings"
    model = _classifier(tmp_path / "m.safetensors", 10)
    rc, _, err = _run(capsys, *_explain_argv(model), flag, value, "--out", tmp_path / "x")
    name = flag[2:].replace("-", "_")
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{name}={value} ({flag}) applies to baseline {reader!r} only, not 'zero'" in err
    assert not (tmp_path / "x").exists()
    rc, _, err = _run(capsys, *_explain_argv(model), "--out", tmp_path / "x")
    assert rc == 0, err
    # a folder of an earlier version, which took it: the same run as one without it
    marker = json.loads((tmp_path / "x" / "explain.json").read_text())
    marker["identity"][name] = value
    (tmp_path / "x" / "explain.json").write_text(json.dumps(marker))
    assert _run(capsys, *_explain_argv(model), "--out", tmp_path / "x")[1].endswith("nothing to do\n")
    rc, _, err = _run(capsys, *_explain_argv(model), "--baseline", reader, flag, value,
                      "--out", tmp_path / "y")  # where the baseline reads it, it is taken
    assert rc == 0, err


def test_the_default_noise_bound_given_explicitly_is_the_same_run(tmp_path, capsys):
    # "(qthres: null before, 0.04 now)": the default, given, was refused as another setting
    model = _classifier(tmp_path / "m.safetensors", 10)
    argv = [*_explain_argv(model), "--decomposition", "and-or", "--out", tmp_path / "x"]
    assert _run(capsys, *argv)[0] == 0
    assert _run(capsys, *argv, "--qthres", 0.04)[1].endswith("is finished (same settings); nothing to do\n")
    rc, _, err = _run(capsys, *argv, "--qthres", 0.1)
    assert rc == 2 and "(qthres: 0.04 before, 0.1 now)" in err, err
    # a folder of an earlier version recorded the default as null: the same run too
    marker = json.loads((tmp_path / "x" / "explain.json").read_text())
    marker["identity"]["qthres"] = None
    (tmp_path / "x" / "explain.json").write_text(json.dumps(marker))
    assert _run(capsys, *argv, "--qthres", 0.04)[0] == 0
    assert _run(capsys, *argv)[1].endswith("is finished (same settings); nothing to do\n")
