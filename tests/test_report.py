"""``report`` on files it cannot use: one line naming what is missing, and no report.html.

The report of a real demo run is tested in test_demo.py."""

import contextlib
import html
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain_reuse.cli import main
from pretrain_reuse.models import create_backbone, save_backbone


def _summary() -> dict:
    """The entries of a demo's summary.json that the report reads, for a run without selections
    or fine-tuning runs on disk (so that those sections are left out)."""
    return {"scenario": {"name": "world", "description": "the procedural world",
                         "pool": "synthetic:pretrain", "target": "synthetic:target",
                         "players": "parts", "related": [1, 2], "pool_classes": 40},
            "selection": {name: {"recall": 0.5, "k": 2}
                          for name in ("classes-uot", "classes-greedy-ot", "classes-random")},
            "finetune": {}, "timing_s": {"pretrain": 1.0}, "plan": {}, "quick": True, "seed": 0}


def _knowledge() -> dict:
    """The entries of knowledge.json that the report reads, for two models."""
    def ratio():
        return {"mean": 0.5, "std": 0.1, "n_used": 2}

    def faith():
        return {"max": 0.0, "mean": 0.0, "max_over_samples": 0.0}

    def ablation(items):
        return {"items": items, **{m: {"mean": 0.5, "n_used": 2} for m in ("fidelity", "error", "share")},
                "same_decision": {"mean": 1.0, "n_used": 2}}

    def by_order(discard):
        return {"preserve": {"mean": 1 - discard, "n_used": 2},
                "discard": {"mean": discard, "n_used": 2}, "new": {"mean": 0.5, "n_used": 2}}

    return {"samples": {"n": 2, "asked": 2, "screened": 2, "correct_for_all": 2},
            "report": {"overall": {"preserve": ratio(), "new": ratio()},
                       "chance": {"preserve": {"mean": 0.25}, "new": {"mean": 0.75}},
                       "by_order": {"1": by_order(0.5), "2": by_order(0.5)}},
            "other_image": {"partners": [1, 0], "same_class": 0,
                            "overall": {"preserve": {"mean": 0.375}, "new": {"mean": 0.625}}},
            "strength_by_order": {"pretrained": [0.5, 0.5], "finetuned": [0.4, 0.6]},
            "faithfulness": {"pretrained": faith(), "finetuned": faith()},
            "counterfactual": {"n_sets": 0},
            "ablation": {name: ablation(items) for name, items in (("salient", 3.0), ("preserve", 1.0),
                                                                   ("new", 2.0))},
            "meta": {"inputs": {"models": {"pretrained": {"weights": None},
                                           "finetuned": {"weights": None}}}}}


def _curve(steps, similarity, **summaries):
    """A convergence entry of knowledge.json (Convergence.to_dict)."""
    return {"measure": "iou", "threshold": 0.9, "steps": steps, "similarity": similarity,
            "detour": [0.0] * len(steps), **summaries}


def _report(capsys, run) -> tuple[int, str]:
    rc = main(["report", str(run)])
    return rc, capsys.readouterr().err


def _page(capsys, run) -> str:
    """The report.html that ``report`` writes for ``run``, which it must accept."""
    rc, err = _report(capsys, run)
    assert rc == 0, err
    return (Path(run) / "report.html").read_text()


def _refused(capsys, run) -> str:
    """The error of ``report`` refusing ``run``: one line, and no report.html."""
    rc, err = _report(capsys, run)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (Path(run) / "report.html").exists()
    return err


def _run(tmp_path, summary, knowledge=None):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(summary))
    if knowledge is not None:
        (run / "knowledge").mkdir()
        (run / "knowledge" / "knowledge.json").write_text(json.dumps(knowledge))
    return run


def test_the_entries_checked_are_enough_for_a_report(tmp_path, capsys):
    # the reference of the tests below: with every entry the report reads, it is written
    run = _run(tmp_path, _summary(), _knowledge())
    page = _page(capsys, run)
    assert "the procedural world" in page and "Knowledge handed over by pre-training" in page


def test_the_discrimination_figure_is_shown_only_with_a_class_of_two_samples(tmp_path, capsys):
    sets = {"preserve": {"purity": 0.75, "by_class": {"0": {"purity": 0.5, "n_samples": 2},
                                                      "1": {"purity": 1.0, "n_samples": 2}}}}
    for case, (per_class, shown) in enumerate((({"0": 2, "1": 2}, True), ({"0": 2, "1": 1}, True),
                                               ({"0": 1, "1": 1}, False), (None, False))):
        knowledge = {**_knowledge(), "discrimination": sets}
        if per_class is not None:  # a knowledge.json of an earlier version has no per-class counts
            knowledge["samples"]["per_class"] = per_class
        (tmp_path / str(case)).mkdir()
        run = _run(tmp_path / str(case), _summary(), knowledge)
        assert ('alt="discrimination purity. ' in _page(capsys, run)) == shown


def _without(record: dict, path: str) -> dict:
    *parents, last = path.split(".")
    node = record
    for key in parents:
        node = node[key]
    del node[last]
    return record


@pytest.mark.parametrize("missing", ["scenario", "scenario.description", "selection.classes-uot",
                                     "selection.classes-random.recall"])
def test_a_summary_lacking_an_entry_is_one_line_naming_it(tmp_path, capsys, missing):
    # "scenario" is what a summary.json of a version before the fashion scenario lacks
    run = _run(tmp_path, _without(_summary(), missing))
    err = _refused(capsys, run)
    assert f"summary.json' lacks {missing!r}" in err and "rerun `pretrain-reuse demo`" in err


@pytest.mark.parametrize("record", [{"accuracy": 0.9}, {"scenario": "world"}, {"scenario": {}}])
def test_a_json_file_that_is_not_a_demo_summary_is_one_line(tmp_path, capsys, record):
    run = _run(tmp_path, record)
    assert "lacks 'scenario" in _refused(capsys, run)


@pytest.mark.parametrize("missing", ["strength_by_order", "faithfulness.finetuned.max_over_samples",
                                     "counterfactual.n_sets", "samples.screened",
                                     "ablation.new.fidelity.mean",
                                     "report.by_order.2.discard.n_used",
                                     "meta.inputs.models.finetuned.weights"])
def test_a_knowledge_json_lacking_an_entry_is_one_line_naming_it(tmp_path, capsys, missing):
    run = _run(tmp_path, _summary(), _without(_knowledge(), missing))
    err = _refused(capsys, run)
    assert f"knowledge.json' lacks {missing!r}" in err and "rerun `pretrain-reuse demo`" in err


def test_optional_knowledge_entries_are_checked_only_when_present(tmp_path, capsys):
    # a run without checkpoints has no convergence; one with it must have the curves
    knowledge = {**_knowledge(), "convergence": {"similarity": [0.5, 1.0]}}
    run = _run(tmp_path, _summary(), knowledge)
    assert "lacks 'convergence.measure'" in _refused(capsys, run)


def test_undefined_ratios_and_errors_are_shown_as_not_available(tmp_path, capsys):
    # knowledge.json holds None where no sample defines a ratio or an error (no salient
    # interaction, v(N) = v(∅)); the report says n/a instead of failing on them
    knowledge = _knowledge()
    knowledge["report"]["overall"]["preserve"].update(mean=None, std=None)
    knowledge["report"]["chance"]["preserve"]["mean"] = None
    knowledge["other_image"]["overall"]["preserve"]["mean"] = None
    knowledge["faithfulness"]["finetuned"].update(max=None, mean=None, max_over_samples=None)
    undefined = {"mean": None}
    knowledge["ground_truth"] = {"finetuned": {"n_samples": 2, "overall": {
        "precision": undefined, "recall": undefined, "signed_recall": undefined}}}
    run = _run(tmp_path, _summary(), knowledge)
    page = _page(capsys, run)
    assert "<td>preserve</td><td>n/a</td><td>n/a</td><td>n/a</td>" in page
    assert "<td>new</td><td>0.500</td><td>0.750</td><td>0.625</td>" in page  # chance, other image
    assert "<td>finetuned</td><td>n/a</td><td>n/a</td><td>n/a</td>" in page
    assert "No model has salient interactions to compare with the rule." in page
    # removing random players changed nothing: the counterfactual ratio is undefined
    knowledge["counterfactual"] = {"n_sets": 3, "mean_abs_change_preserved": 0.2,
                                   "mean_abs_change_random": 0.0, "effect_ratio": None}
    (run / "knowledge" / "knowledge.json").write_text(json.dumps(knowledge))
    page = _page(capsys, run)
    assert "<td>0.000</td><td>n/a</td>" in page and "the ratio is undefined (ratio n/a)" in page


def test_the_report_shows_each_knowledge_set_alone(tmp_path, capsys):
    knowledge = _knowledge()
    knowledge["ablation"]["preserve"].update(fidelity={"mean": 0.641, "n_used": 2},
                                             same_decision={"mean": None, "n_used": 0})
    page = _page(capsys, _run(tmp_path, _summary(), knowledge))
    assert "<h3>Each knowledge set alone: the fine-tuned model</h3>" in page
    assert ("<td>preserve</td><td>1.0</td><td>0.641</td><td>0.500</td><td>0.5000</td><td>n/a</td>"
            in page)
    assert "<td>new</td><td>2.0</td><td>0.500</td><td>0.500</td><td>0.5000</td><td>1.00</td>" in page
    assert "the pre-trained model</h3>" not in page  # an analysis of an earlier version has none
    knowledge["ablation_pretrained"] = {"discard": {
        "items": 3.0, **{m: {"mean": 0.25, "n_used": 2} for m in ("fidelity", "share", "error",
                                                                   "same_decision")}}}
    run = tmp_path / "run"
    (run / "knowledge" / "knowledge.json").write_text(json.dumps(knowledge))
    page = _page(capsys, run)
    assert "<h3>Each knowledge set alone: the pre-trained model</h3>" in page
    assert "<td>discard</td><td>3.0</td><td>0.250</td><td>0.250</td><td>0.2500</td><td>0.25</td>" in page


def test_the_report_shows_neighbouring_players_when_the_analysis_has_them(tmp_path, capsys):
    knowledge = _knowledge()
    run = _run(tmp_path, _summary(), knowledge)
    assert "<h3>Neighbouring players</h3>" not in _page(capsys, run)  # tokens, or older analyses
    knowledge["contiguity"] = {
        "preserve": {"items": 40, "contiguous_share": 0.5, "chance_share": 0.4, "enrichment": 1.25,
                     "z": 1.29},
        "new": {"items": 0, "contiguous_share": None, "chance_share": None, "enrichment": None,
                "z": None}}
    (run / "knowledge" / "knowledge.json").write_text(json.dumps(knowledge))
    page = _page(capsys, run)
    assert "<h3>Neighbouring players</h3>" in page
    assert "<td>preserve</td><td>40</td><td>0.500</td><td>0.400</td><td>1.25</td><td>1.3</td>" in page
    assert "<td>new</td><td>0</td><td>n/a</td><td>n/a</td><td>n/a</td><td>n/a</td>" in page


def test_a_knowledge_analysis_stopped_halfway_is_one_line(tmp_path, capsys):
    # the marker a knowledge rerun writes first: the folder mixes two runs until it finishes
    run = _run(tmp_path, _summary(), {"kind": "knowledge-report", "finished": False})
    assert "has not finished" in _refused(capsys, run)


def test_the_salience_threshold_stated_is_the_analysis_own(tmp_path, capsys):
    knowledge = _knowledge()
    knowledge["meta"]["params"] = {"tau": 0.2, "match": "signed"}
    run = _run(tmp_path, _summary(), knowledge)
    assert "(|I| > 20% of the sample's largest)" in _page(capsys, run)


def test_the_versions_shown_are_those_that_produced_the_run(tmp_path, capsys):
    # not those of the process that renders the report
    summary = {**_summary(), "meta": {"version": "0.0.7", "environment": {
        "python": "3.9.1", "torch": "2.4.0", "numpy": "1.26.0", "threads": 7, "gpu": "H100"}}}
    run = _run(tmp_path, summary)
    page = _page(capsys, run)
    for row in (["pretrain-reuse", "0.0.7"], ["python", "3.9.1"], ["torch", "2.4.0"],
                ["numpy", "1.26.0"], ["CPU threads", "7"], ["GPU", "H100"]):
        assert "<td>{}</td><td>{}</td>".format(*row) in page
    # a summary of an earlier version records none
    (run / "summary.json").write_text(json.dumps(_summary()))
    assert "<td>torch</td><td>not recorded</td>" in _page(capsys, run)


def _explain(out: Path) -> None:
    """``explain`` one sample of the world's target with a small random CNN into ``out``."""
    torch.manual_seed(0)
    save_backbone(create_backbone("smallcnn-s", num_classes=10), out.parent / "m.safetensors", {})
    assert main(["explain", "--model", "smallcnn-s", "--weights", str(out.parent / "m.safetensors"),
                 "--data", "synthetic:target", "--players", "grid:2x2", "--samples", "1", "--quiet",
                 "--out", str(out)]) == 0


def test_interactions_that_do_not_fit_the_run_are_one_line(tmp_path, capsys):
    # the overlays pair each fine-tuned sample with the pre-trained model's file of the same name
    # and draw the run's players: a missing partner, or interactions over other players, would
    # fail half-way or draw wrong outlines
    _explain(tmp_path / "x")
    summary = _summary()
    run = _run(tmp_path, summary, _knowledge())
    (run / "knowledge" / "finetuned").mkdir()
    shutil.copy(tmp_path / "x" / "interactions-0000.safetensors", run / "knowledge" / "finetuned")
    assert "pretrained/interactions-0000.safetensors' does not exist" in _refused(capsys, run)
    shutil.copytree(run / "knowledge" / "finetuned", run / "knowledge" / "pretrained")
    err = _refused(capsys, run)  # the summary's players are the world's 9 parts
    assert "explains 4 players" in err and "'parts': 9" in err and "rerun `pretrain-reuse demo`" in err
    summary["scenario"]["players"] = "grid:2x2"
    (run / "summary.json").write_text(json.dumps(summary))
    assert 'alt="salient interactions. ' in _page(capsys, run)


def test_a_knowledge_folder_gets_a_page_and_a_file_is_named_as_such(tmp_path, capsys):
    # load() pointed users at report for a knowledge folder, which report then refused
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "knowledge.json").write_text(json.dumps(_knowledge()))
    page = _page(capsys, tmp_path / "k")
    assert "<h1>pretrain-reuse report: a knowledge analysis</h1>" in page
    # an analysis of an earlier version records no settings, and this one has no figure
    assert "players (here: as the analysis chose them;" in page
    assert "Not in this folder: preserved.png" in page
    assert ("is a file; pass the demo, experiment, fine-tuning run, grid or knowledge analysis "
            "folder" in _refused(capsys, tmp_path / "k" / "knowledge.json"))


def test_the_knowledge_section_says_when_pixels_of_no_player_show_the_image(tmp_path, capsys):
    (tmp_path / "k").mkdir()
    k = _knowledge()
    k.setdefault("meta", {}).setdefault("params", {})["background"] = "original"
    (tmp_path / "k" / "knowledge.json").write_text(json.dumps(k))
    assert "mean-colour baseline; pixels of no player show the image)" in _page(capsys, tmp_path / "k")
    k["meta"]["params"]["background"] = "baseline"
    (tmp_path / "k" / "knowledge.json").write_text(json.dumps(k))
    (tmp_path / "k" / "report.html").unlink()
    assert "mean-colour baseline). " in _page(capsys, tmp_path / "k")


def test_writing_figures_leaves_the_callers_matplotlib_as_it_was(tmp_path, capsys):
    # the figure writers called matplotlib.use("Agg") and drew through pyplot: a notebook
    # that ran explain or knowledge from Python lost its inline backend
    import matplotlib
    import matplotlib.pyplot as plt

    from pretrain_reuse.knowledge.plots import save_knowledge_plots

    before = matplotlib.get_backend()
    plt.close("all")
    matplotlib.use("svg")
    try:
        (tmp_path / "k").mkdir()
        (tmp_path / "k" / "knowledge.json").write_text(json.dumps(_knowledge()))
        assert "<img" in _page(capsys, tmp_path / "k")
        written = save_knowledge_plots(_knowledge(), tmp_path / "k")
        assert written and all(p.read_bytes().startswith(b"\x89PNG") for p in written)
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == []
    finally:
        matplotlib.use(before)


def test_a_knowledge_analysis_alone_is_reported_with_its_own_figures(tmp_path, capsys):
    # `report <knowledge folder>` was refused: a knowledge analysis rendered only inside a
    # demo or an experiment, though the README's data flow ends at knowledge -> report
    torch.manual_seed(0)
    model = tmp_path / "m.safetensors"
    save_backbone(create_backbone("smallcnn-s", num_classes=10), model, {})
    common = ["--model", "smallcnn-s", "--data", "synthetic:target", "--players", "grid:3x3",
              "--n", "3", "--samples", "2", "--quiet"]
    knowledge = ["knowledge", *common, "--pretrained", str(model), "--finetuned", str(model),
                 "--out", str(tmp_path / "k")]
    assert main(knowledge) == 0
    capsys.readouterr()
    page = _page(capsys, tmp_path / "k")
    assert "<h1>pretrain-reuse report: a knowledge analysis</h1>" in page
    assert "on the data <code>synthetic:target-0 (test)</code>" in page
    assert "players (here: 3 cells drawn from a 3x3 grid of patches;" in page
    assert "Samples: 2 images explained (2 asked)" in page
    assert "<td>pretrained</td><td>" + html.escape(str(model)) in page  # outside the folder
    assert 'alt="knowledge ratios: preserve 1.000, discard 0.000, new 0.000' in page
    assert "the analysis&#x27;s own preserved.png" in page and "Settings and versions" in page
    assert "&quot;tau&quot;: 0.05" in page
    # the page beside the analysis does not stop a rerun from finding it finished
    assert main(knowledge) == 0
    assert capsys.readouterr().out.endswith("is finished (same settings); nothing to do\n")
    # one model's folder of the analysis names the analysis's folder
    err = _refused(capsys, tmp_path / "k" / "finetuned")
    assert f"holds the interactions of one model (finetuned) of the knowledge analysis in " \
           f"{str(tmp_path / 'k')!r}; pass that folder" in err
    # an entry it lacks names the rerun of knowledge, not of the demo
    k = json.loads((tmp_path / "k" / "knowledge.json").read_text())
    (tmp_path / "k" / "report.html").unlink()
    (tmp_path / "k" / "knowledge.json").write_text(json.dumps(_without(k, "strength_by_order")))
    err = _refused(capsys, tmp_path / "k")
    assert "lacks 'strength_by_order'" in err and "not a knowledge analysis's" in err
    assert "rerun its `pretrain-reuse knowledge` command with the same --out" in err
    (tmp_path / "k" / "knowledge.json").write_text(json.dumps({**k, "finished": False}))
    assert "rerun its `pretrain-reuse knowledge` command with the same --out to finish it" in \
        _refused(capsys, tmp_path / "k")


def test_a_run_folder_whose_result_is_not_json_is_named_by_that_file(tmp_path, capsys):
    # without its run.json it was "has no summary.json, ..., result.json, ..."
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text('{"kind": "x"')
    err = _refused(capsys, tmp_path / "run")
    assert f"{str(tmp_path / 'run' / 'result.json')!r} is not valid JSON" in err


def test_an_explain_folder_is_named_as_such(tmp_path, capsys):
    # it got "has no summary.json, experiment.json, result.json or grid.json"
    _explain(tmp_path / "x")
    err = _refused(capsys, tmp_path / "x")
    assert "is the output of explain (one interactions file per sample), which report does not " \
           "render: its figure is salient.png beside them" in err
    # sentences' word players draw no salient.png: the message names none
    (tmp_path / "x" / "salient.png").unlink()
    assert "does not render: pretrain_reuse.load(" in _refused(capsys, tmp_path / "x")
    assert "pretrain_reuse.load(<folder>/interactions-0000.safetensors)" in err
    assert "report renders a knowledge analysis (pretrain-reuse knowledge), demo" in err


@pytest.mark.parametrize("discard, verdict", [
    ((0.2, 0.4, 0.6, 0.8), "Discarded share at orders 3–4: 0.700 (mean over orders) against 0.300 "
                           "at orders 1–2: more of the high-order pre-trained knowledge is "
                           "discarded, as the paper claims."),
    ((0.8, 0.6, 0.4, 0.2), "Discarded share at orders 3–4: 0.300 (mean over orders) against 0.700 "
                           "at orders 1–2: high-order pre-trained knowledge is <b>not</b> discarded "
                           "more than low-order knowledge here, unlike the paper's claim.")])
def test_the_knowledge_section_states_what_the_numbers_rest_on(tmp_path, capsys, discard, verdict):
    # samples used and dropped, the runs in each role, the definitions and their aggregation,
    # the ratios by order (with the paper's high-order claim checked), the unit of the
    # faithfulness error and the convergence summaries of both curves
    knowledge = _knowledge()
    knowledge["samples"] = {"n": 2, "asked": 3, "screened": 10, "correct_for_all": 2}
    knowledge["report"]["by_order"] = {
        str(k + 1): {"preserve": {"mean": 1 - d, "n_used": 2}, "discard": {"mean": d, "n_used": 2},
                     "new": {"mean": None, "n_used": 0}} for k, d in enumerate(discard)}
    run = _run(tmp_path, _summary(), knowledge)
    tuned = run / "finetune" / "vanilla-seed0" / "model.safetensors"
    tuned.parent.mkdir(parents=True)
    torch.manual_seed(0)
    save_backbone(create_backbone("smallcnn-s", num_classes=10), tuned,
                  {"producer": "finetune", "params": {"mode": "vanilla"}})
    knowledge["meta"]["inputs"]["models"]["finetuned"]["weights"] = str(tuned)
    knowledge["convergence"] = _curve([11, 22, 33], [0.3, 0.95, 1.0], auc=0.8,
                                      first_at_threshold=22, n_decreases=0, total_detour=0.25)
    knowledge["scratch_convergence"] = _curve([11, 22, 33], [0.5, 0.4, 1.0], auc=0.575,
                                              first_at_threshold=33, n_decreases=1,
                                              total_detour=0.5)
    (run / "knowledge" / "knowledge.json").write_text(json.dumps(knowledge))
    page = _page(capsys, run)
    assert ("Samples: 2 test images explained (3 asked), drawn among those every model "
            "classifies correctly: of the 10 screened, 8 were dropped") in page
    assert "<td>finetuned</td><td>finetune/vanilla-seed0/model.safetensors</td><td>vanilla</td>" in page
    assert "<td>pretrained</td><td>not a file</td><td>not recorded</td>" in page
    assert "<i>reconstructed</i> definitions of docs/knowledge.md" in page
    assert "aggregated as the <b>mean of the per-sample ratios</b>" in page
    assert "<td>1</td><td>" + f"{1 - discard[0]:.3f} (2)</td><td>{discard[0]:.3f} (2)</td>" \
        "<td>n/a (0)</td>" in page
    assert verdict in page
    assert "in units of |v(N) − v(∅)|" in page
    assert ("<tr><td>fine-tuning</td><td>3</td><td>11–33</td><td>0.800</td><td>22</td><td>0</td>"
            "<td>0.250</td></tr>") in page
    assert ("<tr><td>scratch</td><td>3</td><td>11–33</td><td>0.575</td><td>33</td><td>1</td>"
            "<td>0.500</td></tr>") in page
    assert 'alt="knowledge ratios by order. ' in page and 'alt="convergence. ' in page


def test_the_modes_shown_are_those_recorded_so_a_moved_folder_keeps_them(tmp_path, capsys):
    # the folder was analysed elsewhere and moved: its weights files are gone from the paths
    # knowledge.json records, and an earlier version's analysis records no mode at all
    knowledge = _knowledge()
    gone = tmp_path / "old" / "finetune" / "reuse-seed0" / "model.safetensors"
    knowledge["meta"]["inputs"]["models"] = {
        "pretrained": {"weights": str(gone.with_name("probe.safetensors"))},
        "finetuned": {"weights": str(gone), "mode": "reuse"}}
    page = _page(capsys, _run(tmp_path, _summary(), knowledge))
    assert f"<td>finetuned</td><td>{gone}</td><td>reuse</td>" in page
    assert "<td>pretrained</td>" in page and "</td><td>not recorded</td>" in page


INJECTED = "A <img src=x onerror=alert(1)>"


def _experiment(tmp_path, rows, name="table1", x_label=None, extra=None):
    """An experiment folder whose table holds ``rows`` (no runs on disk unless they name seeds)."""
    from pretrain_reuse.experiments import ExperimentTable

    base = {"x": None, "recall": None, "units": None, "top1_mean": 0.5, "top1_std": None,
            "top1_at_best_val_mean": None, "mean_class_acc_mean": None, "seeds": []}
    out = tmp_path / "exp"
    ExperimentTable(name, [{**base, **r} for r in rows], x_label, {}, {}, extra or {}).save(out)
    return out


def test_labels_from_the_run_files_are_escaped_in_the_page(tmp_path, capsys):
    # a pre-training label of an experiment config, or an edited summary.json, must not run script
    summary = _summary()
    summary["scenario"].update(players=f"grid:{INJECTED}", pool_classes="<b>40</b>")
    summary.update(seed="<i>seed</i>", quick="<u>q</u>")
    run = _run(tmp_path, summary, _knowledge())
    page = _page(capsys, run)
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<i>seed" not in page and "&lt;i&gt;seed" in page and "<u>q" not in page
    correlation = {"preserve": {"pearson": 0.5, "pearson_ci": [0.1, 0.9], "spearman": 0.4,
                                "spearman_ci": [None, None]}}
    out = _experiment(tmp_path, [{"method": f"{INJECTED} fine-tuned"}, {"method": "vanilla"}],
                      name="knowledge", extra={"models": [INJECTED, "B"],
                                               "correlation": correlation})
    page = _page(capsys, out)
    assert "<img src=x" not in page and f"({html.escape(INJECTED)}, B)" in page


def test_labels_are_inert_in_the_markdown_table(tmp_path):
    out = _experiment(tmp_path, [{"method": f"{INJECTED} | x"}, {"method": "vanilla"}])
    markdown = (out / "results.md").read_text()
    assert "<img" not in markdown and "A &lt;img src=x onerror=alert(1)&gt; \\| x |" in markdown
    # a row keeps its columns: the escaped bar does not split a cell
    row = next(line for line in markdown.splitlines() if "onerror" in line)
    assert row.replace("\\|", "").count("|") == markdown.splitlines()[2].count("|")


@pytest.mark.parametrize("label", ["$5 to $10", r"B $\frac$ fine-tuned"])
def test_a_label_with_dollars_is_drawn_literally(tmp_path, capsys, label):
    # matplotlib would parse it as mathtext and fail after the experiment's whole compute
    rows = [{"method": label}, {"method": "vanilla"}]
    for name in ("table1", "knowledge"):
        out = _experiment(tmp_path / name, rows, name=name)
        assert (out / "results.png").stat().st_size > 0
        _page(capsys, out)
    knowledge = _knowledge()
    knowledge["strength_by_order"][label] = [0.5, 0.5]
    _page(capsys, _run(tmp_path, _summary(), knowledge))


def test_a_dollar_label_is_not_set_as_maths():
    # "$5 to $10" parses as maths ("5 to " in italics, the dollars gone) instead of failing
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cbook

    from pretrain_reuse.experiments import ExperimentTable

    base = {"recall": None, "units": None, "top1_std": None, "top1_at_best_val_mean": None,
            "mean_class_acc_mean": None, "seeds": [0]}
    for rows, x_label in (([{"method": "$5 to $10", "x": None, "top1_mean": 0.5}], None),
                          ([{"method": "$5 to $10", "x": x, "top1_mean": 0.5} for x in (1, 2)],
                           "$ per $")):
        fig, ax = plt.subplots()
        ExperimentTable("table3", [{**base, **r} for r in rows], x_label, {}).plot(ax)
        texts = [*ax.get_xticklabels(), *(ax.get_legend().get_texts() if ax.get_legend() else []),
                 ax.xaxis.label]
        drawn = [t.get_text() for t in texts if "$" in t.get_text()]
        assert drawn and not any(cbook.is_math_text(t) for t in drawn)
        plt.close(fig)


def _edited(record: dict, path: str, value) -> dict:
    *parents, last = path.split(".")
    node = record
    for key in parents:
        node = node[key]
    node[last] = value
    return record


@pytest.mark.parametrize("file, path, value, needle", [
    ("summary", "finetune", {"vanilla": {"mode": "vanilla", "seeds": [], "top1_mean": 0.9,
                                         "top1_std": None, "top1_at_best_val_mean": 0.9}},
     "IndexError"),
    ("summary", "timing_s.pretrain", None, "TypeError"),
    ("knowledge", "report.by_order.x", _knowledge()["report"]["by_order"]["1"], "ValueError"),
    ("knowledge", "meta.params", {"tau": "0.05"}, "ValueError"),
    ("knowledge", "counterfactual", {"n_sets": 3}, "lacks 'counterfactual.effect_ratio'"),
])
def test_a_demo_file_with_an_entry_of_the_wrong_type_is_one_line_naming_it(
        tmp_path, capsys, file, path, value, needle):
    summary, knowledge = _summary(), _knowledge()
    _edited(summary if file == "summary" else knowledge, path, value)
    run = _run(tmp_path, summary, knowledge)
    err = _refused(capsys, run)
    name = "summary.json" if file == "summary" else "knowledge/knowledge.json"
    assert f"{name}' " in err and needle in err and "rerun `pretrain-reuse demo`" in err


@pytest.mark.parametrize("edit", [
    lambda d: d.update(meta=[]),
    lambda d: d["rows"][1].update(seeds=[0, 1], top1_std=None),
    lambda d: [r.update(top1_mean=None, recall=None) for r in d["rows"]],
])
def test_an_experiment_json_with_an_entry_of_the_wrong_type_is_one_line_naming_it(
        tmp_path, capsys, edit):
    out = _experiment(tmp_path, [{"method": "vanilla"}, {"method": "reuse uot classes"}])
    record = json.loads((out / "experiment.json").read_text())
    edit(record)
    (out / "experiment.json").write_text(json.dumps(record))
    err = _refused(capsys, out)
    assert "experiment.json' holds an entry the report cannot read" in err
    assert "damaged or was written by another version" in err and "into a new --out" in err


def test_the_sections_a_partial_demo_folder_lacks_are_replaced_by_a_note(tmp_path, capsys):
    # the selections' recalls are in summary.json: their table is shown without selections/
    (tmp_path / "a").mkdir()
    run = _run(tmp_path / "a", _summary())
    (run / "run.json").write_text(json.dumps({"kind": "demo-run", "params": {
        "quick": True, "seed": 3, "scenario": "world"}}))
    page = _page(capsys, run)
    rerun = f"rerun <code>pretrain-reuse demo --quick --seed 3 --out {run.resolve()}</code>"
    for missing in ("selections/", "knowledge/knowledge.json",
                    "knowledge_sensitivity/sensitivity.json"):
        assert f"Not in this folder: {missing}" in page
    assert page.count(rerun) == 3
    assert "<td>classes-uot</td><td>0.500</td><td>2</td>" in page
    # a knowledge analysis without its interaction files: no overlays, and a note says so
    (tmp_path / "b").mkdir()
    run = _run(tmp_path / "b", _summary(), _knowledge())
    page = _page(capsys, run)
    assert "Not in this folder: knowledge/finetuned/interactions-*.safetensors" in page
    assert "Knowledge handed over by pre-training" in page


@pytest.mark.parametrize("kind, command", [
    ("demo-run", "pretrain-reuse demo --quick --out"),
    ("experiment-run", "pretrain-reuse experiment table1 --config CONFIG --out")])
def test_an_unfinished_run_folder_says_so_and_names_its_rerun(tmp_path, capsys, kind, command):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"kind": kind, "params": {
        "quick": True, "seed": 0, "scenario": "world", "experiment": "table1"}}))
    err = _refused(capsys, run)
    what = kind.split("-")[0]
    assert f"this {what} has not finished" in err and "with the same --out to resume it" in err
    assert f"{command} {run}`" in err and "pass a demo or experiment" not in err


def test_an_unfinished_grid_search_says_so(tmp_path, capsys):
    run = tmp_path / "grid"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"kind": "grid-run", "params": {}}))
    err = _refused(capsys, run)
    assert "this grid search has not finished (it has no grid.json yet); rerun its finetune " \
           "--grid command with the same --out to resume it" in err


def test_a_missing_run_of_an_experiment_names_the_rerun(tmp_path, capsys):
    out = _experiment(tmp_path, [{"method": "vanilla", "seeds": [0]}])
    (out / "run.json").write_text(json.dumps({"kind": "experiment-run",
                                              "params": {"experiment": "table1"}}))
    err = _refused(capsys, out)
    assert "runs/vanilla-seed0/result.json' does not exist: the run has not finished" in err
    assert f"rerun `pretrain-reuse experiment table1 --config CONFIG --out {out}`" in err


def test_the_experiment_curves_draw_every_row_with_its_own_colour(tmp_path, capsys, monkeypatch):
    # table1 with clusters rows has more runs than the 12 curves drawn before, and 10 colours
    import pretrain_reuse.report as report
    from pretrain_reuse.experiments.table import run_folder
    from pretrain_reuse.finetune.loop import RunResult

    rows = [{"method": f"method {i}", "seeds": [0, 1] if i == 0 else [0], "top1_std": 0.1}
            for i in range(13)]
    out = _experiment(tmp_path, rows)
    for r in rows:
        for s in r["seeds"]:
            history = [{"step": t, "val": {"top1": 0.5}, "test": {"top1": 0.2 + 0.2 * s + 0.01 * t}}
                       for t in (1, 2)]
            last = {"step": 2, "top1": history[-1]["test"]["top1"]}
            RunResult({"mode": "vanilla"}, history, last, last).save(
                run_folder(out, r["method"], None, s) / "result.json")
    drawn = []
    monkeypatch.setattr(report, "_figure", lambda fig, caption, alt: drawn.append(
        (fig, caption)) or "")
    _page(capsys, out)
    fig, caption = next((f, c) for f, c in drawn if c.startswith("Fine-tuning curves"))
    assert caption.startswith("Fine-tuning curves (14 of 14 runs)")
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.lines] == [r["method"] for r in rows]
    assert len({line.get_color() for line in ax.lines}) == 13
    assert list(ax.lines[0].get_ydata()) == pytest.approx([0.31, 0.32])  # the mean of 2 seeds
    fig.canvas.draw()  # the legend sits beside the axes, not over the curves
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
    import matplotlib.pyplot as plt

    plt.close("all")  # _figure, replaced above, closed them


def test_the_knowledge_plots_name_their_y_axis_and_show_whole_error_bars():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pretrain_reuse.knowledge.plots import plot_convergence, plot_ratios, plot_ratios_by_order

    knowledge = _knowledge()
    knowledge["report"]["overall"]["preserve"].update(mean=0.9, std=0.3)
    knowledge["convergence"] = _curve([1, 2], [0.5, 1.0])
    for draw in (plot_ratios, plot_ratios_by_order, plot_convergence):
        fig, ax = plt.subplots()
        draw(knowledge, ax)
        assert ax.get_ylabel(), draw.__name__
        if draw is plot_ratios:
            assert ax.get_ylim()[1] >= 1.2  # the error bar of preserve reaches 0.9 + 0.3
        plt.close(fig)
    rows = [{"method": "A fine-tuned", "top1_mean": 0.95, "top1_std": 0.1, "seeds": [0, 1],
             "preserve": 0.9, "preserve_std": 0.2}]
    fig, ax = plt.subplots()
    _experiment_table("knowledge", rows).plot(ax)
    assert ax.get_ylim()[1] >= 1.1
    plt.close(fig)


def _experiment_table(name, rows, x_label=None):
    from pretrain_reuse.experiments import ExperimentTable

    base = {"x": None, "recall": None, "units": None, "top1_mean": None, "top1_std": None,
            "top1_at_best_val_mean": None, "mean_class_acc_mean": None, "seeds": []}
    return ExperimentTable(name, [{**base, **r} for r in rows], x_label, {})


def test_a_selection_only_table_shows_no_always_empty_columns(tmp_path):
    rows = [{"method": "uot", "x": x, "recall": 0.5, "units": 3.0} for x in (0.1, 1.0)]
    table = _experiment_table("fig4a", rows, "eps")
    head, body = table.cells()
    assert head == ["method", "eps", "recall", "units"] and body[0] == ["uot", "0.1", "0.5000", "3"]
    table.save(tmp_path)
    assert "seeds" not in (tmp_path / "results.md").read_text()
    assert "top1_mean" in (tmp_path / "results.csv").read_text().splitlines()[0]  # CSV stays


def test_the_page_is_accessible_and_does_not_depend_on_how_the_path_was_typed(
        tmp_path, capsys, monkeypatch):
    knowledge = _knowledge()
    knowledge["ground_truth"] = {"finetuned": {"n_samples": 2, "overall": {
        "precision": {"mean": 0.4567}, "recall": {"mean": 0.5}, "signed_recall": {"mean": 0.5}}}}
    run = _run(tmp_path, _summary(), knowledge)
    page = _page(capsys, run)
    monkeypatch.chdir(tmp_path)
    assert _page(capsys, "run") == page
    assert "precision at most 0.457 for every model" in page
    assert "<html lang='en'>" in page and "<thead><tr><th scope=\"col\">" in page
    assert "<th>" not in page
    assert 'alt="knowledge ratios: preserve 0.500, new 0.500. preserve = ' in page


# --------------------------------------------------------------------------------------------
# A fine-tuning run folder and a grid folder
# --------------------------------------------------------------------------------------------


def _finetune_run(tmp_path, history):
    """A run folder as the loop leaves it: run.json, and result.json from the loop's own
    summary of ``history`` (the evaluation records)."""
    from pretrain_reuse.finetune import FinetuneConfig
    from pretrain_reuse.finetune.loop import _result

    run = tmp_path / "run"
    run.mkdir()
    cfg = FinetuneConfig(mode="reuse", max_steps=30, lam=0.7)
    (run / "run.json").write_text(json.dumps({"kind": "finetune-run", "config": cfg.to_dict()}))
    _result(cfg, history, {"model": "smallcnn", "target": "/data/t", "source": "/data/s"},
            12.5).save(run / "result.json")
    return run


def _record(step, val, test, loss):
    return {"step": step, "epoch": step / 10, "loss": loss, "ce_target": loss / 2,
            "ce_source": loss / 3, "val": {"top1": val, "mean_class_acc": val, "n": 8},
            "test": {"top1": test, "mean_class_acc": test - 0.01, "n": 40}}


def test_a_finetune_run_folder_reports_its_last_and_best_validation_results(tmp_path, capsys):
    history = [_record(10, 0.5, 0.6, 1.2), _record(20, 0.875, 0.725, 0.8),
               _record(30, 0.75, 0.8125, 0.5)]
    run = _finetune_run(tmp_path, history)
    page = _page(capsys, run)
    # the test accuracy after the last step, and at the best *validation* evaluation (step 20:
    # not the best test one, step 30)
    assert ("<th scope=\"col\">after the last step (30)</th><th scope=\"col\">at the best "
            "validation evaluation (20)</th>") in page
    assert "<td>test top-1</td><td>0.8125</td><td>0.7250</td>" in page
    assert "<td>test mean per-class accuracy</td><td>0.8025</td><td>0.7150</td>" in page
    assert "<td>validation top-1</td><td>0.7500</td><td>0.8750</td>" in page
    assert page.count("<img") == 2 and "Losses over training: loss, ce_target, ce_source" in page
    assert "Mode <code>reuse</code>; model <code>smallcnn</code>; target <code>/data/t</code>" in page
    assert "&quot;lam&quot;: 0.7" in page and "12.5 s of training" in page


def test_an_unfinished_or_damaged_finetune_run_is_one_line(tmp_path, capsys):
    run = _finetune_run(tmp_path, [_record(10, 0.5, 0.6, 1.2)])
    result = json.loads((run / "result.json").read_text())
    result["final"]["top1"] = "high"
    (run / "result.json").write_text(json.dumps(result))
    assert "holds an entry the report cannot read" in _refused(capsys, run)
    (run / "result.json").unlink()
    assert ("the run has not finished or was removed; rerun `pretrain-reuse finetune"
            in _refused(capsys, run))


def test_a_grid_folder_reports_every_run_and_the_one_validation_picked(tmp_path, capsys):
    rows = [{"lr": lr, "lam": lam, "run": f"lam={lam},lr={lr}", "val_top1": val,
             "test_top1_at_best_val": test, "test_top1_final": test - 0.05, "best_step": 20}
            for lr, lam, val, test in ((0.01, 0.3, 0.7, 0.61), (0.03, 0.3, 0.9, 0.65))]
    run = tmp_path / "grid"
    run.mkdir()
    (run / "grid.json").write_text(json.dumps({"kind": "grid", "grid": {"lr": [0.01, 0.03],
                                                                        "lam": [0.3]},
                                               "best": rows[1], "rows": rows, "meta": {}}))
    page = _page(capsys, run)
    assert ("2 fine-tuning runs over lam, lr, picked by validation top-1: <code>lam=0.3,lr=0.03"
            "</code> (validation 0.9000, its test top-1 0.6500 at that evaluation)") in page
    assert "<tr><td>lam=0.3,lr=0.01</td><td>0.3</td><td>0.01</td><td>0.7000</td><td>0.6100</td>" \
           "<td>0.5600</td><td>20</td></tr>" in page


def test_equal_mean_accuracies_summed_in_another_order_are_shown_alike(tmp_path, capsys):
    # 0.33625000000000005 (two seeds' mean) and 0.33625 were shown as 0.3363 and 0.3362: the
    # first row looked ahead of an equal one
    table = _experiment_table("fig4b", [{"method": "vanilla", "top1_mean": (0.3375 + 0.335) / 2},
                                        {"method": "group 1", "top1_mean": 0.33625}])
    assert table.rows[0]["top1_mean"] != table.rows[1]["top1_mean"]
    markdown = table.to_markdown()
    assert markdown.count("| 0.3362 |") == 2 and "0.3363" not in markdown, markdown


@contextlib.contextmanager
def _held_by_another_process(folder: Path):
    """``folder`` locked as a running command locks it (lock_folder), by a child process."""
    code = ("import sys, time\nfrom pathlib import Path\nfrom pretrain_reuse.artifacts import lock_folder\n"
            "lock_folder(Path(sys.argv[1]), 'a test')\nprint('locked', flush=True)\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        yield
    finally:
        child.kill()
        child.wait()


def test_a_folder_being_written_is_reported_as_last_finished_with_a_note(tmp_path, capsys):
    # a rerun with more seeds holds the folder: the table is the last finished one, and says so
    out = _experiment(tmp_path, [{"method": "vanilla"}])
    with _held_by_another_process(out):
        rc, err = _report(capsys, out)
        assert rc == 0, err
        assert "another process was writing this folder when this page was made" in err
        assert "Note: another process was writing" in (out / "report.html").read_text()
    rc, err = _report(capsys, out)  # once it has finished, no note
    assert rc == 0 and "another process" not in err + (out / "report.html").read_text()


def test_an_unfinished_folder_being_written_names_the_process_not_a_rerun(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"kind": "experiment-run", "params": {"experiment": "table1"}}))
    with _held_by_another_process(run):
        err = _refused(capsys, run)
    assert "is being written by another process now, and has not finished what report shows; " \
           "report on it once that process has finished" in err and "rerun" not in err


@pytest.mark.parametrize("parent_kind, run_path, command", [
    ("experiment-run", "runs/vanilla-seed0",
     "pretrain-reuse experiment table1 --config CONFIG --out {parent}"),
    ("grid-run", "lr=0.01", "pretrain-reuse finetune ... --grid ... --out {parent}"),
    (None, "run", "pretrain-reuse finetune ... --out {run}")])
def test_an_unfinished_fine_tuning_run_names_the_command_that_resumes_it(
        tmp_path, capsys, parent_kind, run_path, command):
    # a run of an experiment or grid is resumed by that command, with the run's own settings
    parent = tmp_path / "parent"
    run = parent / run_path
    run.mkdir(parents=True)
    if parent_kind:
        marker = {"kind": parent_kind, "params": {"experiment": "table1"}}
        (parent / "run.json").write_text(json.dumps(marker))
    (run / "run.json").write_text(json.dumps({"kind": "finetune-run", "params": {}}))
    err = _refused(capsys, run)
    assert "the run has not finished" in err
    assert f"rerun `{command.format(parent=parent, run=run)}`" in err


def test_an_unfinished_knowledge_analysis_says_so_and_names_its_rerun(tmp_path, capsys):
    run = tmp_path / "analysis"
    (run / "pretrained").mkdir(parents=True)
    (run / "pretrained" / "explain.json").write_text(json.dumps({"kind": "explanations", "finished": True}))
    err = _refused(capsys, run)
    assert "this knowledge analysis has not finished (it has no knowledge.json yet); rerun its " \
           "knowledge command with the same --out to resume it" in err
