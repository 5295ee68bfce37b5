"""Figures of the knowledge analysis: the outlined players are exactly those of the strongest
salient interactions, and the CLI writes its figures next to the JSON."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from pretrain_reuse.cli import main
from pretrain_reuse.knowledge import (
    accuracy_correlation,
    harsanyi_and,
    knowledge_convergence,
    knowledge_report,
    set_discrimination,
)
from pretrain_reuse.knowledge.games import grid_players
from pretrain_reuse.knowledge.plots import draw_salient, plot_convergence
from pretrain_reuse.knowledge.values import Interactions
from test_knowledge_cli import _classifier


def _planted(n: int, terms: dict[int, float]) -> Interactions:
    """A game that is a sum of AND terms: its interactions are exactly ``terms``."""
    v = np.zeros(2**n)
    for s in range(2**n):
        v[s] = sum(value for t, value in terms.items() if s & t == t)
    return Interactions(n=n, and_values=harsanyi_and(v), or_values=np.zeros(2**n), v=v,
                        noise=np.zeros(2**n), kind="and", info={"class": "c"})


def test_outlines_are_the_players_of_the_top_salient_interactions():
    players = grid_players((12, 12), (2, 2))  # 4 cells of 6x6
    # {0,1} strongest, then {3}, then {1,2}; {2} is below 5% of the largest (not salient)
    x = _planted(4, {0b0011: 4.0, 0b1000: -2.0, 0b0110: 1.5, 0b0100: 0.1})
    _, ax = plt.subplots()
    draw_salient(ax, np.zeros((12, 12, 3)), players.masks, x, top=2)
    boxes = [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in ax.patches]
    cell = {0: (-0.5, -0.5), 1: (5.5, -0.5), 2: (-0.5, 5.5), 3: (5.5, 5.5)}  # (x0, y0) of each cell
    expected = [(*cell[0], 6, 6), (*cell[1], 6, 6),  # rank 0: {0, 1}, no inset
                (cell[3][0] + 0.5, cell[3][1] + 0.5, 5, 5)]  # rank 1: {3}, inset by half a pixel
    assert boxes == expected
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["and +4.00", "and -2.00"]
    # only interactions also salient in another model: {0,1} is dropped there
    other = _planted(4, {0b1000: 1.0, 0b0110: 1.0})
    _, ax = plt.subplots()
    draw_salient(ax, np.zeros((12, 12, 3)), players.masks, x, top=2, among=other)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["and -2.00", "and +1.50"]
    plt.close("all")


def test_explain_and_knowledge_write_their_figures(tmp_path, capsys):
    same = _classifier(tmp_path / "m.safetensors", 10)
    assert main(["explain", "--model", "smallcnn-s", "--weights", str(same), "--data",
                 "synthetic:target", "--players", "grid:2x2", "--samples", "2", "--quiet",
                 "--out", str(tmp_path / "x")]) == 0
    with Image.open(tmp_path / "x" / "salient.png") as im:
        assert im.width > 200 and im.height > 100
    assert main(["knowledge", "--model", "smallcnn-s", "--pretrained", str(same), "--finetuned",
                 str(same), "--data", "synthetic:target", "--players", "grid:2x2", "--samples",
                 "2", "--quiet", "--out", str(tmp_path / "k")]) == 0
    assert json.loads((tmp_path / "k" / "knowledge.json").read_text())["samples"]["n"] == 2
    for name in ("strength_by_order", "ratios", "preserved"):
        with Image.open(tmp_path / "k" / f"{name}.png") as im:
            assert im.width > 200, name
    capsys.readouterr()


@pytest.mark.slow
def test_efficientnet_lite0_explained_on_a_real_photo_matches_shapiq(tmp_path, capsys):
    """A model nobody here trained (ImageNet EfficientNet-Lite0) on a real photo with 10 grid
    players: the CLI reports the faithfulness error and draws the salient interactions, and its
    interactions equal shapiq's exact Moebius values of the same game (about a minute on 2 cores)."""
    shapiq = pytest.importorskip("shapiq")
    from test_knowledge_interactions import shapiq_game, shapiq_to_bitmask
    from test_models import _skip_unless_available

    _skip_unless_available("efficientnet-lite0")
    assert main(["explain", "--model", "efficientnet-lite0", "--data", "imagenet-samples",
                 "--players", "grid:4x4", "--n", "10", "--samples", "1", "--quiet", "--out",
                 str(tmp_path / "x")]) == 0
    assert "faithfulness error of the salient interactions" in capsys.readouterr().out
    x = Interactions.load(tmp_path / "x" / "interactions-0000.safetensors")
    exact = shapiq.ExactComputer(shapiq_game(x.v, 10), n_players=10)("Moebius")
    np.testing.assert_allclose(x.and_values, shapiq_to_bitmask(exact, 10), atol=1e-9)
    with Image.open(tmp_path / "x" / "salient.png") as im:
        assert im.width > 150


def test_preserved_interactions_are_matched_by_the_match_rule():
    players = grid_players((12, 12), (2, 2))
    x = _planted(4, {0b0011: 4.0, 0b1000: -2.0})
    other = _planted(4, {0b0011: -3.0, 0b1000: -1.0})  # {0,1} salient there with the other sign
    for match, legend in (("support", ["and +4.00", "and -2.00"]), ("signed", ["and -2.00"])):
        _, ax = plt.subplots()
        draw_salient(ax, np.zeros((12, 12, 3)), players.masks, x, among=other, match=match)
        assert [t.get_text() for t in ax.get_legend().get_texts()] == legend
    plt.close("all")


def test_figures_draw_the_saved_interactions_at_the_given_tau(tmp_path, capsys, monkeypatch):
    import pretrain_reuse.knowledge.explain as ex
    from pretrain_reuse import load

    drawn, independent = [], []
    figure, solve = ex.salient_figure, ex.and_or_interactions

    def spy_figure(samples, **kw):
        drawn.append(([x for _, _, x in samples], kw.get("tau", 0.05)))
        return figure(samples, **kw)

    def spy_solve(*args, **kw):
        independent.append(1)
        return solve(*args, **kw)

    monkeypatch.setattr(ex, "salient_figure", spy_figure)
    monkeypatch.setattr(ex, "and_or_interactions", spy_solve)
    same = _classifier(tmp_path / "m.safetensors", 10)
    assert main(["knowledge", "--model", "smallcnn-s", "--pretrained", str(same), "--finetuned",
                 str(same), "--data", "synthetic:target", "--players", "grid:2x2", "--samples",
                 "2", "--decomposition", "joint-and-or", "--tau", "0.2", "--quiet",
                 "--out", str(tmp_path / "k")]) == 0
    # each model's salient.png shows the joint interactions it saved, at --tau; the models are
    # decomposed jointly only (no independent solve whose result would be thrown away)
    assert not independent and len(drawn) == 2
    for (xs, tau), role in zip(drawn, ("pretrained", "finetuned"), strict=True):
        saved = [load(f) for f in sorted((tmp_path / "k" / role).glob("interactions-*"))]
        assert tau == 0.2 and len(xs) == len(saved) == 2
        for x, y in zip(xs, saved, strict=True):
            np.testing.assert_array_equal(x.and_values, y.and_values)
            np.testing.assert_array_equal(x.or_values, y.or_values)
            assert "joint" in y.meta["solver"]["producer"] and y.meta["params"]["tau"] == 0.2


def test_both_convergence_curves_are_drawn_over_the_recorded_steps():
    # fine-tuning and scratch on one axis whose x is the training step, not a snapshot index
    curve = {"measure": "iou", "steps": [11, 22, 44], "similarity": [0.2, 0.5, 1.0],
             "detour": [0.5, 0.3, 0.0]}
    scratch = {**curve, "steps": [10, 30, 40], "similarity": [0.4, 0.6, 1.0]}
    _, ax = plt.subplots()
    plot_convergence({"convergence": curve, "scratch_convergence": scratch}, ax)
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
    assert lines == {"fine-tuning: iou with its final knowledge": ([11, 22, 44], [0.2, 0.5, 1.0]),
                     "fine-tuning: detour": ([11, 22, 44], [0.5, 0.3, 0.0]),
                     "scratch: iou with its final knowledge": ([10, 30, 40], [0.4, 0.6, 1.0]),
                     "scratch: detour": ([10, 30, 40], [0.5, 0.3, 0.0])}
    assert ax.get_xlabel() == "training step"
    assert all(float(t).is_integer() for t in ax.get_xticks())  # no tick at step 1.5
    plt.close("all")


def _value_objects() -> dict:
    """One of every knowledge value object that plots, by its plot method."""
    pre = [_planted(2, {0b01: 1.0, 0b11: -2.0}), _planted(2, {0b01: 1.0})]
    ft = [_planted(2, {0b01: 3.0, 0b10: 1.0}), _planted(2, {0b01: -2.0, 0b11: 1.0})]
    report = knowledge_report(pre, ft, ft)
    return {"Interactions.plot_orders": pre[0].plot_orders,
            "KnowledgeReport.plot": report.plot,
            "SetDiscrimination.plot": set_discrimination(report, [0, 0]).plot,
            "Convergence.plot": knowledge_convergence([pre, ft]).plot,
            "AccuracyCorrelation.plot": accuracy_correlation(
                [[0.2, 0.4], [0.5, 0.6], [0.1, 0.3]], [0.7, 0.8, 0.6], n_boot=100).plot}


def _drawn(ax) -> int:
    return len(ax.patches) + len(ax.lines) + len(ax.collections)


@pytest.mark.parametrize("name", list(_value_objects()))
def test_every_value_objects_plot_draws_on_the_given_or_the_current_axes(name):
    # one rule, as Units, Selection and RunResult: plot(ax) draws on ax; plot() on plt.gca(),
    # opening no figure of its own (a caller's subplot grid gets the chart where it asked)
    plt.close("all")
    current_fig, current = plt.subplots()
    other_fig, given = plt.subplots()
    plt.figure(current_fig.number)  # make the first figure (and its axes) current again
    try:
        assert _value_objects()[name](given) is given
        assert _drawn(given) > 0 and _drawn(current) == 0
        assert _value_objects()[name]() is current
        assert _drawn(current) > 0
        assert plt.get_fignums() == [current_fig.number, other_fig.number]
    finally:
        plt.close("all")
