"""The quick demo end to end: its summary agrees with the artifacts it wrote, it resumes, and
its report renders in a real headless browser."""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pretrain_reuse import load
from pretrain_reuse.cli import main
from pretrain_reuse.data.catalog import open_dataset
from pretrain_reuse.finetune import RunResult
from pretrain_reuse.knowledge import knowledge_report

SECTIONS = ("selection", "finetune", "knowledge", "sensitivity", "parameters")


def test_summary_holds_what_users_script_over(quick_demo):
    _, summary, stdout = quick_demo
    assert {"classes-uot", "classes-greedy-ot", "classes-random", "clusters-uot"} <= set(
        summary["selection"])
    for name, run in summary["finetune"].items():
        assert {"top1_mean", "top1_std", "seeds"} <= set(run), name
    assert {"preserved", "discarded", "new", "exclusive_vs_scratch", "faithfulness_error",
            "counterfactual", "set_alone"} <= set(summary["knowledge"])
    assert {"pretrain", "embed_features_pretrain", "knowledge"} <= set(summary["timing_s"])
    assert re.search(r"finetune\s+vanilla: test top-1 \d\.\d{4}", stdout)
    meta = summary["meta"]  # what made these numbers: seed, settings, versions, threads
    assert meta["seed"] == 0 and meta["params"]["quick"] is True
    assert {"torch", "numpy", "threads"} <= set(meta["environment"])


def test_selection_recall_matches_the_saved_selection_and_the_world(quick_demo):
    out, summary, _ = quick_demo
    related = set(open_dataset("synthetic:target").related.tolist())
    for method in ("uot", "greedy-ot", "random"):
        sel = load(out / "selections" / f"classes-{method}.json")
        assert len(sel.selected) == len(related)
        hits = len(related & set(sel.selected))
        assert summary["selection"][f"classes-{method}"]["recall"] == hits / len(related)


def test_finetune_numbers_are_the_runs_final_test_accuracy(quick_demo):
    out, summary, _ = quick_demo
    for name, run in summary["finetune"].items():
        results = [RunResult.load(out / "finetune" / f"{name}-seed{s}" / "result.json")
                   for s in run["seeds"]]
        assert run["top1_mean"] == pytest.approx(np.mean([r.final["top1"] for r in results]))
    # pre-training helps: a scratch network on 360 images is far behind the pre-trained ones
    assert summary["finetune"]["vanilla"]["top1_mean"] > summary["finetune"]["scratch"]["top1_mean"]


def test_knowledge_ratios_are_consistent(quick_demo):
    out, summary, _ = quick_demo
    k = summary["knowledge"]
    saved = json.loads((out / "knowledge" / "knowledge.json").read_text())
    # the ratios again, from the interactions files the analysis saved (sample k in file k)
    roles = {role: [load(p) for p in sorted((out / "knowledge" / role).glob("interactions-*.safetensors"))]
             for role in ("pretrained", "finetuned", "scratch")}
    assert len(roles["pretrained"]) == saved["samples"]["n"] > 0
    params = saved["meta"]["params"]
    again = knowledge_report(roles["pretrained"], roles["finetuned"], roles["scratch"],
                             tau=params["tau"], match=params["match"]).to_dict()["overall"]
    for name, key in (("preserved", "preserve"), ("discarded", "discard"), ("new", "new"),
                      ("exclusive_vs_scratch", "exclusive")):
        assert k[name] == pytest.approx(again[key]["mean"]), name
    assert saved["report"]["overall"] == again
    # all interactions reproduce every explained game exactly; the salient ones approximate it
    for role, err in k["faithfulness_error"].items():
        assert np.isfinite(err) and err >= 0, role
        for path in sorted((out / "knowledge" / role).glob("interactions-*.safetensors")):
            x = load(path)
            assert x.faithfulness_error(tau=1e-12)["max"] < 1e-9


def test_the_sensitivity_stage_repeats_the_analysis_with_each_baseline(quick_demo):
    out, summary, stdout = quick_demo
    folder = out / "knowledge_sensitivity"
    result = load(folder / "sensitivity.json")
    assert list(result.variants) == ["baseline=zero", "baseline=mean", "baseline=blur"]
    # the world's own baseline is the knowledge stage's analysis, from the same (linked) games
    reference = json.loads((folder / "baseline=zero" / "knowledge.json").read_text())
    saved = json.loads((out / "knowledge" / "knowledge.json").read_text())
    assert reference["report"] == saved["report"] and reference["samples"] == saved["samples"]
    for role in ("pretrained", "finetuned", "scratch"):
        games = sorted((out / "knowledge" / role / "games").glob("*.npy"))
        assert games and all(os.path.samefile(g, folder / "baseline=zero" / role / "games" / g.name)
                             for g in games)
    rows = {r["baseline"]: r for r in result.rows()}
    changes = result.differences()
    for baseline, numbers in summary["knowledge_by_baseline"].items():
        assert numbers["preserved"] == rows[baseline]["preserve"]
        assert numbers["new"] == rows[baseline]["new"]
        if baseline != "zero":
            assert numbers["new_change"] == changes[f"baseline={baseline}"]["new"]
    assert summary["knowledge_by_baseline"]["zero"]["new"] == summary["knowledge"]["new"]
    assert "knowledge by baseline: zero preserved" in stdout
    assert "sensitivity" in summary["timing_s"]


def test_knowledge_convergence_follows_fine_tuning_and_scratch_training_over_their_steps(quick_demo):
    # both runs save snapshots; each curve's x is the step its snapshots record, its last point
    # the run's final model
    out, _, _ = quick_demo
    k = json.loads((out / "knowledge" / "knowledge.json").read_text())
    for key, run in (("convergence", "vanilla"), ("scratch_convergence", "scratch")):
        snaps = sorted((out / "finetune" / f"{run}-seed0" / "snapshots").glob("*.safetensors"))
        steps = [int(p.stem.split("-")[1]) for p in snaps]
        assert k[key]["steps"] == steps and len(steps) > 1, key
        assert k[key]["similarity"][-1] == 1.0 and k[key]["first_at_threshold"] in steps
        assert [c["weights"] for c in k[key]["checkpoints"]] == [str(p) for p in snaps]


def test_a_rerun_recomputes_a_damaged_knowledge_analysis(quick_demo, tmp_path):
    # a truncated and a deleted interactions file: the knowledge stage is not done, and a rerun
    # writes the analysis again as it was (from its cached games)
    out, summary, _ = quick_demo
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    damaged = copy / "knowledge" / "finetuned" / "interactions-0001.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:300])
    (copy / "knowledge" / "scratch-checkpoint-000" / "interactions-0000.safetensors").unlink()
    assert main(["demo", "--quick", "--quiet", "--out", str(copy)]) == 0
    for folder in ("finetuned", "scratch-checkpoint-000"):
        for a, b in zip(sorted((out / "knowledge" / folder).glob("interactions-*")),
                        sorted((copy / "knowledge" / folder).glob("interactions-*")), strict=True):
            np.testing.assert_array_equal(load(a).and_values, load(b).and_values)
    assert json.loads((copy / "summary.json").read_text())["knowledge"] == summary["knowledge"]


def test_rerun_resumes_without_recomputing(quick_demo, tmp_path):
    out, summary, _ = quick_demo
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    stamp = 1_000_000_000_000_000_000
    finished = [p for p in copy.rglob("*.safetensors")]
    for p in finished:
        os.utime(p, ns=(stamp, stamp))
    assert main(["demo", "--quick", "--quiet", "--out", str(copy)]) == 0
    assert all(p.stat().st_mtime_ns == stamp for p in finished)
    again = json.loads((copy / "summary.json").read_text())
    assert again["selection"] == summary["selection"]
    assert again["finetune"] == summary["finetune"]
    assert again["knowledge_by_baseline"] == summary["knowledge_by_baseline"]


def test_another_seed_into_the_same_folder_is_a_user_error(quick_demo, capsys):
    out, _, _ = quick_demo
    assert main(["demo", "--quick", "--seed", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another out folder (--out)" in err


def test_report_is_self_contained(quick_demo):
    out, _, _ = quick_demo
    page = (out / "report.html").read_text()
    for section in SECTIONS:
        assert f'id="{section}"' in page
    assert page.count("data:image/png;base64,") >= 6
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from a network


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_every_section_and_image_in_a_headless_browser(quick_demo):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    out, _, _ = quick_demo
    shot = Path(os.environ.get("REPORT_SCREENSHOT", out / "report.png"))
    with sync_api.sync_playwright() as pw:
        chrome = pw.chromium.launch(executable_path=browser, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = chrome.new_page(viewport={"width": 1200, "height": 900})
        page.goto((out / "report.html").as_uri())
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        visible = {s: page.is_visible(f"section#{s}") for s in SECTIONS}
        page.screenshot(path=str(shot), full_page=True)
        chrome.close()
    assert len(images) >= 6 and all(done and width > 0 for done, width in images)
    assert all(visible.values()), visible
    assert shot.stat().st_size > 50_000


@pytest.mark.slow
def test_full_demo_reuse_of_uot_selected_units_beats_random_ones(tmp_path):
    """Liu et al.'s claim on the world, 3 seeds (about 5 minutes on 2 cores): UOT finds more of
    the related classes than random selection, and reusing its classes beats vanilla
    fine-tuning and reusing random classes. Without labels, reusing UOT clusters beats reusing
    random clusters (0.9000 vs 0.8733, README); it does not beat vanilla on this world."""
    out = tmp_path / "demo"
    assert main(["demo", "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    sel, ft = summary["selection"], summary["finetune"]
    assert sel["classes-uot"]["recall"] > sel["classes-random"]["recall"]
    assert len(ft["reuse-uot"]["seeds"]) == 3
    assert ft["reuse-uot"]["top1_mean"] > ft["vanilla"]["top1_mean"]
    assert ft["reuse-uot"]["top1_mean"] > ft["reuse-random"]["top1_mean"]
    assert len(ft["reuse-unlabeled-uot"]["seeds"]) == len(ft["reuse-unlabeled-random"]["seeds"]) == 3
    assert ft["reuse-unlabeled-uot"]["top1_mean"] > ft["reuse-unlabeled-random"]["top1_mean"]



@pytest.mark.slow
def test_full_fashion_demo_uot_clusters_cover_the_garments_and_unlabelled_reuse_keeps_up(tmp_path):
    """The unlabelled half on real pixels, 3 seeds (about 7 minutes on 2 cores alone): UOT
    clusters hold the target's garment classes (random ones mostly digits), and reuse-unlabeled
    of UOT clusters does not fall below vanilla fine-tuning. It does not beat reuse of random
    clusters here with FixMatch's strong view (0.6383 vs 0.6558, README), so that is not asserted."""
    from pretrain_reuse.data.real import FASHION_MNIST_DIR

    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (.ci/run installs dataset-fashion-mnist)")
    out = tmp_path / "fashion"
    assert main(["demo", "--scenario", "fashion", "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rec, ft = ({k: v["recall"] for k, v in summary["selection"].items()}, summary["finetune"])
    assert rec["clusters-uot"] > 0.9 and rec["clusters-random"] < 0.3
    assert len(ft["reuse-unlabeled-uot"]["seeds"]) == len(ft["reuse-unlabeled-random"]["seeds"]) == 3
    assert ft["reuse-unlabeled-uot"]["top1_mean"] >= ft["vanilla"]["top1_mean"]


def test_fashion_scenario_on_real_pixels_finds_the_target_garments(tmp_path):
    """The real-pixel scenario (quick): the pool mixes garments and digits; UOT must rank the
    target's four upper-body garments (pool classes 0, 2, 4, 6) first, as they are known by
    construction, and the report must be written for this scenario's data."""
    from pretrain_reuse.data.real import FASHION_MNIST_DIR, UPPER_BODY

    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (.ci/run installs dataset-fashion-mnist)")
    out = tmp_path / "fashion"
    assert main(["demo", "--scenario", "fashion", "--quick", "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"]["name"] == "fashion"
    assert summary["scenario"]["related"] == list(UPPER_BODY)
    uot = load(out / "selections" / "classes-uot.json")
    assert set(uot.selected) == set(UPPER_BODY)  # 4 of 20 pool classes, none of them a digit
    assert summary["selection"]["classes-uot"]["recall"] == 1.0
    # clusters: the UOT clusters bring most of the garments' pool images; random clusters cover
    # about their share of the pool (the four garments are 21% of it)
    rec = {k: v["recall"] for k, v in summary["selection"].items()}
    assert rec["clusters-uot"] > 0.8 > rec["clusters-random"]
    page = (out / "report.html").read_text()
    assert "Fashion-MNIST" in page and all(f'id="{s}"' in page for s in SECTIONS)


def test_a_folder_another_version_began_is_refused_not_resumed(tmp_path, capsys, monkeypatch):
    import pretrain_reuse.demo as demo

    def no_training(*args, **kwargs):
        raise AssertionError("a stage ran in a folder begun by another version")

    monkeypatch.setattr(demo, "finetune_datasets", no_training)
    out = tmp_path / "run"
    out.mkdir()
    # what an earlier version wrote: the same flags, but its stages ran with other epochs and λ
    (out / "run.json").write_text(json.dumps(
        {"kind": "demo-run", "params": {"quick": True, "seed": 0, "scenario": "world"}}))
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "other settings or inputs (lambda, plan, scenario_settings, version)" in err
    assert "another out folder (--out)" in err and sorted(p.name for p in out.iterdir()) == ["run.json"]
