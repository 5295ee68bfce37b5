"""knowledge --vary: one ordinary analysis per setting, compared sample by sample."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from pretrain_reuse import load
from pretrain_reuse.cli import main
from pretrain_reuse.data import open_dataset
from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.knowledge import knowledge_report
from pretrain_reuse.knowledge.explain import ExplainConfig
from pretrain_reuse.knowledge.interactions import mask_of
from pretrain_reuse.knowledge.sensitivity import (
    KnowledgeSensitivity,
    knowledge_sensitivity,
    parse_vary,
    ratio_sensitivity,
)
from pretrain_reuse.knowledge.values import Interactions
from pretrain_reuse.models import create_backbone, save_backbone


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random network and the same network with its weights perturbed by ~50%: they agree on
    some samples' classes but not on all their interactions."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    net = create_backbone("smallcnn-s", num_classes=10)
    pre = save_backbone(net, root / "pre.safetensors", {"seed": 0})
    with torch.no_grad():
        for w in net.parameters():
            w.mul_(1.0 + 0.5 * torch.randn_like(w))
    ft = save_backbone(net, root / "ft.safetensors", {"seed": 0, "perturbed": 0.5})
    return {"pretrained": pre, "finetuned": ft}


def _args(models, out, *extra, players="grid:2x2", samples=3):
    """A knowledge command of the two models (players None: the default, so they may vary)."""
    return ["knowledge", "--model", "smallcnn-s", "--pretrained", models["pretrained"],
            "--finetuned", models["finetuned"], "--data", "synthetic:target",
            *(["--players", players] if players else []), "--samples", samples, "--quiet",
            *extra, "--out", out]


@pytest.fixture(scope="module")
def sweep(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    rc = main([str(a) for a in _args(models, out, "--vary", "baseline=zero,blur",
                                     "--vary", "tau=0.05,0.3")])
    assert rc == 0
    return out


def test_each_setting_is_the_analysis_those_flags_give_alone(models, sweep, tmp_path, capsys):
    rc, _, err = _run(capsys, *_args(models, tmp_path / "alone", "--baseline", "blur", "--tau", 0.3))
    assert rc == 0, err
    alone = json.loads((tmp_path / "alone" / "knowledge.json").read_text())
    variant = json.loads((sweep / "baseline=blur,tau=0.3" / "knowledge.json").read_text())
    assert variant["report"] == alone["report"]
    assert variant["samples"]["ids"] == alone["samples"]["ids"]
    rows = {r["variant"]: r for r in KnowledgeSensitivity.load(sweep / "sensitivity.json").rows()}
    assert list(rows) == ["baseline=zero,tau=0.05", "baseline=zero,tau=0.3",
                          "baseline=blur,tau=0.05", "baseline=blur,tau=0.3"]
    for name in ("preserve", "discard", "new"):
        assert rows["baseline=blur,tau=0.3"][name] == pytest.approx(alone["report"]["overall"][name]["mean"])
    assert rows["baseline=blur,tau=0.3"]["baseline"] == "blur" and rows["baseline=blur,tau=0.3"]["tau"] == 0.3
    assert rows["baseline=blur,tau=0.3"]["faithfulness_error"] == alone["faithfulness"]["finetuned"]["mean"]
    assert rows["baseline=blur,tau=0.3"]["preserve_chance"] == alone["report"]["chance"]["preserve"]["mean"]
    assert rows["baseline=blur,tau=0.3"]["preserve_other_image"] == \
        alone["other_image"]["overall"]["preserve"]["mean"]


def test_paired_differences_are_those_of_the_saved_interactions(sweep):
    result = load(sweep / "sensitivity.json")
    assert isinstance(result, KnowledgeSensitivity)
    diffs = result.differences()
    for tag in ("baseline=zero,tau=0.3", "baseline=blur,tau=0.05"):
        per = {}
        for variant in ("baseline=zero,tau=0.05", tag):
            xs = {role: [load(f) for f in sorted((sweep / variant / role).glob("interactions-*"))]
                  for role in ("pretrained", "finetuned")}
            tau = json.loads((sweep / variant / "knowledge.json").read_text())["meta"]["params"]["tau"]
            per[variant] = knowledge_report(xs["pretrained"], xs["finetuned"], tau=tau).per_sample("preserve")
        d = per[tag] - per["baseline=zero,tau=0.05"]  # the same samples in the same order
        d = d[~np.isnan(d)]
        assert diffs[tag]["preserve"]["n"] == len(d)
        assert diffs[tag]["preserve"]["mean"] == pytest.approx(d.mean())
        assert diffs[tag]["preserve"]["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))


def test_settings_with_the_same_games_compute_them_once(sweep):
    for role in ("pretrained", "finetuned"):
        first = sorted((sweep / "baseline=zero,tau=0.05" / role / "games").glob("*.npy"))
        again = sorted((sweep / "baseline=zero,tau=0.3" / role / "games").glob("*.npy"))
        other = sorted((sweep / "baseline=blur,tau=0.05" / role / "games").glob("*.npy"))
        assert len(first) == 3 and [f.name for f in first] == [f.name for f in again]
        assert all(os.path.samefile(a, b) for a, b in zip(first, again, strict=True))
        assert not {f.name for f in first} & {f.name for f in other}  # another baseline: other games


def test_a_rerun_of_a_finished_sweep_writes_nothing(models, sweep, capsys):
    stamps = {p: p.stat().st_mtime_ns for p in sweep.rglob("*") if p.is_file()}
    rc, out, _ = _run(capsys, *_args(models, sweep, "--vary", "baseline=zero,blur",
                                     "--vary", "tau=0.05,0.3"))
    assert rc == 0 and "is finished (same settings); nothing to do" in out
    assert {p: p.stat().st_mtime_ns for p in sweep.rglob("*") if p.is_file()} == stamps


def test_a_rerun_that_redoes_a_damaged_analysis_says_what_it_computed(models, sweep, tmp_path,
                                                                     capsys):
    copy = tmp_path / "s"
    shutil.copytree(sweep, copy)
    (copy / "baseline=blur,tau=0.3" / "finetuned" / "interactions-0001.safetensors").write_bytes(b"cut")
    rc, out, err = _run(capsys, *_args(models, copy, "--vary", "baseline=zero,blur",
                                       "--vary", "tau=0.05,0.3"))
    assert rc == 0, err
    assert "nothing to do" not in out and "baseline=blur,tau=0.3: preserve" in out
    assert (copy / "sensitivity.json").read_bytes() == (sweep / "sensitivity.json").read_bytes()


def _inter(n: int, **items: float) -> Interactions:
    """Interactions from AND items like A0=1.0, A01=-2.0 (players as digits)."""
    values = np.zeros(1 << n)
    for name, value in items.items():
        values[mask_of([int(c) for c in name[1:]], n)] = value
    return Interactions(n=n, and_values=values, or_values=np.zeros(1 << n), v=np.zeros(1 << n),
                        noise=np.zeros(1 << n), kind="and")


def test_ratio_sensitivity_pairs_the_samples_by_id():
    # preserve ratios by hand (tau 0.05: every item below is salient): sample a keeps 1 of the
    # pre-trained model's 2 items (1/2) under variant one and 2 of 2 under variant two; sample b
    # keeps 1 of 4 (1/4) under one; variant two explains samples c and a, in that order, c
    # keeping 0 of 1
    pre = _inter(3, A0=1.0, A1=1.0)
    reports = {
        "one": knowledge_report([pre, _inter(3, A0=1.0, A01=1.0, A1=1.0, A2=1.0)],
                                [_inter(3, A0=1.0, A2=1.0), _inter(3, A0=1.0)]),
        "two": knowledge_report([_inter(3, A2=1.0), pre], [_inter(3, A0=1.0), _inter(3, A0=1.0, A1=1.0)]),
    }
    result = ratio_sensitivity(reports, {"one": ["a", "b"], "two": ["c", "a"]},
                               {"one": {"tau": 0.05}, "two": {"tau": 0.1}}, {"tau": [0.05, 0.1]})
    # its metadata says what made it (it was empty)
    assert result.meta["producer"] == "knowledge.ratio_sensitivity"
    assert result.meta["params"]["vary"] == {"tau": [0.05, 0.1]}
    rows = result.rows()
    assert rows[0]["preserve"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert rows[1]["preserve"] == pytest.approx(1 / 2)
    assert rows[0]["preserve_se"] == pytest.approx(np.std([1 / 2, 1 / 4], ddof=1) / np.sqrt(2))
    only_a = result.differences()["two"]["preserve"]
    assert only_a == {"mean": pytest.approx(1 - 1 / 2), "se": None, "n": 1}  # one pair: no s.e.
    with pytest.raises(PretrainReuseError, match="one id per sample"):
        ratio_sensitivity(reports, {"one": ["a"], "two": ["c", "a"]},
                          {"one": {}, "two": {}}, {"tau": [0.05, 0.1]})


def test_the_sweep_folder_itself_is_named_as_such_by_load(sweep):
    with pytest.raises(PretrainReuseError, match=r"is a knowledge sensitivity analysis, a folder "
                                                 r"of knowledge analyses .* load its sensitivity\.json"):
        load(sweep)


def test_a_sensitivity_result_saves_loads_and_plots(sweep, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    result = KnowledgeSensitivity.load(sweep / "sensitivity.json")
    again = KnowledgeSensitivity.load(result.save(tmp_path / "again.json"))
    assert again.to_dict() == result.to_dict() and again.meta == result.meta
    assert again.meta["seed"] == 0 and again.meta["params"]["vary"] == {"baseline": ["zero", "blur"],
                                                                         "tau": [0.05, 0.3]}
    ax = again.plot()
    assert len(ax.patches) == 4 * 3  # 4 settings x (preserve, discard, new): no scratch model
    assert (sweep / "sensitivity.png").stat().st_size > 0
    header = (sweep / "sensitivity.csv").read_text().splitlines()[0]
    assert header.startswith("variant,baseline,tau,explained,")
    record = json.loads((sweep / "sensitivity.json").read_text())
    record["per_variant"]["baseline=blur,tau=0.3"]["ratios"]["new"] = 0.5  # edited by hand
    (tmp_path / "bad.json").write_text(json.dumps(record))
    with pytest.raises(PretrainReuseError, match=r"bad\.json' has malformed per-variant numbers "
                                                 r".* write it again with KnowledgeSensitivity\.save"):
        load(tmp_path / "bad.json")


@pytest.mark.parametrize("extra, message", [
    (["--vary", "baseline=zero,mean", "--baseline", "mean"],
     "--vary sets baseline, but the analysis also sets baseline='mean' (a flag); drop one of them"),
    (["--vary", "baselin=zero,mean"], "did you mean 'baseline'"),
    (["--vary", "batch_size=8,16"], "--vary cannot vary batch_size: it does not change what an "
                                    "analysis computes; set it once with --batch-size"),
    (["--vary", "tau=0.05,2"], "tau"),
    (["--vary", "baseline=zero,zero"], "repeats a value"),
    (["--vary", "baseline=zero", "--checkpoints", "somewhere"], "--vary compares the knowledge ratios"),
    (["--vary", "baseline=mean"], "--vary gives one setting only, so there is nothing to compare"),
    (["--vary", "players=grid:1x2,grid:2x1"],
     "--vary sets players, but the analysis also sets players='grid:2x2' (a flag)"),
])
def test_a_bad_sweep_is_one_line_and_writes_nothing(models, tmp_path, capsys, extra, message):
    rc, _, err = _run(capsys, *_args(models, tmp_path / "s", *extra))
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("extra, message", [
    # found only once the samples are chosen: every setting is checked before the first runs
    (["--n", 4, "--vary", "players=grid:2x2,grid:40x40"], "grid 40x40 does not fit"),
    (["--vary", "players=grid:2x2,tokens"], "--vary players cannot mix tokens with image players"),
    (["--vary", "players=grid:2x2,grid2x2"], "players='grid2x2': use grid:RxC"),
    (["--vary", "players=grid:2x2,grid:40x40"], "with n=1600: every sample needs 2^1600 model "
                                                "evaluations per model; explain 1..20 players"),
])
def test_a_setting_refused_by_its_players_stops_the_sweep_before_the_first_runs(
        models, tmp_path, capsys, extra, message):
    rc, _, err = _run(capsys, *_args(models, tmp_path / "s", *extra, players=None))
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()


def test_a_rerun_with_other_settings_is_refused_before_any_analysis_runs(models, sweep, tmp_path,
                                                                         capsys):
    copy = tmp_path / "s"
    shutil.copytree(sweep, copy)
    before = sorted(p.name for p in copy.iterdir())
    rc, _, err = _run(capsys, *_args(models, copy, "--vary", "baseline=mean,zero", "--vary",
                                     "tau=0.05,0.3", samples=4))
    assert rc == 2 and "holds a knowledge analysis made with other settings" in err, err
    assert sorted(p.name for p in copy.iterdir()) == before  # baseline=mean did not run


def test_the_flags_in_another_order_find_the_finished_analyses(models, sweep, tmp_path, capsys):
    copy = tmp_path / "s"
    shutil.copytree(sweep, copy)
    rc, out, err = _run(capsys, *_args(models, copy, "--vary", "tau=0.05,0.3", "--vary",
                                       "baseline=zero,blur"))
    assert rc == 0, err
    assert sorted(p.name for p in copy.iterdir() if p.is_dir()) == sorted(
        ["baseline=zero,tau=0.05", "baseline=zero,tau=0.3", "baseline=blur,tau=0.05",
         "baseline=blur,tau=0.3"])
    assert out.startswith("baseline=zero,tau=0.05: ")  # the reference: the first given


def test_settings_that_explain_other_samples_say_how_many_they_share(models, tmp_path, capsys):
    rc, out, err = _run(capsys, *_args(models, tmp_path / "s", "--vary", "seed=0,1", samples=2))
    assert rc == 0, err
    shared = load(tmp_path / "s" / "sensitivity.json").differences()["seed=1"]["preserve"]
    assert shared["n"] == len(set(load(tmp_path / "s" / "sensitivity.json").ids["seed=0"])
                              & set(load(tmp_path / "s" / "sensitivity.json").ids["seed=1"]))
    expected = {0: "(no sample in common with seed=0)", 1: "± n/a vs seed=0, 1 paired samples"}
    assert expected.get(shared["n"], f"{shared['n']} paired samples") in out
    rc, _, err = _run(capsys, "report", tmp_path / "s")
    assert rc == 0, err
    page = (tmp_path / "s" / "report.html").read_text()
    # a setting too few samples compare is named, not counted as one that moves nothing
    assert ("Not compared, fewer than two of their samples" in page) == (shared["n"] < 2)
    assert ("No setting of the" in page) == (shared["n"] >= 2 and "Beyond two" not in page)


def test_the_python_api_refuses_an_empty_or_malformed_vary(models, tmp_path):
    net = {role: create_backbone("smallcnn-s", weights=path) for role, path in models.items()}
    data = open_dataset("synthetic:target", split="test")
    for vary, message in (({}, "nothing to vary"), ({"baseline": "zero"}, "non-empty list"),
                          ({"baseline": [["zero"]]}, "numbers or strings"),
                          ({"mean-samples": [5, 10]}, "did you mean 'mean_samples'"),
                          ({"device": ["cpu", "cuda"]}, "cannot vary device")):
        with pytest.raises(PretrainReuseError, match=message):
            knowledge_sensitivity(net, data, ExplainConfig(players="grid:2x2", samples=3), vary,
                                  tmp_path / "s")
    for kwargs, message in (({"games_from": str(tmp_path)}, "games_from must be a list of folders"),
                            ({"games_from": [tmp_path]}, "holds no games of a knowledge analysis"),
                            ({"out": None}, "out must be a folder path")):
        with pytest.raises(PretrainReuseError, match=message):
            knowledge_sensitivity(net, data, ExplainConfig(players="grid:2x2", samples=3),
                                  {"tau": [0.05, 0.1]}, **{"out": tmp_path / "s", **kwargs})
    with pytest.raises(PretrainReuseError, match="must be a KnowledgeReport"):
        ratio_sensitivity({"a": 1}, {"a": ["x"]}, {"a": {}}, {})
    assert not (tmp_path / "s").exists()
    assert parse_vary(["tau=0.05,0.1", "players=grid:2x2,parts"]) == {
        "tau": [0.05, 0.1], "players": ["grid:2x2", "parts"]}


def test_the_report_of_a_sweep_shows_every_setting_and_says_what_moved(sweep, tmp_path, capsys):
    rc, _, err = _run(capsys, "report", sweep)
    assert rc == 0, err
    page = (sweep / "report.html").read_text()
    assert "a knowledge sensitivity analysis" in page
    diffs = KnowledgeSensitivity.load(sweep / "sensitivity.json").differences()
    # a row of the ratios for every setting, and of the changes for all but the reference
    assert page.count("<td>baseline=zero,tau=0.05</td>") == 1
    assert all(page.count(f"<td>{tag}</td>") == 2 for tag in diffs) and len(diffs) == 3
    # the report's ratios are the paper's (the JSON and CSV hold every ratio of the analysis)
    moved = [(tag, n) for tag, d in diffs.items() for n, x in d.items()
             if n in ("preserve", "discard", "new") and x["se"] is not None
             and abs(x["mean"]) > 2 * x["se"]]
    assert ("Beyond two standard errors" in page) == bool(moved)
    for tag, n in moved:
        assert f"{n} with {tag} ({diffs[tag][n]['mean']:+.3f}" in page
    # a sweep stopped before its table names the command that resumes it
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "run.json").write_text('{"kind": "sensitivity-run", "params": {}}')
    rc, _, err = _run(capsys, "report", tmp_path / "cut")
    assert rc == 2 and "rerun its knowledge --vary command with the same --out" in err


@pytest.mark.parametrize("extra, needle", [
    # every analysis the same: "preserve +0.000 ± 0.000 vs baseline_steps=5", as if measured
    (["--vary", "baseline_steps=5,50"], "baseline_steps (--vary baseline_steps) applies to baseline "
                                        "'learned', which no setting of the sweep uses"),
    (["--baseline-lr", "0.01", "--vary", "baseline=zero,mean"],
     "baseline_lr (--baseline-lr) applies to baseline 'learned', which no setting of the "
     "sweep uses"),
])
def test_a_sweep_over_a_setting_its_baselines_do_not_read_is_refused(models, tmp_path, capsys,
                                                                     extra, needle):
    rc, _, err = _run(capsys, *_args(models, tmp_path / "s", *extra))
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "s").exists()


def test_a_setting_of_one_baseline_is_taken_by_the_variants_that_read_it(models, tmp_path, capsys):
    # given as a flag or varied with --vary baseline=zero,learned: the zero analyses take the
    # default (the setting changes nothing there), the learned ones the setting
    rc, _, err = _run(capsys, *_args(models, tmp_path / "s", "--baseline-steps", "2",
                                     "--vary", "baseline=zero,learned",
                                     "--vary", "baseline_lr=0.1,0.01", samples=2))
    assert rc == 0, err
    params = {tag: json.loads((tmp_path / "s" / tag / "knowledge.json").read_text())["identity"]
              for tag in ("baseline=zero,baseline_lr=0.1", "baseline=learned,baseline_lr=0.1",
                          "baseline=learned,baseline_lr=0.01")}
    assert [p["baseline_lr"] for p in params.values()] == [1e-3, 0.1, 0.01]
    assert [p["baseline_steps"] for p in params.values()] == [50, 2, 2]


def test_a_sweeps_warnings_name_their_variant_and_a_models_doubt_is_said_once(models, tmp_path,
                                                                               capsys):
    # every variant's warnings were printed without saying which analysis they were of
    rc, _, err = _run(capsys, "knowledge", "--model", "smallcnn-s", "--pretrained",
                      models["pretrained"], "--finetuned", models["pretrained"], "--data",
                      "synthetic:target", "--players", "grid:2x2", "--samples", 2, "--quiet",
                      "--vary", "tau=0.05,0.1", "--out", tmp_path / "s")
    assert rc == 0, err
    doubt = "the pretrained and finetuned models are the same network"
    assert err.count(doubt) == 1 and f"tau=0.05: {doubt}" in err, err


def test_a_sweep_of_other_settings_is_refused_and_one_of_more_values_extends_it(models, sweep,
                                                                               tmp_path, capsys):
    # --vary tau alone into a folder of --vary baseline x tau went on, and left the analyses of
    # the old sweep beside the new one's
    copy = tmp_path / "s"
    shutil.copytree(sweep, copy)
    before = sorted(p.name for p in copy.iterdir())
    rc, _, err = _run(capsys, *_args(models, copy, "--vary", "tau=0.05,0.3"))
    assert rc == 2 and err.count("\n") == 1 and "made with other settings or inputs (" in err
    assert "vary" in err and sorted(p.name for p in copy.iterdir()) == before
    # the same settings varied over other samples: new analyses beside the old ones too
    rc, _, err = _run(capsys, *_args(models, copy, "--vary", "baseline=mean,shrink",
                                     "--vary", "tau=0.05,0.3", samples=2))
    assert rc == 2 and "analysis.samples" in err, err
    assert sorted(p.name for p in copy.iterdir()) == before
    rc, _, err = _run(capsys, *_args(models, copy, "--vary", "baseline=zero,blur",
                                     "--vary", "tau=0.05,0.3,0.2"))
    assert rc == 0, err
    assert (copy / "baseline=blur,tau=0.2" / "knowledge.json").is_file()
    # a sweep folder of an earlier version recorded no settings: taken as this sweep
    marker = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**marker, "params": {}}))
    rc, out, _ = _run(capsys, *_args(models, copy, "--vary", "baseline=zero,blur",
                                     "--vary", "tau=0.05,0.3,0.2"))
    assert rc == 0 and "nothing to do" in out
    params = json.loads((copy / "run.json").read_text())["params"]
    assert params["vary"] == ["baseline", "tau"] and params["analysis"]["samples"] == 3
