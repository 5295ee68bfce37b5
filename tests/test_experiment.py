"""``pretrain-reuse experiment``: recipes of the paper's tables and figures, checked on the quick
demo's pre-trained CNN and features (the world's related classes are the planted truth)."""

import csv
import html
import json
import warnings
from dataclasses import replace

import numpy as np
import pytest

from _helpers import colour_folder
from pretrain_reuse import load as pr_load
from pretrain_reuse.cli import main
from pretrain_reuse.data.catalog import open_dataset
from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.experiments import RECIPES, ExperimentTable, load_experiment_config, run_experiment
from pretrain_reuse.finetune import RunResult
from pretrain_reuse.finetune.config import FinetuneConfig
from pretrain_reuse.selection import Selection

RELATED = tuple(int(c) for c in open_dataset("synthetic:target").related)
FAST = {"max_steps": 3, "batch_size": 16, "eval_every": 1, "augment": "none", "lr": 0.01,
        "val_fraction": 0.1, "checkpoint_every": 1000}


def _config(demo, tmp_path, **extra):
    out = demo
    values = dict(model="smallcnn", weights=str(out / "pretrain" / "model.safetensors"),
                  source="synthetic:pretrain", target="synthetic:target",
                  source_features=str(out / "features_pretrain"),
                  target_features=str(out / "features_target"), k=len(RELATED), clusters=64,
                  relevant=RELATED, finetune=FAST)
    values.update(extra)
    path = tmp_path / "exp.yaml"
    import yaml

    path.write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v
                                    for k, v in values.items()}))
    return path


def test_recall_sweep_matches_the_saved_selections_and_greedy_ignores_eps_c(quick_demo, tmp_path,
                                                                          capsys):
    demo, summary, _ = quick_demo
    cfg = load_experiment_config(_config(demo, tmp_path), seeds=(0,))
    table = run_experiment("fig4a", cfg, tmp_path / "fig4a")
    # the config's clusters (for table1 and 2) select nothing here: said, not silently ignored
    assert ("[experiment] fig4a does not read clusters (read by table1, table2): they change "
            "nothing here\n") in capsys.readouterr().out
    rows = {(r["method"], r["x"]): r for r in table.rows}
    assert len(rows) == 2 * len(cfg.values("eps_c"))
    for (method, eps), row in rows.items():
        assert row["top1_mean"] is None and row["seeds"] == []  # selection only
        sel = Selection.load(next((tmp_path / "fig4a" / "selections").glob(
            f"classes-{method.split()[0]}-cosine-eps{eps:g}-k*.json")))
        truth = len(set(sel.selected) & set(RELATED)) / len(RELATED)
        assert row["recall"] == pytest.approx(truth)
    greedy = {r["recall"] for r in table.rows if r["method"].startswith("greedy")}
    assert len(greedy) == 1  # greedy OT scores each unit alone: the cost scale cannot matter
    # at the paper's eps_c, the recall equals the demo's own UOT selection of the same classes
    assert rows[("uot cosine", 0.01)]["recall"] == pytest.approx(
        summary["selection"]["classes-uot"]["recall"])
    # above chance (k of 128 classes) even with the quick demo's 2-epoch features
    assert rows[("uot cosine", 0.01)]["recall"] > len(RELATED) / 128
    # both feature stores given and no run to train: nothing reads the weights or embeds; the
    # stores are claimed by their content
    assert not {"weights", "weights_sha256", "embed_batch_size"} & set(table.params)
    assert {"source_features_sha256", "target_features_sha256"} <= set(table.params)


def finals_vanilla_seed0(out):
    return json.loads((out / "runs" / "vanilla-seed0" / "result.json").read_text())["final"]["top1"]


def test_table_aggregates_the_runs_and_a_rerun_skips_them(quick_demo, tmp_path):
    demo, _, _ = quick_demo
    cfg = load_experiment_config(_config(demo, tmp_path, sweep={"groups": [2]}), seeds=(0, 1))
    out = tmp_path / "fig4b"
    table = run_experiment("fig4b", cfg, out, progress=False)
    assert [r["method"] for r in table.rows] == ["vanilla", "reuse uot group", "reuse uot group"]
    for row in table.rows:
        slug = "vanilla" if row["x"] is None else f"reuse-uot-group-x={row['x']}"
        finals = [RunResult.load(out / "runs" / f"{slug}-seed{s}" / "result.json").final["top1"]
                  for s in (0, 1)]
        assert row["top1_mean"] == pytest.approx(np.mean(finals))
        assert row["top1_std"] == pytest.approx(np.std(finals, ddof=1))
        assert row["seeds"] == [0, 1]
    # the two groups split the UOT ranking of the 128 classes into disjoint halves, best first
    full = Selection.load(next((out / "selections").glob("classes-uot-*-k128.json")))
    ranking = [int(u) for u in full.ranking()]
    for group in (1, 2):
        meta = RunResult.load(out / "runs" / f"reuse-uot-group-x={group}-seed0" / "result.json").meta
        assert json.loads(meta["inputs"]["selected"]) == ranking[(group - 1) * 64:group * 64]
        assert meta["inputs"]["source"] == "synthetic:pretrain"
    # a run without a selection does not read the source: a rerun without it (knowledge does
    # not claim it) resumes the run, which compares the inputs of its run.json
    assert json.loads((out / "runs" / "vanilla-seed0" / "run.json").read_text())["inputs"]["source"] is None
    assert table.rows[1]["units"] == table.rows[2]["units"] == 64
    # and the pool images those units hold (a share of the pool is overshot by whole clusters)
    assert full.counts is not None
    assert [table.rows[g]["images"] for g in (1, 2)] == [
        int(full.counts[ranking[(g - 1) * 64:g * 64]].sum()) for g in (1, 2)]
    assert table.rows[0]["images"] is None  # vanilla reuses nothing

    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["top1_mean"]) for r in rows] == pytest.approx([r["top1_mean"] for r in table.rows])
    assert ExperimentTable.load(out).rows == json.loads(json.dumps(table.rows))
    assert pr_load(out).rows == pr_load(out / "experiment.json").rows == ExperimentTable.load(out).rows
    assert pr_load(out / "runs" / "vanilla-seed0").final["top1"] == finals_vanilla_seed0(out)
    assert (out / "results.png").stat().st_size > 0 and "| vanilla |" in (out / "results.md").read_text()

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    again = run_experiment("fig4b", cfg, out, progress=False)
    assert again.rows == table.rows
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")} == stamps


def _check_selected_on_training_images(demo, out, run_name: str, tag: str, k: int) -> set[str]:
    """The saved UOT selection ``tag`` is the one made from class means of exactly the images
    the run ``run_name`` trains on (an independent reference), and the run reused it; returns
    those images' ids."""
    from pretrain_reuse.features import FeatureStore
    from pretrain_reuse.selection import SelectConfig, select
    from pretrain_reuse.units import Units

    target = FeatureStore.load(demo / "features_target")
    pool = Units.load(out / "units" / "classes.safetensors")
    run = out / "runs" / run_name
    train_ids = json.loads((run / "split.json").read_text())["train"]
    rows = [target.ids.index(i) for i in train_ids]
    x, y = np.asarray(target.features)[rows], target.labels[rows]
    means = np.stack([x[y == c].mean(0) for c in np.unique(y)])
    expected = select(pool, Units(means), SelectConfig(method="uot", k=k))
    saved = Selection.load(out / "selections" / f"{tag}.json")
    np.testing.assert_allclose(saved.scores, expected.scores, rtol=1e-5)
    assert json.loads(RunResult.load(run / "result.json").meta["inputs"]["selected"]) == saved.selected
    return set(train_ids)


def test_a_low_data_regime_of_every_row_selects_on_its_training_images_too(quick_demo, tmp_path):
    # train_fraction under finetune: applies to every row of a recipe without a regime sweep
    demo, _, _ = quick_demo
    cfg = load_experiment_config(_config(demo, tmp_path, sweep={"k": [8]}, relevant=()), seeds=(0,),
                                 finetune={**FAST, "max_steps": 1, "train_fraction": 0.25})
    out = tmp_path / "fig3a"
    run_experiment("fig3a", cfg, out, progress=False)
    _check_selected_on_training_images(demo, out, "reuse-uot-classes-x=8-seed0",
                                       "classes-uot-cosine-eps0.01-k8-train_fraction0.25-seed0", 8)
    # a finished run made with another selection (as earlier versions made for this row) is not
    # mixed into the table
    result = out / "runs" / "reuse-uot-classes-x=8-seed0" / "result.json"
    record = json.loads(result.read_text())
    record["meta"]["inputs"]["selected"] = "[0, 1, 2, 3, 4, 5, 6, 7]"
    result.write_text(json.dumps(record))
    from pretrain_reuse.errors import PretrainReuseError

    with pytest.raises(PretrainReuseError, match="was made with another selection"):
        run_experiment("fig3a", cfg, out, progress=False)


def test_random_and_low_data_selections_follow_each_runs_seed_and_training_images(quick_demo,
                                                                                   tmp_path):
    from pretrain_reuse.selection import SelectConfig, select
    from pretrain_reuse.units import Units

    demo, _, _ = quick_demo
    cfg = load_experiment_config(_config(demo, tmp_path, sweep={"train_fraction": [0.25]}),
                                 seeds=(0, 1))
    out = tmp_path / "fig3b"
    table = run_experiment("fig3b", cfg, out, progress=False)
    pool = Units.load(out / "units" / "classes.safetensors")
    trained_on = [_check_selected_on_training_images(
        demo, out, f"reuse-uot-classes-x=0.25-seed{seed}",
        f"classes-uot-cosine-eps0.01-k{len(RELATED)}-train_fraction0.25-seed{seed}", len(RELATED))
        for seed in (0, 1)]
    assert trained_on[0] != trained_on[1]
    assert table.rows[1]["units"] == len(RELATED)

    cfg = load_experiment_config(_config(demo, tmp_path, sweep={"k": [8]}, relevant=()),
                                 seeds=(0, 1), finetune={**FAST, "max_steps": 1})
    out = tmp_path / "fig3a"
    run_experiment("fig3a", cfg, out, progress=False)
    drawn = [json.loads(RunResult.load(out / "runs" / f"reuse-random-classes-x=8-seed{s}"
                                       / "result.json").meta["inputs"]["selected"]) for s in (0, 1)]
    assert drawn[0] != drawn[1]  # a random selection per seed, seeded by the run's seed
    for s in (0, 1):
        assert drawn[s] == select(pool, Units(np.ones((1, pool.prototypes.shape[1]))),
                                  SelectConfig(method="random", k=8, seed=s)).selected


def test_a_row_does_not_depend_on_which_seeds_ran_before_it_in_the_folder(quick_demo, tmp_path):
    # k-means clusters and their image budget are made once per folder: with the first seed they
    # would differ between a folder begun with seed 0 and one begun with seed 1
    demo, _, _ = quick_demo
    path = _config(demo, tmp_path, sweep={"clusters": [16]})
    for seeds in ((0,), (1,)):
        run_experiment("table2", load_experiment_config(path, seeds=seeds), tmp_path / "a",
                       progress=False)
    run_experiment("table2", load_experiment_config(path, seeds=(1,)), tmp_path / "b", progress=False)
    runs = [RunResult.load(tmp_path / d / "runs" / "reuse-unlabeled-uot-clusters-x=16-seed1"
                           / "result.json") for d in ("a", "b")]
    assert runs[0].meta["inputs"]["selected"] == runs[1].meta["inputs"]["selected"]
    assert runs[0].final == runs[1].final


def test_cli_runs_a_recipe_and_refuses_a_changed_config(quick_demo, tmp_path, capsys):
    demo, _, _ = quick_demo
    cfg = _config(demo, tmp_path)
    out = tmp_path / "t4"
    assert main(["experiment", "table4", "--config", str(cfg), "--seeds", "0", "--quiet",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| reuse uot cosine |" in printed and "results.md" in printed
    table = ExperimentTable.load(out)
    assert [r["method"] for r in table.rows] == ["reuse greedy-ot l2", "reuse greedy-ot cosine",
                                                 "reuse uot l2", "reuse uot cosine"]
    assert all(r["recall"] is not None and r["units"] == len(RELATED) for r in table.rows)
    # the l2 rows use their own cost scale (ExperimentConfig.eps_c_l2: 0.05-1 reproduces Table 4)
    def scales(metric):
        return {p.name.split("-eps")[1].split("-")[0] for p in (out / "selections").glob(f"*-{metric}-*")}

    assert scales("l2") == {"0.1"} and scales("cosine") == {"0.01"}
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "experiment table4" in page and page.count("data:image/png;base64,") >= 2

    assert main(["experiment", "table4", "--config", str(cfg), "--k", "5", "--quiet",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "other settings or inputs (k)" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["table9"], "experiment='table9' is not one of"),
    (["table1", "--model", "smallcnn", "--target", "synthetic:target"], "needs 'source'"),
    (["fig4a", "--model", "smallcnn", "--source", "synthetic:pretrain", "--target",
      "synthetic:target"], "fig4a measures recall"),
    # named as missing, not as a folder with one split
    (["table1", "--model", "smallcnn", "--source", "synthetic:pretrain", "--target", "../nope"],
     "target='../nope' is neither an existing file or folder nor an embedded data set"),
    (["table1", "--model", "smallcnn", "--source", "synthetic:pretrian", "--target",
      "synthetic:target"], "source='synthetic:pretrian' is neither an existing file or folder nor "
                           "an embedded data set (did you mean 'synthetic:pretrain'?)"),
])
def test_user_errors_are_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["experiment", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_config_errors(tmp_path):
    from pretrain_reuse.errors import PretrainReuseError

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nsource: s\ntarget: t\nfinetune: {lrr: 0.1}\n")
    with pytest.raises(PretrainReuseError, match="lrr"):
        load_experiment_config(bad)
    bad.write_text("model: m\nsource: s\ntarget: t\nsweep: {kk: [1]}\n")
    with pytest.raises(PretrainReuseError, match="sweep key"):
        load_experiment_config(bad)
    with pytest.raises(PretrainReuseError, match="seeds"):
        load_experiment_config(None, model="m", source="s", target="t", seeds=())
    with pytest.raises(PretrainReuseError, match="repeat a seed"):
        load_experiment_config(None, model="m", source="s", target="t", seeds=(0, 0))
    with pytest.raises(PretrainReuseError, match=r"seeds must be an integer in \[0, 2\*\*63\)"):
        load_experiment_config(None, model="m", source="s", target="t", seeds=(-1,))


def test_a_corruption_that_evaluate_does_not_know_is_refused_before_any_work(tmp_path):
    from pretrain_reuse.errors import PretrainReuseError

    (tmp_path / "c.yaml").write_text("corruption: fog:3\n")
    with pytest.raises(PretrainReuseError, match="corruption 'fog:3' is not NAME:SEVERITY"):
        load_experiment_config(tmp_path / "c.yaml", model="m", target="t")
    assert load_experiment_config(None, model="m", target="t",
                                  corruption="contrast:2").corruption == "contrast:2"


def test_every_recipe_builds_rows_from_the_defaults():
    cfg = load_experiment_config(None, model="m", source="s", target="t", relevant=(1, 2))
    for name, (rows, x_label, _) in RECIPES.items():
        built = rows(cfg)
        assert built, name
        assert (x_label is None) == all(r.x is None for r in built if r.method != "vanilla"), name


def test_knowledge_recipe_compares_pretrainings_and_correlates_with_accuracy(quick_demo, tmp_path,
                                                                            monkeypatch):
    from scipy.stats import pearsonr, spearmanr

    demo, _, _ = quick_demo
    cfg = load_experiment_config(_config(
        demo, tmp_path, pretrainings={"supervised": str(demo / "pretrain" / "model.safetensors"),
                                      "target-tuned": str(demo / "finetune" / "vanilla-seed0" /
                                                          "model.safetensors")},
        explain={"players": "parts", "samples": 3}), seeds=(0, 1))
    out = tmp_path / "knowledge"
    table = run_experiment("knowledge", cfg, out, progress=False)
    rows = {r["method"]: r for r in table.rows}
    assert set(rows) == {"supervised fine-tuned", "supervised linear probe", "target-tuned fine-tuned",
                         "target-tuned linear probe", "scratch"}
    ratio_means = []
    for label in ("supervised", "target-tuned"):
        row = rows[f"{label} fine-tuned"]
        saved = [json.loads((out / "knowledge" / f"{label}-seed{s}" / "knowledge.json").read_text())
                 ["report"]["overall"] for s in (0, 1)]
        for k in ("preserve", "discard", "new", "exclusive"):  # the analysis' own numbers
            assert row[k] == pytest.approx(np.mean([o[k]["mean"] for o in saved]))
            assert row[f"{k}_std"] == pytest.approx(np.std([o[k]["mean"] for o in saved], ddof=1))
        assert row["preserve"] + row["discard"] == pytest.approx(1.0)
        ratio_means += [o["preserve"]["mean"] for o in saved]
        # each set alone: the fidelity set_ablation gives each analysis, over the seeds
        alone = [json.loads((out / "knowledge" / f"{label}-seed{s}" / "knowledge.json").read_text())
                 ["ablation"] for s in (0, 1)]
        for k in ("preserve", "new"):
            fidelity = [a[k]["fidelity"]["mean"] for a in alone]
            assert row[f"{k}_alone"] == pytest.approx(np.mean(fidelity))
            assert row[f"{k}_alone_std"] == pytest.approx(np.std(fidelity, ddof=1))
        # the levels preserve is read against: chance and the other-image control, likewise
        summaries = [json.loads((out / "knowledge" / f"{label}-seed{s}" / "knowledge.json")
                                .read_text()) for s in (0, 1)]
        for k, levels in (("preserve_chance", [m["report"]["chance"] for m in summaries]),
                          ("preserve_other_image", [m["other_image"]["overall"] for m in summaries])):
            assert row[k] == pytest.approx(np.mean([level["preserve"]["mean"] for level in levels]))
    extra = table.extra
    assert extra["models"] == ["supervised seed 0", "supervised seed 1", "target-tuned seed 0",
                               "target-tuned seed 1"]
    corr = extra["correlation"]["preserve"]
    assert corr["ratio"] == pytest.approx(ratio_means)
    assert corr["pearson"] == pytest.approx(pearsonr(ratio_means, extra["accuracy"])[0])
    assert corr["spearman"] == pytest.approx(spearmanr(ratio_means, extra["accuracy"])[0])
    # what the ratios rest on: the analyses' threshold, players, baseline and samples
    analyses = [json.loads(p.read_text())["samples"]
                for p in sorted((out / "knowledge").glob("*/knowledge.json"))]
    assert len(analyses) == 4 and {a["n"] for a in analyses} == {3}
    correct = sorted(a["correct_for_all"] for a in analyses)
    note = ("salient = |I| > τ = 0.05 × the sample's largest interaction; players parts, baseline "
            "zero; 3 of the 3 samples asked explained per analysis, drawn among the test samples "
            "every compared model classifies correctly (" +
            (f"{correct[0]}" if correct[0] == correct[-1] else f"{correct[0]}–{correct[-1]}"))
    assert note in (out / "results.md").read_text()
    assert "preserve ± std" not in (out / "results.md").read_text()
    assert f"{row['preserve']:.3f} ± {row['preserve_std']:.3f}" in (out / "results.md").read_text()
    assert "| preserve, chance | preserve, other image | preserved alone (R²) | new alone (R²) |" \
        in (out / "results.md").read_text()
    assert f"{row['new_alone']:.3f} ± {row['new_alone_std']:.3f}" in (out / "results.md").read_text()
    # the correlation is in results.md too (it was in experiment.json and report.html only)
    markdown = (out / "results.md").read_text()
    assert ("## Knowledge ratios against test accuracy\n\nAcross 4 fine-tuned models "
            "(supervised seed 0, supervised seed 1, target-tuned seed 0, target-tuned seed 1)"
            in markdown)
    pearson = f"| preserve | {corr['pearson']:+.2f} | [{corr['pearson_ci'][0]:+.2f}, "
    assert pearson in markdown
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "Knowledge ratios against test accuracy" in page and html.escape(note) in page
    assert html.escape(pearson.split(" | ")[1]) in page
    # a damaged analysis (an interactions file deleted, then its knowledge.json too) is
    # recomputed by a rerun, which gives the same table
    analysis = out / "knowledge" / "supervised-seed1"
    (analysis / "finetuned" / "interactions-0002.safetensors").unlink()
    assert run_experiment("knowledge", cfg, out, progress=False).rows == table.rows
    (analysis / "knowledge.json").unlink()
    (analysis / "scratch" / "interactions-0000.safetensors").write_bytes(b"not safetensors")
    assert run_experiment("knowledge", cfg, out, progress=False).rows == table.rows
    # with a corruption: the same runs (it changes none), each fine-tuned model also scored on the
    # corrupted test data with its run's seed, and the ratios correlated with that accuracy
    from pretrain_reuse.experiments.table import run_folder
    from pretrain_reuse.finetune.evaluate import evaluate_model
    from pretrain_reuse.models import create_backbone, output_class_names

    corrupted = run_experiment("knowledge", replace(cfg, corruption="gaussian-noise:4"), out,
                               progress=False)
    assert corrupted.rows == table.rows and "corrupted" not in table.extra
    test = open_dataset("synthetic:target", split="test")
    want = []
    for label in ("supervised", "target-tuned"):
        for s in (0, 1):
            net = create_backbone(cfg.model, weights=str(
                run_folder(out, f"{label} fine-tuned", None, s) / "model.safetensors"))
            want.append(evaluate_model(net, test, class_names=output_class_names(net, test.class_names),
                                       corruption="gaussian-noise:4", seed=s)["top1"])
    got = corrupted.extra["corrupted"]
    assert got["corruption"] == "gaussian-noise:4" and got["accuracy"] == want
    assert got["accuracy"] != extra["accuracy"]
    assert got["correlation"]["preserve"]["pearson"] == pytest.approx(pearsonr(ratio_means, want)[0])
    markdown = (out / "results.md").read_text()
    assert "## Knowledge ratios against accuracy on corrupted test data" in markdown
    assert "corrupted by gaussian-noise:4" in markdown
    assert main(["report", str(out)]) == 0
    assert "Knowledge ratios against accuracy on corrupted test data" in (out / "report.html").read_text()
    # a column no sample defines (here new_alone, made undefined everywhere) is left out of the
    # rows and of the correlation: JSON has no NaN, and writing it failed
    from pretrain_reuse.knowledge import metrics

    set_ablation = metrics.set_ablation

    def undefined_new(report, finetuned):
        alone = set_ablation(report, finetuned)
        alone.measures["new"]["fidelity"][:] = np.nan
        return alone

    monkeypatch.setattr(metrics, "set_ablation", undefined_new)
    rows = {r["method"]: r for r in run_experiment("knowledge", cfg, out, progress=False).rows}
    before = {r["method"]: r for r in table.rows}["supervised fine-tuned"]
    assert rows["supervised fine-tuned"]["new_alone"] is None
    assert rows["supervised fine-tuned"]["preserve_alone"] == before["preserve_alone"]
    extra = json.loads((out / "experiment.json").read_text())["extra"]
    assert "new_alone" not in extra["correlation"] and "preserve_alone" in extra["correlation"]
    assert extra["undefined"] == ["new_alone"]
    assert ("No correlation for new alone (R²): a model defines it on none of its samples."
            in (out / "results.md").read_text())


def test_a_skip_naming_no_row_is_refused_and_rows_of_other_recipes_are_not(tmp_path):
    from pretrain_reuse.errors import PretrainReuseError

    cfg = load_experiment_config(None, model="m", source="s", target="t", skip=("co-tunning",))
    with pytest.raises(PretrainReuseError, match="skip names 'co-tunning', which no experiment has"):
        run_experiment("table1", cfg, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    # table2 has no co-tuning row, but a config shared with table1 may skip it: it gets past the
    # check (and stops later, at the model 'm' that does not exist)
    shared = load_experiment_config(None, model="m", source="s", target="t", skip=("co-tuning",))
    with pytest.raises(PretrainReuseError) as err:
        run_experiment("table2", shared, tmp_path / "y", progress=False)
    assert "skip" not in str(err.value)


@pytest.mark.parametrize("sweep, message", [
    ({"k": []}, "sweep k is empty"),
    ({"k": [50, 50]}, "sweep k [50, 50] repeats a value"),
    ({"clusters": [64, 64.0]}, "repeats a value"),
    ({"train_fraction": [0.3333333, 0.33333334]}, "repeats a value"),  # one run folder x=0.333333
    ({"k": [0.5]}, "sweep k must hold whole numbers >= 1, got 0.5"),  # int(0.5) would select 0
    ({"k": [-5]}, "sweep k must hold whole numbers >= 1"),
    ({"clusters": [1]}, "sweep clusters must hold whole numbers >= 2"),
    ({"train_fraction": [2.0]}, "sweep train_fraction must hold shares in (0, 1]"),
    ({"long_tail_ratio": [0.5]}, "sweep long_tail_ratio must hold finite numbers >= 1"),
    ({"eps_c": [float("nan")]}, "sweep eps_c must hold positive finite numbers"),
    ({"groups": [2, 3]}, "sweep groups takes one number of groups"),  # only the first was used
])
def test_a_sweep_that_would_silently_change_or_repeat_rows_is_refused(sweep, message):
    from pretrain_reuse.errors import PretrainReuseError

    with pytest.raises(PretrainReuseError) as err:
        load_experiment_config(None, model="m", source="s", target="t", sweep=sweep)
    assert message in str(err.value)


@pytest.mark.parametrize("extra, message", [
    ({"relevant": (3, 3)}, "must list distinct pool class ids >= 0"),
    ({"relevant": (-1,)}, "must list distinct pool class ids >= 0"),
    ({"embed_batch_size": 0}, "embed_batch_size must be >= 1"),
    ({"metric": "l3"}, "metric='l3' is not one of"),
    # both would run in knowledge/a-b-seed0 and runs/a-b-fine-tuned-seed0: the second reuses
    # the first's fine-tuned model as its own
    ({"pretrainings": {"a b": "x", "a-b": "y"}}, "label 'a-b' makes the folder name 'a-b' as 'a b'"),
    ({"pretrainings": {"a": ""}}, "pretrainings['a'] = '' is not a file"),
    ({"weights": "no/such.safetensors"}, "weights = 'no/such.safetensors' is not a file"),
    # stored, then silently ignored: vanilla has no source loss, knowledge seeds per run
    ({"lam": {"vanilla": 0.5}}, "lam {vanilla: 0.5} has no effect: mode 'vanilla' has no source"),
    ({"explain": {"seed": 5}}, "explain 'seed' cannot be set: each analysis takes the seed"),
    ({"modes": {"tuning": {"lr": 0.1}}}, "modes key='tuning' is not one of"),
    ({"modes": {"scratch": {"seed": 3}}}, "modes 'scratch' cannot set 'seed': the recipe sets it"),
    ({"modes": {"scratch": {"train_fraction": 0.5}}}, "a data regime holds for every run"),
    # the selection is made for the images of the finetune regime, drawn in its order
    ({"modes": {"scratch": {"long_tail_order": "random"}}}, "a data regime holds for every run"),
    ({"modes": {"scratch": {"lam": 1.0}}}, "modes 'scratch' sets lam, which has no effect"),
    ({"modes": {"vanilla": {"cutout": 0.1}}},
     "modes 'vanilla' sets cutout, which has no effect in mode 'vanilla' (only in reuse-unlabeled)"),
    ({"modes": {"reuse": {"lam": 1.0}}, "lam": {"reuse": 0.5}}, "λ of mode 'reuse' is given twice"),
    ({"modes": {"scratch": {"lr": -1.0}}}, "lr must be"),
    ({"modes": {"scratch": {"learning_rate": 0.1}}}, "modes 'scratch' key='learning_rate' is not one of"),
    ({"modes": {"scratch": 0.1}}, "'modes' must be a mapping of names to mappings"),
])
def test_settings_that_fail_late_or_mix_runs_are_refused_with_the_config(extra, message):
    from pretrain_reuse.errors import PretrainReuseError

    with pytest.raises(PretrainReuseError) as err:
        load_experiment_config(None, model="m", source="s", target="t", **extra)
    assert message in str(err.value)


def test_each_mode_trains_with_its_own_settings_on_top_of_finetune(tmp_path):
    from pretrain_reuse.experiments.recipes import RECIPES as ROWS
    from pretrain_reuse.experiments.workspace import Workspace

    cfg = load_experiment_config(None, model="m", target="t", lam={"reuse": 0.7},
                                 finetune={"lr": 0.01, "epochs": 5},
                                 modes={"scratch": {"lr": 0.1, "epochs": 50},
                                        "linear-probe": {"head_lr_mult": 1.0, "lr": 0.1}})
    ws = Workspace(cfg, tmp_path, progress=False)
    runs = {row.mode: ws.run_config(row, seed=2) for row in ROWS["knowledge"][0](cfg)}
    assert {mode: (ft.lr, ft.epochs, ft.head_lr_mult, ft.seed) for mode, ft in runs.items()} == {
        "vanilla": (0.01, 5, 10.0, 2), "linear-probe": (0.1, 5, 1.0, 2), "scratch": (0.1, 50, 10.0, 2)}
    reuse = next(r for r in ROWS["table1"][0](cfg) if r.mode == "reuse")
    assert ws.run_config(reuse, seed=0).lam == 0.7


def test_an_experiment_config_built_in_python_is_type_checked():
    from pretrain_reuse.errors import PretrainReuseError
    from pretrain_reuse.experiments import ExperimentConfig

    with pytest.raises(PretrainReuseError, match="modes must be a mapping of names to mappings"):
        ExperimentConfig(model="m", target="t", modes={"scratch": 0.1})
    assert ExperimentConfig(model="m", target="t", seeds=[np.int64(4)]).seeds == (4,)


def test_a_skip_of_every_row_is_refused_before_writing_an_empty_table(tmp_path):
    from pretrain_reuse.errors import PretrainReuseError

    cfg = load_experiment_config(None, model="m", source="s", target="t", relevant=(1,),
                                 skip=("uot cosine", "greedy-ot cosine"))
    with pytest.raises(PretrainReuseError, match="skip leaves no row of fig4a to run"):
        run_experiment("fig4a", cfg, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_a_k_above_the_pool_classes_is_refused_before_anything_is_written(quick_demo, tmp_path):
    # it failed at the first selection, once the folder was claimed and the units computed
    # (a late error still leaves the folder to the corrected command: the source-batch test below)
    from pretrain_reuse.errors import PretrainReuseError

    demo, _, _ = quick_demo
    path = _config(demo, tmp_path, sweep={"long_tail_ratio": [2.0]},
                   finetune={**FAST, "max_steps": 1})
    out = tmp_path / "t3"
    with pytest.raises(PretrainReuseError, match=r"k=500 exceeds the 128 classes of source .* "
                                                 r"\(row 'reuse uot classes'\); pass k <= 128"):
        run_experiment("table3", load_experiment_config(path, seeds=(0,), k=500), out,
                       progress=False)
    assert not out.exists()
    table = run_experiment("table3", load_experiment_config(path, seeds=(0,), k=8), out,
                           progress=False)
    assert [(r["method"], r["units"]) for r in table.rows] == [("vanilla", None),
                                                               ("reuse uot classes", 8)]


def test_a_reclaimed_folder_recomputes_what_the_old_settings_made_and_keeps_its_inputs(
        quick_demo, tmp_path, monkeypatch):
    from pretrain_reuse.experiments import workspace
    from pretrain_reuse.features import FeatureStore
    from pretrain_reuse.selection import SelectConfig, select
    from pretrain_reuse.units import Units, class_means

    demo, _, _ = quick_demo
    rows = ("reuse greedy-ot l2", "reuse greedy-ot cosine", "reuse uot l2")  # run uot cosine only
    path = _config(demo, tmp_path, target_features=None, skip=rows,
                   finetune={**FAST, "max_steps": 1})
    out = tmp_path / "t4"

    def stopped(self, row, seed):  # the first run dies (killed, out of memory...)
        raise RuntimeError("stopped")

    monkeypatch.setattr(workspace.Workspace, "finetune", stopped)
    with pytest.raises(RuntimeError, match="stopped"):
        run_experiment("table4", load_experiment_config(path, seeds=(0,)), out, progress=False)
    monkeypatch.undo()
    embedded = out / "features" / "target"
    selection = next((out / "selections").glob("classes-uot-cosine-*.json"))
    assert (embedded / "index.json").exists() and selection.exists()

    # other pool features (the same images, other numbers): the units and the selection made
    # from the old ones go. The target embedding would go too (another embed batch size), but
    # the new settings read it as their target_features, so it stays.
    pool = FeatureStore.load(demo / "features_pretrain")
    noise = np.random.default_rng(0).normal(size=pool.features.shape).astype(np.float32)
    FeatureStore(noise, pool.labels, pool.ids, pool.class_names).save(tmp_path / "pool")
    cfg = load_experiment_config(path, seeds=(0,), source_features=str(tmp_path / "pool"),
                                 target_features=str(embedded), embed_batch_size=128)
    # said also without progress (it was a progress line): files are deleted
    with pytest.warns(UserWarning, match=r"held an experiment with other settings \(.*source_features"
                                         r".*\) that finished no run: removed what the change affects"):
        run_experiment("table4", cfg, out, progress=False)
    assert (embedded / "index.json").exists()
    units = Units.load(out / "units" / "classes.safetensors")
    np.testing.assert_allclose(units.prototypes,
                               class_means(FeatureStore.load(tmp_path / "pool")).prototypes)
    expected = select(units, class_means(FeatureStore.load(embedded)),
                      SelectConfig(method="uot", k=len(RELATED)))
    assert Selection.load(selection).selected == expected.selected
    run = RunResult.load(out / "runs" / "reuse-uot-cosine-seed0" / "result.json")
    assert json.loads(run.meta["inputs"]["selected"]) == expected.selected


def _store_like(demo, tmp_path, name, *, rows=None, labels=None):
    from pretrain_reuse.features import FeatureStore

    store = FeatureStore.load(demo / "features_target")
    rows = np.arange(len(store)) if rows is None else rows
    FeatureStore(np.asarray(store.features)[rows],
                 store.labels[rows] if labels is None else labels[rows],
                 [store.ids[i] for i in rows], store.class_names).save(tmp_path / name)
    return str(tmp_path / name)


def test_feature_stores_of_other_data_are_refused_before_anything_is_written(quick_demo, tmp_path):
    from pretrain_reuse.errors import PretrainReuseError

    demo, _, _ = quick_demo
    target = str(demo / "features_target")
    n = len(open_dataset("synthetic:target").ids)
    labels = open_dataset("synthetic:target").labels
    shifted = (labels + 1) % (labels.max() + 1)  # every sample in another of the same classes
    cases = [
        ({"target": "synthetic:target-1"},  # the features of target-0 for the task target-1
         f"target_features {target!r} are not features of target 'synthetic:target-1': its sample"),
        ({"source_features": target}, f"source_features {target!r} are not features of source"),
        ({"target_features": _store_like(demo, tmp_path, "half", rows=np.arange(0, n, 2))},
         f"hold {n // 2} of the {n} training images of target 'synthetic:target'"),
        ({"target_features": _store_like(demo, tmp_path, "relabelled", labels=shifted)},
         "label sample"),
    ]
    for i, (extra, message) in enumerate(cases):
        cfg = load_experiment_config(_config(demo, tmp_path, **extra), seeds=(0,))
        out = tmp_path / f"x{i}"
        with pytest.raises(PretrainReuseError) as err:
            run_experiment("fig4a", cfg, out, progress=False)
        assert message in str(err.value) and "embed" in str(err.value)
        assert not out.exists()


@pytest.mark.parametrize("name, finetune, message", [
    ("table4", {"seed": 7}, "finetune 'seed' cannot be set for table4: each run takes its seed "
                            "from seeds (--seeds)"),
    ("table1", {"mode": "scratch"}, "finetune 'mode' cannot be set for table1: each row of table1 "
                                    "sets its own mode"),
    ("fig3b", {"train_fraction": 0.5}, "fig3b sweeps it (give its values as sweep: "
                                       "{train_fraction: [...]})"),
    ("table3", {"train_fraction": 0.5}, "table3 sweeps long_tail_ratio, another data regime"),
])
def test_finetune_keys_the_recipe_sets_itself_are_refused(name, finetune, message, tmp_path,
                                                          capsys):
    config = tmp_path / "exp.yaml"
    # a model that does not exist: whatever is not refused up front fails fast on it
    config.write_text(json.dumps({"model": "m", "source": "synthetic:pretrain",
                                  "target": "synthetic:target", "finetune": finetune}))
    out = tmp_path / "x"
    assert main(["experiment", name, "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("name, finetune, message", [
    # table1 trains on every target image: the order of a long tail was ignored
    ("table1", {"long_tail_order": "random"},
     "finetune 'long_tail_order' has no effect in table1: no run of it trains in the "
     "long_tail_ratio regime that long_tail_order shapes; set long_tail_ratio under finetune "
     "too, or remove long_tail_order"),
    # fig3b sweeps the other regime, which finetune cannot set a long tail beside
    ("fig3b", {"long_tail_order": "random"},
     "remove it from finetune (fig3b sweeps train_fraction, another data regime)"),
    # where the runs train on a long tail, swept or under finetune, the order applies: the
    # config passes this check, and the command fails later, on the model that does not exist
    ("table3", {"long_tail_order": "random"}, None),
    ("table1", {"long_tail_ratio": 10, "long_tail_order": "random"}, None),
])
def test_a_long_tail_order_without_a_long_tail_is_refused_before_anything_is_written(
        name, finetune, message, tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text(json.dumps({"model": "m", "source": "synthetic:pretrain",
                                  "target": "synthetic:target", "finetune": finetune}))
    out = tmp_path / "x"
    assert main(["experiment", name, "--config", str(config), "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    if message is None:
        assert "model='m' is not one of" in line, line
    else:
        assert message in line, line
    assert not out.exists()


def test_target_data_without_test_data_is_refused_before_the_folder_is_claimed(tmp_path, capsys):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / "imgs" / c / f"{i}.png")
    out = tmp_path / "x"
    argv = ["experiment", "table1", "--model", "smallcnn", "--source", "synthetic:pretrain",
            "--target", str(tmp_path / "imgs"), "--seeds", "0", "--quiet", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pass --target-test" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # else the corrected command would find it claimed


def test_one_seed_leaves_the_spread_empty_not_zero(quick_demo, tmp_path):
    demo, _, _ = quick_demo
    skip = ("reuse greedy-ot l2", "reuse greedy-ot cosine", "reuse uot l2")
    cfg = load_experiment_config(_config(demo, tmp_path, skip=skip, finetune={**FAST, "max_steps": 1}),
                                 seeds=(0,))
    out = tmp_path / "t4"
    table = run_experiment("table4", cfg, out, progress=False)
    assert table.rows[0]["top1_std"] is None  # a sample standard deviation of one value
    with open(out / "results.csv") as fh:
        (row,) = csv.DictReader(fh)
    assert row["top1_std"] == "" and float(row["top1_mean"]) == pytest.approx(table.rows[0]["top1_mean"])
    assert f"| {table.rows[0]['top1_mean']:.4f} |" in (out / "results.md").read_text()
    # a swept table with one seed plots its lines without a spread band
    swept = [{**table.rows[0], "method": "reuse uot classes", "x": x} for x in (0.5, 1.0)]
    ExperimentTable("fig3b", swept, "target training fraction", {}).save(tmp_path / "fig")
    assert (tmp_path / "fig" / "results.png").stat().st_size > 0


def test_a_table_that_selects_nothing_has_no_recall_or_units_columns():
    row = {"method": "supervised", "x": None, "recall": None, "units": None, "top1_mean": 0.5,
           "top1_std": None, "top1_at_best_val_mean": 0.5, "seeds": [0]}
    head, body = ExperimentTable("knowledge", [row], None, {}).cells()
    assert "recall" not in head and "units" not in head and body[0][:2] == ["supervised", "0.5000"]
    head, body = ExperimentTable("table1", [{**row, "recall": 0.75, "units": 3.0}], None, {}).cells()
    assert head[1:3] == ["recall", "units"] and body[0][1:3] == ["0.7500", "3"]


def _refused_table4(capsys, config, out, *flags):
    """The one-line error of a table4 rerun into ``out`` with ``config`` and ``flags``."""
    return _one_line_error(capsys, ["experiment", "table4", "--config", str(config), *flags,
                                    "--quiet", "--out", str(out)])


def _one_line_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_settings_the_recipe_never_reads_may_change_and_a_weights_file_changed_in_place_may_not(
        quick_demo, tmp_path, capsys):
    import shutil

    demo, _, _ = quick_demo
    weights = tmp_path / "weights.safetensors"
    shutil.copy(demo / "pretrain" / "model.safetensors", weights)
    path = _config(demo, tmp_path, weights=str(weights))
    out = tmp_path / "t4"
    run_experiment("table4", load_experiment_config(path, seeds=(0,)), out, progress=False)
    # table4 sweeps nothing, has no cluster or reuse-unlabeled rows, and a run may resume with
    # another checkpoint_every: none of these is a setting of its rows
    irrelevant = _config(demo, tmp_path, weights=str(weights), sweep={"k": [8, 24]},
                         lam={"reuse-unlabeled": 0.5}, finetune={**FAST, "checkpoint_every": 500},
                         modes={"scratch": {"lr": 0.5}, "reuse": {"checkpoint_every": 100}})
    table = run_experiment("table4", load_experiment_config(irrelevant, seeds=(0, 1), clusters=32),
                           out, progress=False)
    assert all(r["seeds"] == [0, 1] for r in table.rows)
    assert not {"sweep", "clusters", "cluster_k", "metric", "explain", "pretrainings"} & set(table.params)
    assert table.params["lam"] == {} and "checkpoint_every" not in table.params["finetune"]
    assert "modes" not in table.params  # no scratch row; checkpoint_every may change on resume
    # a default written out, and the same files named another way, are the same settings (both
    # were refused as "other settings", though the runs record the very same values and files)
    explicit = _config(demo, tmp_path, weights=f"{weights.parent}/./{weights.name}",
                       source_features=str(demo / "features_pretrain") + "/",
                       lam={"reuse": 0.3}, finetune={**FAST, "momentum": 0.9},
                       modes={"reuse": {"lr": FAST["lr"]}})
    again = run_experiment("table4", load_experiment_config(explicit, seeds=(0, 1)), out,
                           progress=False)
    assert [r["top1_mean"] for r in again.rows] == [r["top1_mean"] for r in table.rows]
    # the table's metadata names its input files by their hashes (it named none)
    inputs = again.meta["inputs"]
    assert "weights_sha256" in inputs and inputs == {k: again.params[k] for k in inputs}
    # a setting its rows read is still refused
    err = _refused_table4(capsys, path, out, "--k", "8")
    assert "other settings or inputs (k)" in err
    # other weights under the same name: features and runs made with the old ones would be reused
    shutil.copy(demo / "finetune" / "vanilla-seed0" / "model.safetensors", weights)
    err = _refused_table4(capsys, path, out, "--seeds", "0")
    assert "other settings or inputs (weights_sha256)" in err
    # so are the settings of a mode it trains
    shutil.copy(demo / "pretrain" / "model.safetensors", weights)
    reuse_lr = _config(demo, tmp_path, weights=str(weights), modes={"reuse": {"lr": 0.5}})
    err = _refused_table4(capsys, reuse_lr, out, "--seeds", "0")
    assert "other settings or inputs (modes)" in err
    # a damaged run result says how to redo the run (it said only "regenerate it")
    damaged = next(out.glob("runs/*-seed0"))
    (damaged / "result.json").write_text("{")
    err = _refused_table4(capsys, _config(demo, tmp_path, weights=str(weights)), out, "--seeds", "0")
    assert f"delete the run folder {str(damaged)!r} and rerun the experiment" in err


def test_a_rerun_rewrites_the_report_whose_curves_are_the_runs_of_the_table(quick_demo, tmp_path,
                                                                          capsys):
    demo, _, _ = quick_demo
    path = _config(demo, tmp_path, sweep={"long_tail_ratio": [2.0]},
                   finetune={**FAST, "max_steps": 1})
    out = tmp_path / "t3"
    run_experiment("table3", load_experiment_config(path, seeds=(0, 1)), out, progress=False)
    assert main(["report", str(out)]) == 0
    assert "Fine-tuning curves (4 of 4 runs)" in (out / "report.html").read_text()
    for seeds in ((0, 1, 2), (0,)):
        table = run_experiment("table3", load_experiment_config(path, seeds=seeds), out,
                               progress=False)
        page = (out / "report.html").read_text()
        # the page holds the new table and draws its runs only, although the folder keeps the
        # runs of seeds 1 and 2 after the rerun with seed 0
        for cells in table.cells()[1]:
            assert cells[-1] == str(len(seeds))
            assert "".join(f"<td>{html.escape(c)}</td>" for c in cells) in page
        assert f"Fine-tuning curves ({2 * len(seeds)} of {2 * len(seeds)} runs)" in page
        assert table.run_dirs(out) == [out / "runs" / f"{slug}-x=2-seed{s}"
                                       for slug in ("vanilla", "reuse-uot-classes") for s in seeds]
    assert len(list(out.glob("runs/*/result.json"))) == 6


@pytest.mark.parametrize("recipe, sweep, needle", [
    ("table3", {"long_tail_ratio": [10.0, 1000.0]}, "the largest ratio this data allows is {n}"),
    ("fig3b", {"train_fraction": [0.5, 0.01]}, "the smallest fraction this data allows is {f:g}"),
])
def test_a_sweep_value_the_data_cannot_realise_is_refused_before_the_folder_is_claimed(
        quick_demo, tmp_path, capsys, recipe, sweep, needle):
    demo, _, _ = quick_demo
    n = int(np.bincount(open_dataset("synthetic:target", split="train").labels).max())
    out = tmp_path / "x"
    err = _one_line_error(capsys, ["experiment", recipe, "--config",
                                   str(_config(demo, tmp_path, sweep=sweep)), "--out", str(out)])
    assert needle.format(n=n, f=1 / n) in err
    swept = next(iter(sweep))
    assert f"(the {recipe} recipe sweeps {swept} over {sweep[swept]}; set sweep: " in err
    assert not out.exists()


def test_a_default_sweep_value_the_pool_cannot_take_names_the_sweep(quick_demo, tmp_path, capsys):
    # fig3a's default k (50 ... 300) on the world's 128 pool classes: the error named --k, a
    # value the user never typed, and not the sweep that set it
    demo, _, _ = quick_demo
    out = tmp_path / "x"
    err = _one_line_error(capsys, ["experiment", "fig3a", "--config", str(_config(demo, tmp_path)),
                                   "--out", str(out)])
    assert "k=200 exceeds the 128 classes of source" in err and not out.exists()
    assert ("sweep only k <= 128 (the fig3a recipe sweeps k over [50, 100, 200, 300]; set sweep: "
            "{k: [...]} in --config to values this data allows)") in err
    assert "--k" not in err.replace("--config", "")  # the flag does not change a swept k


@pytest.mark.parametrize("recipe, sweep, needle", [
    ("table2", {"clusters": [64, 100_000]}, "100000 k-means clusters need at least as many pool "
                                            "samples; source 'synthetic:pretrain' has {n}: lower clusters"),
    ("fig4b", {"groups": [500]}, "cannot cut 128 pool classes into 500 groups; lower groups"),
])
def test_units_the_pool_cannot_make_are_refused_before_the_folder_is_claimed(
        quick_demo, tmp_path, capsys, recipe, sweep, needle):
    # k-means of every sample came first (minutes on a real pool), then the refusal
    from pretrain_reuse.features import FeatureStore

    demo, _, _ = quick_demo
    out = tmp_path / "x"
    n = len(FeatureStore.load(demo / "features_pretrain", lazy=True))
    err = _one_line_error(capsys, ["experiment", recipe, "--config",
                                   str(_config(demo, tmp_path, sweep=sweep)), "--out", str(out)])
    assert needle.format(n=n) in err and f"the {recipe} recipe sweeps" in err
    assert not out.exists()


def test_feature_stores_of_another_network_than_the_experiments_are_warned_of(quick_demo, tmp_path):
    # a config whose stores were embedded by other weights than its model's selected on those
    # features without a word; the recipe's own embedding would have used its model
    import torch

    from pretrain_reuse.models import create_backbone, save_backbone

    demo, _, _ = quick_demo
    torch.manual_seed(5)
    other = save_backbone(create_backbone("smallcnn"), tmp_path / "other.safetensors", {})
    cfg = load_experiment_config(_config(demo, tmp_path, weights=str(other),
                                         sweep={"eps_c": [0.01]}), seeds=(0,))
    with pytest.warns(UserWarning) as caught:
        run_experiment("fig4a", cfg, tmp_path / "x", progress=False)
    messages = [str(w.message) for w in caught if "were embedded by" in str(w.message)]
    assert [m.split()[0] for m in messages] == ["source_features", "target_features"]
    assert (f"not by the experiment's model smallcnn with weights {str(other)!r} at its "
            "penultimate layer: the selections rank units by those features") in messages[0]
    same = load_experiment_config(_config(demo, tmp_path, sweep={"eps_c": [0.01]}), seeds=(0,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = run_experiment("fig4a", same, tmp_path / "y", progress=False)
    assert "layer" not in table.params  # the default: folders of earlier versions record none
    # the same network at another layer (a MoCo backbone selects on its projection head)
    head = load_experiment_config(_config(demo, tmp_path, layer="head", sweep={"eps_c": [0.01]}),
                                  seeds=(0,))
    with pytest.warns(UserWarning, match="penultimate layer, .* at its head layer: the selections"):
        run_experiment("fig4a", head, tmp_path / "z", progress=False)


def test_relevant_ids_the_pool_lacks_are_refused_before_the_folder_is_claimed(quick_demo, tmp_path,
                                                                             capsys):
    # refused only by the first recall, after every selection was saved in the claimed folder
    from PIL import Image

    demo, _, _ = quick_demo
    flat = tmp_path / "flat"  # unlabelled images: no classes for relevant to name
    flat.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(flat / f"{i}.png")
    given = ["--config", str(_config(demo, tmp_path))]  # the pool's feature store given
    embedded = ["--model", "smallcnn", "--target", "synthetic:target", "--quiet"]
    out = tmp_path / "x"
    for recipe, argv, message in [
        ("fig4a", [*given, "--relevant", "7-24,200"], "relevant id 200 is out of range for the 128 "
         "classes of source 'synthetic:pretrain'; pass ids 0..127"),
        ("fig3a", [*embedded, "--source", "synthetic:pretrain", "--relevant", "128"],
         "relevant id 128 is out of range for the 128 classes"),
        ("fig4a", [*embedded, "--source", str(flat), "--relevant", "1"],
         f"relevant names classes of the pool, but source {str(flat)!r} has no labels"),
    ]:
        err = _one_line_error(capsys, ["experiment", recipe, *argv, "--out", str(out)])
        assert message in err
        assert not out.exists()


def test_late_failures_of_a_run_fail_before_the_folder_is_claimed(quick_demo, tmp_path, capsys):
    demo, _, _ = quick_demo
    out = tmp_path / "x"
    n = int(np.bincount(open_dataset("synthetic:target", split="train").labels).max())
    classes = len(np.unique(open_dataset("synthetic:target", split="train").labels))
    # 0.05 of each class: fewer images than a batch of 64; the fix is finetune's batch size
    config = _config(demo, tmp_path, sweep={"train_fraction": [0.05]},
                     finetune={**FAST, "batch_size": 64})
    err = _one_line_error(capsys, ["experiment", "fig3b", "--config", str(config), "--out", str(out)])
    kept = classes * int(0.05 * n)
    assert f"batch size 64 exceeds the {kept} " in err and "finetune.batch_size" in err
    err = _one_line_error(capsys, ["experiment", "table4", "--config", str(_config(demo, tmp_path)),
                                   "--model", "resnet9000", "--out", str(out)])
    assert "resnet9000" in err and not out.exists()


def test_the_table_says_what_the_validation_accuracy_rests_on(quick_demo, tmp_path):
    demo, _, _ = quick_demo
    labels = open_dataset("synthetic:target", split="train").labels
    path = _config(demo, tmp_path, sweep={"long_tail_ratio": [3.0]}, finetune={**FAST, "max_steps": 1})
    out = tmp_path / "t3"
    table = run_experiment("table3", load_experiment_config(path, seeds=(0,)), out, progress=False)
    split = json.loads((out / "runs" / "vanilla-x=3-seed0" / "split.json").read_text())
    ids = open_dataset("synthetic:target", split="train").ids
    trained = np.bincount([labels[ids.index(i)] for i in split["train"]])
    # the floor of n_max / 3 at the last rank makes the ratio realised differ from 3: it is shown
    assert table.rows[0]["x_realised"] == pytest.approx(trained.max() / trained.min())
    # written as the run folder names it (x=3)
    assert f"| 3 (realised {trained.max() / trained.min():.4g}) |" in (out / "results.md").read_text()
    val_labels = {int(labels[ids.index(i)]) for i in split["val"]}
    missing = len(set(labels.tolist()) - val_labels)
    assert missing >= 1  # the long tail's largest class keeps all its images
    assert table.rows[0]["val_images"] == len(split["val"])
    assert table.rows[0]["val_classes_missing"] == missing
    assert f"| {len(split['val'])}, {missing} class" in (out / "results.md").read_text()
    # training on every image leaves no validation: no evaluation was picked on it
    path = _config(demo, tmp_path, sweep={"train_fraction": [1.0]}, finetune={**FAST, "max_steps": 1})
    table = run_experiment("fig3b", load_experiment_config(path, seeds=(0,), skip=("reuse uot classes",)),
                           tmp_path / "f3", progress=False)
    assert table.rows[0]["val_images"] == 0 and table.rows[0]["top1_at_best_val_mean"] is None
    assert table.rows[0]["top1_mean"] is not None
    head, body = table.cells()
    assert body[0][head.index("validation images")] == "0"  # not "0, 10 classes missing"


def _table(name, rows, x_label):
    base = {"recall": None, "units": None, "top1_at_best_val_mean": None,
            "mean_class_acc_mean": None}
    return ExperimentTable(name, [{**base, **r} for r in rows], x_label, {})


def test_a_sweep_of_one_value_is_drawn_as_bars_with_the_seed_spread():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"method": "vanilla", "x": 10.0, "top1_mean": 0.5, "top1_std": 0.02, "seeds": [0, 1]},
            {"method": "reuse uot classes", "x": 10.0, "top1_mean": 0.6, "top1_std": 0.05,
             "seeds": [0, 1]}]
    fig, ax = plt.subplots()
    _table("table3", rows, "long-tail ratio").plot(ax)
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.5, 0.6])
    assert ax.get_ylim()[0] == 0.0  # bars start at 0: their lengths compare as the values do
    spread = [seg for c in ax.collections for seg in c.get_segments()]  # the error bars
    assert sorted(float(s[1][1] - s[0][1]) for s in spread) == pytest.approx([0.04, 0.1])
    # no horizontal reference line per row (the caps of the two error bars differ in height)
    assert all(len(set(line.get_ydata())) > 1 for line in ax.lines)
    plt.close(fig)


def test_the_knowledge_table_draws_accuracy_and_ratios_with_their_seed_spread():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.container import BarContainer

    ratios = {"preserve": 0.4, "preserve_std": 0.05, "discard": 0.6, "discard_std": 0.05,
              "new": 0.3, "new_std": 0.1, "exclusive": 0.2, "exclusive_std": 0.02}
    rows = [{"method": "supervised fine-tuned", "x": None, "top1_mean": 0.7, "top1_std": 0.01,
             "seeds": [0, 1], **ratios},
            {"method": "supervised linear probe", "x": None, "top1_mean": 0.5, "top1_std": 0.03,
             "seeds": [0, 1]}]
    table = _table("knowledge", rows, None)
    fig, ax = plt.subplots()
    table.plot(ax)
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers
            if isinstance(c, BarContainer)}
    assert bars["test top-1"] == pytest.approx([0.7, 0.5])
    for k in ("preserve", "discard", "new", "exclusive"):
        assert bars[k][0] == pytest.approx(ratios[k]) and np.isnan(bars[k][1])
    spread = sorted(float(s[1][1] - s[0][1]) for c in ax.collections for s in c.get_segments()
                    if len(s))  # the NaN spreads of the linear probe's ratios draw nothing
    assert spread == pytest.approx(sorted([0.02, 0.06, 0.1, 0.1, 0.2, 0.04]))
    assert ax.get_ylim()[0] == 0.0
    plt.close(fig)
    head, body = table.cells()
    assert body[0][-4:] == ["0.400 ± 0.050", "0.600 ± 0.050", "0.300 ± 0.100", "0.200 ± 0.020"]
    assert head[-4:] == ["preserve", "discard", "new", "exclusive"]


def test_a_row_without_a_swept_value_shows_an_empty_cell():
    rows = [{"method": "vanilla", "x": None, "top1_mean": 0.5, "top1_std": None, "seeds": [0]},
            {"method": "reuse uot group", "x": 1, "top1_mean": 0.6, "top1_std": None, "seeds": [0]}]
    _, body = _table("fig4b", rows, "score group").cells()
    assert [b[1] for b in body] == ["", "1"]


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.update(name="table7"), "names experiment 'table7', which is not one of table1"),
    (lambda d: d["rows"][0].pop("top1_std"), "row 0 lacks 'top1_std'"),
    (lambda d: d.update(rows=[1]), "row 0 lacks 'method'"),
])
def test_an_experiment_json_the_report_cannot_read_is_one_line(tmp_path, capsys, edit, needle):
    rows = [{"method": "vanilla", "x": None, "top1_mean": 0.5, "top1_std": None, "seeds": [0]}]
    _table("table1", rows, None).save(tmp_path)
    record = json.loads((tmp_path / "experiment.json").read_text())
    edit(record)
    (tmp_path / "experiment.json").write_text(json.dumps(record))
    assert needle in _one_line_error(capsys, ["report", str(tmp_path)])
    assert not (tmp_path / "report.html").exists()


def test_the_knowledge_recipe_needs_no_source_and_the_selecting_ones_do(tmp_path):
    from pretrain_reuse.errors import PretrainReuseError

    cfg = load_experiment_config(None, model="m", target="t")
    assert cfg.source is None and [r.pick for r in RECIPES["knowledge"][0](cfg)] == [None] * 3
    with pytest.raises(PretrainReuseError, match="table1 needs 'source'"):
        run_experiment("table1", cfg, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def _table4_stopped_before_its_run(monkeypatch, path, out):
    """table4's uot cosine row up to its fine-tuning run, which dies (killed, out of memory...):
    features, units and selections are made, no run finished."""
    from pretrain_reuse.experiments import workspace

    def stopped(self, row, seed):
        raise RuntimeError("stopped")

    monkeypatch.setattr(workspace.Workspace, "finetune", stopped)
    with pytest.raises(RuntimeError, match="stopped"):
        run_experiment("table4", load_experiment_config(path, seeds=(0,)), out, progress=False)
    monkeypatch.undo()


def test_a_feature_store_rebuilt_in_place_is_a_changed_setting(quick_demo, tmp_path, monkeypatch,
                                                                capsys):
    import shutil

    from pretrain_reuse.features import FeatureStore
    from pretrain_reuse.units import Units, class_means

    demo, _, _ = quick_demo
    pool = tmp_path / "fs" / "source"
    shutil.copytree(demo / "features_pretrain", pool)
    skip = ("reuse greedy-ot l2", "reuse greedy-ot cosine", "reuse uot l2")
    path = _config(demo, tmp_path, source_features=str(pool), skip=skip,
                   finetune={**FAST, "max_steps": 1})
    out = tmp_path / "t4"
    _table4_stopped_before_its_run(monkeypatch, path, out)

    def rebuild(seed, meta=None):  # other numbers for the same images, under the same path
        old = FeatureStore.load(pool)
        noise = np.random.default_rng(seed).normal(size=old.features.shape).astype(np.float32)
        FeatureStore(noise, old.labels, old.ids, old.class_names, meta=old.meta).save(pool)

    rebuild(1)  # the index.json is the same: only the content tells the stores apart
    # no run finished: the units and selections of the old features are made again
    with pytest.warns(UserWarning, match="removed what the change affects"):
        table = run_experiment("table4", load_experiment_config(path, seeds=(0,)), out, progress=False)
    units = Units.load(out / "units" / "classes.safetensors")
    np.testing.assert_allclose(units.prototypes, class_means(FeatureStore.load(pool)).prototypes)
    assert table.params["source_features_sha256"] != table.params["target_features_sha256"]
    # the same numbers written again (another meta, e.g. its creation time) are the same store
    store = FeatureStore.load(pool)
    FeatureStore(store.features, store.labels, store.ids, store.class_names,
                 meta={**store.meta, "created": "later"}).save(pool)
    assert run_experiment("table4", load_experiment_config(path, seeds=(0,)), out,
                          progress=False).rows == table.rows
    # a finished run was made with the store as it was: a rebuilt one is refused
    rebuild(2)
    err = _refused_table4(capsys, path, out, "--seeds", "0")
    assert "other settings or inputs (source_features_sha256)" in err


def test_a_run_that_would_fail_after_others_finished_fails_before_the_first(quick_demo, tmp_path,
                                                                            capsys):
    demo, _, _ = quick_demo
    out = tmp_path / "t3"
    # the selected classes' source images are fewer than a source batch: known once selected,
    # before the vanilla row (first in the table) runs, so the folder takes the corrected command
    path = _config(demo, tmp_path, sweep={"long_tail_ratio": [3.0]},
                   finetune={**FAST, "max_steps": 1, "source_batch_size": 100_000})
    err = _one_line_error(capsys, ["experiment", "table3", "--config", str(path), "--seeds", "0",
                                   "--quiet", "--out", str(out)])
    assert "batch size 100000 exceeds the " in err and "selected source" in err
    assert "pass a smaller finetune.source_batch_size" in err and not (out / "runs").exists()
    path = _config(demo, tmp_path, sweep={"long_tail_ratio": [3.0]},
                   finetune={**FAST, "max_steps": 1, "source_batch_size": 8})
    with pytest.warns(UserWarning, match=r"other settings \(finetune\) that finished no run"):
        table = run_experiment("table3", load_experiment_config(path, seeds=(0,)), out, progress=False)
    assert [r["method"] for r in table.rows] == ["vanilla", "reuse uot classes"]
    # one epoch of 20 % of the images is fewer steps than the warm-up, while 80 % is more
    epochs = {k: v for k, v in FAST.items() if k != "max_steps"}
    path = _config(demo, tmp_path, sweep={"train_fraction": [0.8, 0.2]},
                   finetune={**epochs, "epochs": 1, "warmup_steps": 10})
    err = _one_line_error(capsys, ["experiment", "fig3b", "--config", str(path), "--quiet",
                                   "--out", str(tmp_path / "f3")])
    assert "warmup_steps=10 exceeds the " in err and "x=0.2-seed0" in err
    assert "pass fewer finetune.warmup_steps" in err
    assert not (tmp_path / "f3").exists()


def test_a_folder_claimed_by_an_earlier_version_with_every_setting_takes_the_same_reads(
        quick_demo, tmp_path, capsys):
    from dataclasses import asdict

    from pretrain_reuse.experiments import SWEEP_DEFAULTS

    demo, _, _ = quick_demo
    skip = ("reuse greedy-ot l2", "reuse greedy-ot cosine", "reuse uot l2")
    path = _config(demo, tmp_path, skip=skip, finetune={**FAST, "max_steps": 1})
    cfg = load_experiment_config(path, seeds=(0,))
    out = tmp_path / "t4"
    table = run_experiment("table4", cfg, out, progress=False)
    # the table returned equals the one saved (its params held tuples, the saved ones lists)
    assert table.params == ExperimentTable.load(out).params and table.params["skip"] == list(skip)
    # the marker as versions before the claim of read settings wrote it: every setting of the
    # config and every sweep, no content hash
    full = {"experiment": "table4", **asdict(cfg),
            "sweep": {k: list(cfg.values(k)) for k in SWEEP_DEFAULTS}}
    for key in ("seeds", "skip"):
        del full[key]
    (out / "run.json").write_text(json.dumps({"kind": "experiment-run", "params": full},
                                             default=list))
    again = run_experiment("table4", load_experiment_config(path, seeds=(0,), clusters=32), out,
                           progress=False)
    assert again.rows == table.rows
    marker = json.loads((out / "run.json").read_text())["params"]
    assert marker == {"experiment": "table4", **{k: v for k, v in json.loads(json.dumps(
        table.params)).items() if k not in ("seeds", "skip")}}
    # a setting the recipe reads is still refused, and only it is named
    err = _refused_table4(capsys, path, out, "--k", "8")
    assert "other settings or inputs (k);" in err


def test_a_knowledge_table_without_fine_tuned_rows_has_no_analysis_to_describe():
    # skip may leave only linear probes and scratch: no analysis ran, so none is described
    from types import SimpleNamespace

    from pretrain_reuse.experiments.run import _knowledge_analysis

    extra = _knowledge_analysis(SimpleNamespace(cfg=SimpleNamespace(seeds=(0,), corruption=None)), [], [])
    assert extra["analysis"] is None and extra["models"] == [] and extra["correlation"] is None
    table = ExperimentTable("knowledge", [], None, {}, {}, extra)
    assert table.note() == ""
    # the table says why it has no correlation (experiment.json and the report did)
    assert table.to_markdown().endswith(
        "## Knowledge ratios against test accuracy\n\nNo correlation with accuracy: a "
        "correlation needs at least 3 fine-tuned models (pre-trainings x seeds).\n")
    # with a corruption, the accuracies on the corrupted data are kept and shown without a
    # correlation too (they were computed, then dropped)
    extra = _knowledge_analysis(SimpleNamespace(cfg=SimpleNamespace(seeds=(0,), corruption="contrast:1")),
                                [], [])
    assert extra["corrupted"] == {"corruption": "contrast:1", "accuracy": [], "correlation": None}
    assert "corrupted by contrast:1" in ExperimentTable("knowledge", [], None, {}, {}, extra).to_markdown()


def test_a_target_folder_of_split_folders_trains_on_train_and_tests_on_test(quick_demo, tmp_path):
    """As finetune reads it: the experiment embedded the whole root (a refusal naming --split)
    and asked for target_test."""
    from PIL import Image

    from pretrain_reuse.errors import PretrainReuseError
    from pretrain_reuse.experiments.recipes import Row
    from pretrain_reuse.experiments.workspace import Workspace

    demo, _, _ = quick_demo
    root = tmp_path / "target"
    for split, count in (("train", 3), ("test", 2)):
        for c in ("c0", "c1"):
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                colour = (100 * i, 120 * (c == "c1"), 0)
                Image.new("RGB", (32, 32), colour).save(root / split / c / f"{i}.png")
    cfg = load_experiment_config(None, model="smallcnn", weights=str(demo / "pretrain" / "model.safetensors"),
                                 target=str(root), seeds=(0,), finetune={**FAST, "batch_size": 64})
    ws = Workspace(cfg, tmp_path / "exp", progress=False)
    assert sorted(ws.data("test").ids) == [f"{c}/{i}.png" for c in ("c0", "c1") for i in range(2)]
    assert len(ws.features("target")) == 6 and ws.split(Row("vanilla", mode="vanilla"), 0)
    # past the test-data check: the next one refuses a batch larger than the training images
    with pytest.raises(PretrainReuseError, match="batch"):
        run_experiment("knowledge", cfg, tmp_path / "k", progress=False)


def test_a_recipe_that_trains_nothing_claims_the_long_tail_order_of_its_regime(tmp_path):
    # fig4a's claim kept only the regime's ratio: a rerun with the other order reused the
    # selections made for the other order's images
    from dataclasses import asdict

    import yaml

    from pretrain_reuse.experiments.claim import recipe_reads

    reads = {}
    for order in ("index", "random"):
        path = tmp_path / f"{order}.yaml"
        path.write_text(yaml.safe_dump({
            "model": "smallcnn", "source": "synthetic:pretrain", "target": "synthetic:target",
            "relevant": [1, 2], "finetune": {"long_tail_ratio": 10.0, "long_tail_order": order, "lr": 0.1}}))
        cfg = load_experiment_config(path)
        reads[order] = recipe_reads("fig4a", cfg, asdict(cfg))["finetune"]
    # the learning rate is not read by a recipe that trains nothing; the regime is, all of it
    # (its default order, index, as no setting: written out or not, the runs are the same)
    assert reads == {"index": {"long_tail_ratio": 10.0},
                     "random": {"long_tail_ratio": 10.0, "long_tail_order": "random"}}


def test_an_experiment_begun_in_bf16_goes_on_only_in_bf16_with_the_advice_it_gives(
        quick_demo, tmp_path, capsys, monkeypatch):
    # a host of mixed GPUs: begun where precision auto is bf16, rerun where it is fp32. The
    # finished run was reused as if it were fp32 (a table of both), and the run-level advice,
    # "--precision bf16", could not be given to an experiment, while precision: bf16 in its
    # config was refused as another experiment. The CPU stands in for both GPUs.
    import pretrain_reuse.finetune.loop as loop

    demo, _, _ = quick_demo
    skip = ("reuse greedy-ot l2", "reuse greedy-ot cosine", "reuse uot l2")
    path = _config(demo, tmp_path, skip=skip, finetune={**FAST, "max_steps": 1})
    out = tmp_path / "t4"
    with monkeypatch.context() as m:
        m.setattr(loop, "uses_bf16", lambda precision, device: precision != "fp32")
        table = run_experiment("table4", load_experiment_config(path, seeds=(0,)), out,
                               progress=False)
    run = out / "runs" / "reuse-uot-cosine-seed0"
    assert json.loads((run / "run.json").read_text())["precision"] == "bf16"
    err = _refused_table4(capsys, path, out, "--seeds", "0")
    assert (f"{str(run)!r} was trained in bf16, but precision 'auto' computes in fp32 on this "
            "device; set precision: bf16 under finetune: in the config") in err
    # where the row's mode sets its own precision, that is where to set it
    reuse_auto = _config(demo, tmp_path, skip=skip, finetune={**FAST, "max_steps": 1},
                         modes={"reuse": {"precision": "auto"}})
    err = _refused_table4(capsys, reuse_auto, out, "--seeds", "0")
    assert "set precision: bf16 under modes: reuse: in the config" in err
    # the advice is taken, and the experiment goes on with its run
    bf16 = _config(demo, tmp_path, skip=skip, finetune={**FAST, "max_steps": 1, "precision": "bf16"})
    again = run_experiment("table4", load_experiment_config(bf16, seeds=(0,)), out, progress=False)
    assert again.rows == table.rows


def test_two_pretrainings_of_the_same_network_are_warned_of(tmp_path):
    # resnet18.pth and resnet18.safetensors of the same tensors ran as two rows, unsaid
    import torch

    from pretrain_reuse.experiments.run import _warn_same_pretrainings
    from pretrain_reuse.models import create_backbone, save_backbone

    torch.manual_seed(0)
    net = create_backbone("smallcnn", num_classes=10)
    save_backbone(net, tmp_path / "a.safetensors", {})
    from safetensors.torch import load_file

    torch.save(load_file(tmp_path / "a.safetensors"), tmp_path / "a.pth")  # the same tensors
    torch.manual_seed(1)
    save_backbone(create_backbone("smallcnn", num_classes=10), tmp_path / "b.safetensors", {})
    labels = {"sup": tmp_path / "a.safetensors", "copy": tmp_path / "a.pth",
              "other": tmp_path / "b.safetensors"}
    cfg = load_experiment_config(None, model="smallcnn", target="synthetic:target",
                                 pretrainings={k: str(v) for k, v in labels.items()})
    backbones = {str(p): create_backbone("smallcnn", weights=str(p)) for p in labels.values()}
    with pytest.warns(UserWarning, match="pretrainings 'sup' and 'copy' hold the same network") as got:
        _warn_same_pretrainings(cfg, backbones)
    assert len(got) == 1  # 'other' is another network


def test_a_shared_option_goes_only_to_the_modes_that_read_it(tmp_path):
    # finetune: {lam: 1.0} reached vanilla's run too, which finetune_datasets now refuses as an
    # option the mode would ignore
    cfg = load_experiment_config(None, model="m", target="t",
                                 finetune={"lam": 1.0, "cutout": 0.2, "lr": 0.05})
    vanilla, reuse, unlabeled = (cfg.mode_finetune(mode)
                                 for mode in ("vanilla", "reuse", "reuse-unlabeled"))
    default = FinetuneConfig()
    assert (vanilla.lam, vanilla.cutout, vanilla.lr) == (default.lam, default.cutout, 0.05)
    assert (reuse.lam, reuse.cutout, reuse.lr) == (1.0, default.cutout, 0.05)
    assert (unlabeled.lam, unlabeled.cutout, unlabeled.lr) == (1.0, 0.2, 0.05)
    for ft in (vanilla, reuse, unlabeled):
        ft.check_options_used()


def test_the_knowledge_recipe_refuses_to_skip_a_linear_probe_and_keeps_analyses_per_models(
        quick_demo, tmp_path):
    # skipping the linear probe crashed with a KeyError after training every other row; skipping
    # the scratch model reused the analysis made with it (its exclusive ratio, its samples)
    demo, _, _ = quick_demo
    out = tmp_path / "knowledge"
    explain = {"players": "parts", "samples": 2}
    cfg = load_experiment_config(_config(demo, tmp_path, explain=explain,
                                         skip=["pretrained linear probe"]), seeds=(0,))
    with pytest.raises(PretrainReuseError, match=(
            r"skip leaves out 'pretrained linear probe', the pre-trained model that the knowledge "
            r"of 'pretrained fine-tuned' is measured against; skip both rows, or neither")):
        run_experiment("knowledge", cfg, out, progress=False)
    assert not out.exists()
    with_scratch = run_experiment("knowledge", load_experiment_config(
        _config(demo, tmp_path, explain=explain), seeds=(0,)), out, progress=False)
    assert with_scratch.rows[0]["exclusive"] is not None
    cfg = load_experiment_config(_config(demo, tmp_path, explain=explain, skip=["scratch"]),
                                 seeds=(0,))
    without = run_experiment("knowledge", cfg, out, progress=False)
    row = next(r for r in without.rows if r["method"] == "pretrained fine-tuned")
    assert row.get("exclusive") is None
    saved = json.loads((out / "knowledge" / "pretrained-seed0-no-scratch" / "knowledge.json")
                       .read_text())
    assert "exclusive" not in saved["report"]["overall"]
    assert row["preserve"] == pytest.approx(saved["report"]["overall"]["preserve"]["mean"])


def test_a_test_class_the_training_data_lacks_is_refused_before_the_folder_is_claimed(
        quick_demo, tmp_path):
    # it was found by the first run, after the pool and target were embedded into the folder
    from PIL import Image

    demo, _, _ = quick_demo
    test = tmp_path / "test"
    for name in [*open_dataset("synthetic:target", split="test").class_names, "zz-new"]:
        (test / name).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(test / name / "a.png")
    cfg = load_experiment_config(_config(demo, tmp_path, target_test=str(test)), seeds=(0,))
    out = tmp_path / "exp"
    with pytest.raises(PretrainReuseError, match=r"the test data's classes \(zz-new\) are not "
                                                 r"classes of the training data"):
        run_experiment("table1", cfg, out, progress=False)
    assert not out.exists()


def test_a_table_with_class_and_cluster_recalls_says_what_each_measures():
    # table1's recall column mixed the share of classes with the share of images, unsaid
    rows = [{"method": "reuse uot classes", "recall": 0.5},
            {"method": "reuse-unlabeled uot clusters", "recall": 0.4},
            {"method": "vanilla", "recall": None}]
    note = ExperimentTable("table1", rows, None, {}, {}, {}).note()
    assert note.startswith("recall: the share of the related pool classes selected (classes rows), "
                           "of the related classes' images the selected clusters hold")
    assert ExperimentTable("table1", rows[:1], None, {}, {}, {}).note() == ""


def test_an_empty_relevant_flag_unsets_the_configs(tmp_path, capsys, monkeypatch):
    # --relevant "" was taken as no flag, so the config's classes stayed and recall was computed
    import pretrain_reuse.experiments as experiments

    seen = []

    class Table:
        def to_markdown(self):
            return ""

    monkeypatch.setattr(experiments, "run_experiment",
                        lambda name, cfg, out, progress: seen.append(cfg.relevant) or Table())
    path = tmp_path / "exp.yaml"
    path.write_text("model: smallcnn\ntarget: synthetic:target\nrelevant: [1, 2]\n")
    argv = ["experiment", "knowledge", "--config", str(path), "--quiet", "--out", str(tmp_path)]
    assert main([*argv, "--relevant", ""]) == 0
    assert main(argv) == 0
    assert main([*argv, "--relevant", "3-4"]) == 0
    capsys.readouterr()
    assert seen == [(), (1, 2), (3, 4)]


def test_an_experiment_folder_in_use_is_refused_before_any_of_its_files_is_touched(
        quick_demo, tmp_path, capsys):
    from test_artifacts import _Holder

    demo, _, _ = quick_demo
    # an experiment that stopped before any run finished, with other settings: a rerun takes the
    # folder over and removes its unfinished runs, unless another process is still writing them
    out = tmp_path / "t4"
    (out / "runs" / "vanilla-seed0").mkdir(parents=True)
    (out / "runs" / "vanilla-seed0" / "checkpoint.safetensors").write_text("being written")
    (out / "run.json").write_text(json.dumps({"kind": "experiment-run",
                                              "params": {"experiment": "table4", "k": 1}}))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    skip = ("reuse greedy-ot l2", "reuse greedy-ot cosine", "reuse uot l2")
    path = _config(demo, tmp_path, skip=skip, finetune={**FAST, "max_steps": 1})
    argv = ["experiment", "table4", "--config", str(path), "--seeds", "0", "--quiet", "--out",
            str(out)]
    with _Holder(out) as other:
        assert other.ready == "locked"
        err = _one_line_error(capsys, argv)
        assert "is in use by another process writing an experiment there" in err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # once it ended, the folder is taken over (its marker, of a version that recorded no lam,
    # upgraded) and the unfinished run replaced
    assert main(argv) == 0
    assert "with other settings (eps_c, " in capsys.readouterr().err
    assert (out / "runs" / "reuse-uot-cosine-seed0" / "result.json").exists()
    assert not (out / "runs" / "vanilla-seed0").exists()


def test_settings_a_recipe_never_reads_are_named_with_the_recipes_that_read_them():
    from pretrain_reuse.experiments.claim import unread_settings

    cfg = load_experiment_config(None, model="smallcnn", target="synthetic:target",
                                 source="synthetic:pretrain", clusters=500, eps_c_l2=0.2,
                                 explain={"samples": 4}, corruption="gaussian-noise:3", k=7)
    assert unread_settings("table4", cfg) == {"clusters": ["table1", "table2"],
                                              "explain": ["knowledge"], "corruption": ["knowledge"]}
    assert unread_settings("knowledge", cfg) == {
        "source": [r for r in RECIPES if r != "knowledge"], "clusters": ["table1", "table2"],
        "eps_c_l2": ["table4"], "k": [r for r in RECIPES if r not in ("fig3a", "fig4b", "knowledge")]}
    # a value written out at its default is no setting
    assert unread_settings("table4", replace(cfg, clusters=2000, explain={}, corruption=None)) == {}


def test_an_experiment_without_weights_says_its_network_started_at_random(tmp_path, capsys):
    # every row started from a random network and the table was written without a word, where
    # finetune, embed, explain and evaluate say so
    colour_folder(tmp_path / "pool", 5, 4, seed=0)
    for split in ("train", "test"):
        colour_folder(tmp_path / "target" / split, 2, 4, seed=1)
    assert main(["experiment", "fig4a", "--model", "smallcnn-s", "--source", str(tmp_path / "pool"),
                 "--target", str(tmp_path / "target"), "--k", "2", "--relevant", "0,1",
                 "--out", str(tmp_path / "exp")]) == 0
    err = capsys.readouterr().err
    assert "note: no --weights: smallcnn-s starts from a random initialisation" in err


def test_a_sweep_of_another_recipe_and_modes_no_row_trains_are_named_at_the_start(tmp_path, capsys):
    # they were dropped without a word (and may change on a rerun), though the README says a
    # setting the recipe does not read is named when it starts
    colour_folder(tmp_path / "pool", 5, 4, seed=0)
    for split in ("train", "test"):
        colour_folder(tmp_path / "target" / split, 2, 4, seed=1)
    (tmp_path / "exp.yaml").write_text("sweep: {k: [5], groups: [2]}\nmodes: {scratch: {lr: 0.1}}\n"
                                       "lam: {co-tuning: 2.3}\nfinetune: {max_steps: 2, batch_size: 4}\n")
    assert main(["experiment", "fig4b", "--model", "smallcnn-s", "--source", str(tmp_path / "pool"),
                 "--target", str(tmp_path / "target"), "--config", str(tmp_path / "exp.yaml"),
                 "--out", str(tmp_path / "exp")]) == 0
    assert ("[experiment] fig4b does not read sweep.k (swept by fig3a); modes.scratch (no row of "
            "fig4b trains in mode scratch); lam.co-tuning (no row of fig4b trains in mode "
            "co-tuning): they change nothing here") in capsys.readouterr().out


def test_a_pool_changed_on_disk_since_the_experiment_embedded_it_is_named(tmp_path, capsys):
    # one image added to the pool: a rerun reused the units and selections of the pool as it
    # was, or, where it embedded again, was refused as "an embedding made with other settings
    # (ids, n)" in the experiment's own features folder, though no setting changed
    colour_folder(tmp_path / "pool", 5, 4, seed=0)
    for split in ("train", "test"):
        colour_folder(tmp_path / "target" / split, 2, 4, seed=1)
    argv = ["experiment", "fig4a", "--model", "smallcnn-s", "--source", str(tmp_path / "pool"),
            "--target", str(tmp_path / "target"), "--k", "2", "--relevant", "0,1", "--quiet",
            "--out",
            str(tmp_path / "exp")]
    assert main(argv) == 0, capsys.readouterr().err
    # (the rerun reused the units of the pool as it was, without a word)
    (tmp_path / "pool" / "c0" / "4.png").write_bytes((tmp_path / "pool" / "c0" / "0.png").read_bytes())
    err = _one_line_error(capsys, argv)
    assert (f"source {str(tmp_path / 'pool')!r} changed since this experiment embedded it (20 "
            "samples then, 21 now); its selections and runs were made from the data as it was: "
            "pass a new --out for the data as it is, or restore the data") in err
    (tmp_path / "pool" / "c0" / "4.png").unlink()
    assert main(argv) == 0  # restored: resumed
