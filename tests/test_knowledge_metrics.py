"""Tests of the knowledge metrics on hand-built interactions with hand-computed expectations.

Items are written A{..} (AND) and O{..} (OR). Unless said otherwise τ = 0.05 and every listed
value is salient (each is above 5% of its sample's largest entry).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
import json
import math
import os
import pkgutil
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import pretrain_reuse
from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.knowledge import (
    AccuracyCorrelation,
    Convergence,
    Interactions,
    KnowledgeReport,
    SampleKnowledge,
    SetAblation,
    SetDiscrimination,
    accuracy_correlation,
    and_interactions,
    cover_ratio,
    discrimination_power,
    knowledge_convergence,
    knowledge_report,
    knowledge_set,
    mask_of,
    other_image_control,
    other_sample_partners,
    planted_game,
    sample_knowledge,
    set_ablation,
    set_discrimination,
    transferability,
    weighted_overlap,
)


def inter(n: int, **items: float) -> Interactions:
    """Interactions from items like A0=1.0, A01=-2.0, O12=0.5 (players as digits)."""
    i_and, i_or = np.zeros(1 << n), np.zeros(1 << n)
    for name, value in items.items():
        target = i_and if name[0] == "A" else i_or
        target[mask_of([int(c) for c in name[1:]], n)] = value
    return Interactions(n=n, and_values=i_and, or_values=i_or, v=np.zeros(1 << n), noise=np.zeros(1 << n),
                        kind="and-or")


def A(*players):
    return ("and", mask_of(players, 3))


def O(*players):  # noqa: E743
    return ("or", mask_of(players, 3))


PRE = inter(3, A0=1.0, A01=-2.0, O12=0.5, A2=0.01)  # A2 is below 0.05 * 2 = 0.1: not knowledge
FT = inter(3, A0=3.0, A01=1.0, A12=0.6, O02=-0.4)
SCRATCH = inter(3, A0=1.0, A12=1.0)


# --------------------------------------------------------------------------------------------
# One sample
# --------------------------------------------------------------------------------------------



def _check_meta(path, producer: str, params: dict, seed: int | None = None) -> None:
    """The saved result's metadata block names its class, settings, seed and version (DESIGN's
    contract for every artifact; these files carried none)."""
    meta = json.loads(Path(path).read_text())["meta"]
    assert meta["producer"] == f"knowledge.{producer}" and meta["params"] == params
    assert meta["seed"] == seed and meta["version"] == pretrain_reuse.__version__

def test_preserved_discarded_and_new_sets_match_by_type_and_coalition():
    k = sample_knowledge(PRE, FT, SCRATCH)
    assert k.preserve == {A(0), A(0, 1)}
    assert k.discard == {O(1, 2)}
    assert k.new == {A(1, 2), O(0, 2)}
    assert k.exclusive == {A(0, 1)}


def test_a_sample_s_knowledge_prints_as_a_summary_of_its_sets():
    # the dataclass repr printed every item with its effect: 1.5 MB at 16 players in a notebook
    k = sample_knowledge(PRE, FT, SCRATCH)
    assert repr(k) == (f"SampleKnowledge(n=3, match='support', pretrained={len(k.pretrained)} "
                       f"items, finetuned={len(k.finetuned)} items, scratch={len(k.scratch)} items)")
    assert "scratch" not in repr(sample_knowledge(PRE, FT))


def test_count_and_strength_ratios_equal_hand_computed_values():
    r = sample_knowledge(PRE, FT, SCRATCH).ratios()
    expected = {
        "preserve": 2 / 3, "discard": 1 / 3, "new": 2 / 4, "inherit": 2 / 4,
        "preserve_strength": 3 / 3.5, "discard_strength": 0.5 / 3.5,
        "new_strength": 1.0 / 5.0, "inherit_strength": 4.0 / 5.0,
        "exclusive": 1 / 2, "learnability": 1 / 2, "scratch_only": 0 / 2, "new_in_scratch": 1 / 2,
    }
    assert r.keys() == expected.keys()
    for name, value in expected.items():
        assert r[name] == pytest.approx(value), name


def test_signed_matching_treats_a_sign_flip_as_discarded_and_new():
    k = sample_knowledge(PRE, FT, match="signed")
    assert k.preserve == {("and", 1, 1)}
    r = k.ratios()
    assert r["preserve"] == pytest.approx(1 / 3) and r["new"] == pytest.approx(3 / 4)
    assert "exclusive" not in r  # no scratch model


def test_ratios_by_order_restrict_every_set_to_one_order():
    k = sample_knowledge(PRE, FT)
    first, second, third = k.ratios(1), k.ratios(2), k.ratios(3)
    assert (first["preserve"], first["new"]) == (1.0, 0.0)
    assert second["preserve"] == pytest.approx(1 / 2) and second["new"] == pytest.approx(2 / 3)
    assert second["preserve_strength"] == pytest.approx(2.0 / 2.5)
    assert math.isnan(third["preserve"]) and math.isnan(third["new"])  # no third-order knowledge


def test_models_over_different_players_are_refused():
    with pytest.raises(PretrainReuseError, match="pretrained and finetuned have n=3 and n=2 players"):
        sample_knowledge(PRE, inter(2, A0=1.0))
    with pytest.raises(PretrainReuseError, match="match='sign' is not one of"):
        sample_knowledge(PRE, FT, match="sign")


# --------------------------------------------------------------------------------------------
# Over samples
# --------------------------------------------------------------------------------------------


def test_report_averages_ratios_and_skips_samples_with_an_empty_denominator():
    nothing = inter(3)  # a model without any knowledge on this sample
    report = knowledge_report([PRE, nothing], [FT, inter(3, A0=1.0)])
    preserve, new = report.overall["preserve"], report.overall["new"]
    assert (preserve.n_used, preserve.n_skipped) == (1, 1) and preserve.mean == pytest.approx(2 / 3)
    # new: 2/4 on the first sample, 1/1 on the second
    assert (new.n_used, new.n_skipped) == (2, 0)
    assert new.mean == pytest.approx(0.75) and new.std == pytest.approx(0.25)
    assert (new.q25, new.median, new.q75) == pytest.approx((0.625, 0.75, 0.875))
    assert new.pooled == pytest.approx(3 / 5)
    # the standard error of the mean over the samples that define it, as scipy computes it
    from scipy.stats import sem

    assert new.sem == pytest.approx(sem([0.5, 1.0]))
    assert math.isnan(preserve.sem)  # one sample: no spread to estimate
    assert report.by_order[2]["preserve"].mean == pytest.approx(1 / 2)
    assert report.by_order[3]["preserve"].n_used == 0 and math.isnan(report.by_order[3]["preserve"].mean)


def test_report_to_dict_is_json_ready_with_none_for_undefined_ratios():
    import json

    d = knowledge_report([PRE], [FT], [SCRATCH]).to_dict()
    json.dumps(d, allow_nan=False)
    assert d["overall"]["exclusive"]["mean"] == pytest.approx(0.5)
    assert d["by_order"]["3"]["preserve"]["mean"] is None


_HASH_SEED_SCRIPT = """
import numpy as np
from pretrain_reuse.knowledge import Interactions, knowledge_report, set_discrimination
rng = np.random.default_rng(0)
def model(n=8):  # every nonzero entry is salient; a third are zero, so the sets differ
    vals = rng.uniform(0.1, 1.0, (2, 1 << n)) * rng.choice([-1, 0, 1], (2, 1 << n))
    return Interactions(n=n, and_values=vals[0], or_values=vals[1], v=np.zeros(1 << n),
                        noise=np.zeros(1 << n), kind="and-or")
report = knowledge_report(*[[model() for _ in range(4)] for _ in range(3)])
print(repr(report.to_dict()), repr(set_discrimination(report, [0, 1, 0, 1]).to_dict()))
"""


def test_numbers_do_not_depend_on_the_string_hash_seed_of_the_process():
    # items are (str, int) tuples whose set order follows PYTHONHASHSEED; sums over sets must not
    outs = [subprocess.run([sys.executable, "-c", _HASH_SEED_SCRIPT], capture_output=True,
                           text=True, check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2", "3")]
    assert outs[0] == outs[1] == outs[2] and "preserve_strength" in outs[0]


def test_report_takes_any_iterable_of_interactions():
    report = knowledge_report(iter([PRE, PRE]), (x for x in [FT, PRE]), scratch=iter([SCRATCH, SCRATCH]))
    expected = knowledge_report([PRE, PRE], [FT, PRE], scratch=[SCRATCH, SCRATCH])
    assert report.to_dict() == expected.to_dict()


def test_report_and_discrimination_take_a_single_interactions_as_one_sample():
    assert (knowledge_report(PRE, FT, SCRATCH).to_dict()
            == knowledge_report([PRE], [FT], [SCRATCH]).to_dict())
    assert discrimination_power(PRE) == discrimination_power([PRE])
    with pytest.raises(PretrainReuseError, match=re.escape(
            "finetuned must be a list of Interactions (one per sample), got int")):
        knowledge_report(PRE, 3)


@pytest.mark.parametrize("match", ["support", "signed"])
def test_report_saves_its_knowledge_sets_and_loads_back_every_ratio(tmp_path, match):
    from pretrain_reuse import load

    report = knowledge_report([PRE, FT, inter(3)], [FT, PRE, inter(3, A0=1.0)],
                              [SCRATCH, SCRATCH, PRE], tau=0.1, match=match)
    back = load(report.save(tmp_path / "report.json"))
    assert isinstance(back, KnowledgeReport) and back.to_dict() == report.to_dict()
    _check_meta(tmp_path / "report.json", "KnowledgeReport", {"tau": 0.1, "match": match})
    assert (back.tau, back.match, back.n_samples) == (0.1, match, 3)
    for name in ("preserve", "new", "exclusive", "preserve_strength"):
        for order in (None, 1, 2):
            np.testing.assert_array_equal(back.per_sample(name, order), report.per_sample(name, order))
    assert [s.preserve for s in back.samples] == [s.preserve for s in report.samples]
    without_scratch = knowledge_report([PRE], [FT])
    assert KnowledgeReport.load(without_scratch.save(tmp_path / "r2.json")).samples[0].scratch is None
    with pytest.raises(PretrainReuseError, match="holds kind 'knowledge-sets', not 'knowledge-convergence'"):
        Convergence.load(tmp_path / "report.json")


def test_report_plots_its_ratios():
    import matplotlib.pyplot as plt

    _, ax = plt.subplots()
    assert knowledge_report([PRE], [FT], [SCRATCH]).plot(ax) is ax
    bars = {t.get_text(): p.get_height() for t, p in zip(ax.get_xticklabels(), ax.patches, strict=True)}
    assert bars == pytest.approx({"preserve": 2 / 3, "discard": 1 / 3, "new": 1 / 2, "exclusive": 1 / 2})
    plt.close("all")


def test_report_needs_one_interaction_per_sample_for_every_model():
    with pytest.raises(PretrainReuseError, match="got 2 pretrained, 1 finetuned"):
        knowledge_report([PRE, PRE], [FT])
    with pytest.raises(PretrainReuseError, match="no samples"):
        knowledge_report([], [])


# --------------------------------------------------------------------------------------------
# Convergence
# --------------------------------------------------------------------------------------------

CHECKPOINTS = [
    [inter(3, A0=1.0, A1=1.0), inter(3, A2=1.0)],
    [inter(3, A0=1.0, A01=1.0), inter(3)],
    [inter(3, A0=1.0, A01=1.0, O12=1.0), inter(3, A2=1.0)],
]


def test_convergence_iou_and_detour_equal_hand_computed_curves():
    c = knowledge_convergence(CHECKPOINTS)
    np.testing.assert_allclose(c.similarity, [(1 / 4 + 1) / 2, (2 / 3 + 0) / 2, 1.0])
    np.testing.assert_allclose(c.detour, [(1 / 2 + 0) / 2, 0.0, 0.0])  # sample 2 at t=2 has no Ω_t
    np.testing.assert_array_equal(c.n_used, [2, 2, 2])
    assert c.first_at_threshold == 3
    assert c.auc == pytest.approx(((0.625 + 1 / 3) / 2 + (1 / 3 + 1) / 2) / 2)
    assert c.n_decreases == 1 and c.total_detour == pytest.approx(0.25)


def test_convergence_over_training_steps_reports_the_step_and_weighs_by_the_steps_between():
    # checkpoints at steps 10, 20, 40: s = 0.625, 1/3, 1; the area under s over the steps is
    # the trapezoid over [10, 40] (the last interval counts twice as much), divided by 30
    c = knowledge_convergence(CHECKPOINTS, steps=[10, 20, 40])
    np.testing.assert_allclose(c.similarity, knowledge_convergence(CHECKPOINTS).similarity)
    assert c.first_at_threshold == 40
    s = c.similarity
    assert c.auc == pytest.approx(((s[0] + s[1]) / 2 * 10 + (s[1] + s[2]) / 2 * 20) / 30)
    assert c.auc == pytest.approx(np.trapezoid(s, [10, 20, 40]) / 30)
    assert c.to_dict()["steps"] == [10, 20, 40] and c.to_dict()["first_at_threshold"] == 40
    assert knowledge_convergence(CHECKPOINTS, threshold=0.5, steps=[10, 20, 40]).first_at_threshold == 10
    for steps in ([10, 20], [10, 10, 40], [20, 10, 40], [10, 20.5, 40]):
        with pytest.raises(PretrainReuseError, match=r"must be 3 increasing integers, the training step"):
            knowledge_convergence(CHECKPOINTS, steps=steps)


def test_a_plateau_of_the_similarity_is_no_decrease():
    def curve(s):
        return Convergence(similarity=np.array(s), detour=np.zeros(len(s)),
                           n_used=np.ones(len(s), int), measure="iou")

    assert curve([0.5, 0.5, 1.0, 1.0]).n_decreases == 0
    assert curve([0.5, 0.4, 0.4, 1.0]).n_decreases == 1
    assert curve([0.9, 0.4, 0.7, 0.6]).n_decreases == 2


def test_convergence_by_order_uses_only_interactions_of_that_order():
    c = knowledge_convergence(CHECKPOINTS, order=2)
    # order 2: sample 1 has {} -> {A01} -> {A01, O12}: IoU 0, 1/2, 1; sample 2 never has any
    np.testing.assert_allclose(c.similarity, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(c.n_used, [1, 1, 1])
    assert math.isnan(c.detour[0]) and c.detour[1] == 0.0


def test_convergence_coverage_divides_by_the_final_knowledge():
    c = knowledge_convergence(CHECKPOINTS, measure="coverage")
    np.testing.assert_allclose(c.similarity, [(1 / 3 + 1) / 2, (2 / 3 + 0) / 2, 1.0])


def test_convergence_weighted_measure_is_one_at_the_final_checkpoint():
    c = knowledge_convergence(CHECKPOINTS, measure="weighted")
    assert c.similarity[-1] == pytest.approx(1.0)
    # sample 1: min 1 (A0) over max 4 (A0, A1, A01, O12); sample 2: identical vectors
    assert c.similarity[0] == pytest.approx((1 / 4 + 1.0) / 2)


def test_convergence_summaries_handle_a_curve_that_never_reaches_the_threshold():
    c = knowledge_convergence(CHECKPOINTS, order=3)  # no sample has knowledge of order 3: s(t) NaN
    assert c.first_at_threshold is None
    assert c.to_dict()["first_at_threshold"] is None


@pytest.mark.parametrize("kwargs,needle", [
    ({"threshold": math.nan}, r"threshold=nan must be a similarity level in \[0, 1\]"),
    ({"threshold": 1.5}, r"threshold=1\.5 must be a similarity level in \[0, 1\]"),
    ({"order": 99}, r"order=99 must be an interaction order in 1\.\.3"),
    ({"order": 0}, r"order=0 must be an interaction order in 1\.\.3"),
])
def test_convergence_refuses_a_threshold_or_order_out_of_range(kwargs, needle):
    with pytest.raises(PretrainReuseError, match=needle):
        knowledge_convergence(CHECKPOINTS, **kwargs)


def test_convergence_takes_any_iterable_and_refuses_what_is_not_interactions():
    c = knowledge_convergence(iter([iter(ckpt) for ckpt in CHECKPOINTS]))
    np.testing.assert_allclose(c.similarity, knowledge_convergence(CHECKPOINTS).similarity)
    with pytest.raises(PretrainReuseError, match=r"checkpoints\[0\]\[1\] must be an Interactions object"):
        knowledge_convergence([[PRE, "x"], [PRE, FT]])


def test_convergence_save_and_load_round_trip_nan_included(tmp_path):
    c = knowledge_convergence(CHECKPOINTS, order=2, threshold=0.5, tau=0.2, match="signed")
    back = Convergence.load(c.save(tmp_path / "convergence.json"))  # detour[0] is NaN
    # the knowledge sets' settings too: a file of tau 0.2 could not be told from one of 0.05
    _check_meta(tmp_path / "convergence.json", "Convergence", {
        "measure": c.measure, "threshold": 0.5, "tau": 0.2, "match": "signed", "order": 2})
    for name in ("similarity", "detour", "n_used"):
        np.testing.assert_array_equal(getattr(back, name), getattr(c, name))
    assert (back.measure, back.threshold) == ("iou", 0.5) and back.to_dict() == c.to_dict()
    assert (back.tau, back.match, back.order) == (0.2, "signed", 2) and back == c
    stepped = knowledge_convergence(CHECKPOINTS, steps=[5, 6, 9])
    assert Convergence.load(stepped.save(tmp_path / "stepped.json")).to_dict() == stepped.to_dict()
    with pytest.raises(PretrainReuseError, match="holds kind 'knowledge-convergence', not 'accuracy"):
        AccuracyCorrelation.load(tmp_path / "convergence.json")


def test_convergence_plots_its_curves_over_the_steps():
    import matplotlib.pyplot as plt

    c = knowledge_convergence(CHECKPOINTS, steps=[10, 20, 40])
    _, ax = plt.subplots()
    assert c.plot(ax, run="scratch") is ax
    similarity, detour = ax.lines
    np.testing.assert_array_equal(similarity.get_xdata(), [10, 20, 40])
    np.testing.assert_array_equal(similarity.get_ydata(), c.similarity)
    np.testing.assert_array_equal(detour.get_ydata(), c.detour)
    assert similarity.get_label() == "scratch: iou with its final knowledge"
    plt.close("all")


def test_convergence_refuses_checkpoints_over_different_samples():
    with pytest.raises(PretrainReuseError, match="every checkpoint must be explained on the same samples"):
        knowledge_convergence([[PRE, FT], [PRE]])
    with pytest.raises(PretrainReuseError, match="measure='jaccard' is not one of"):
        knowledge_convergence(CHECKPOINTS, measure="jaccard")


# --------------------------------------------------------------------------------------------
# Pairwise comparisons and discrimination power
# --------------------------------------------------------------------------------------------

ONE = inter(2, A0=1.0, A1=-1.0)
TWO = inter(2, A0=0.5, A1=1.0, O01=1.0)


def test_weighted_overlap_splits_positive_and_negative_parts():
    # min: A0 0.5 (+), A1 0 (signs differ), O01 0 -> 0.5; max: 1 + 1 + 1 (+) and 1 (-) -> 4
    assert weighted_overlap(ONE, TWO) == pytest.approx(0.5 / 4)
    assert weighted_overlap(ONE, ONE) == pytest.approx(1.0)
    assert weighted_overlap(ONE, TWO, normalize=True) == pytest.approx((0.5 / 2.5) / (0.5 + 0.4 + 0.4 + 0.5))


@pytest.mark.parametrize("compare", [weighted_overlap, cover_ratio, transferability])
def test_pairwise_comparisons_name_an_argument_that_is_not_interactions(compare):
    with pytest.raises(PretrainReuseError, match="b must be an Interactions object, got int"):
        compare(ONE, 3)
    with pytest.raises(PretrainReuseError, match=r"a and b have n=2 and n=3 players"):
        compare(ONE, PRE)


def test_cover_ratio_and_transferability_equal_hand_computed_values():
    assert cover_ratio(ONE, TWO) == pytest.approx((0.5 + 1.0) / 2.0)
    assert transferability(ONE, TWO) == pytest.approx(2 / 2)
    assert transferability(TWO, ONE) == pytest.approx(2 / 3)
    assert math.isnan(transferability(inter(2), TWO))


def test_discrimination_power_counts_signs_over_samples_of_a_class():
    samples = [inter(2, A0=1.0, A1=-1.0), inter(2, A0=1.0), inter(2, A0=-1.0, A1=-1.0)]
    d = discrimination_power(samples)
    a0, a1 = ("and", 0b01), ("and", 0b10)
    assert d.beta == {a0: pytest.approx(2 / 3), a1: 1.0}
    assert d.alpha == {a0: 1.0, a1: pytest.approx(2 / 3)}
    assert d.purity() == pytest.approx((1.0 * 2 / 3 + 2 / 3 * 1.0) / (1.0 + 2 / 3))
    assert d.purity([a1]) == 1.0 and math.isnan(d.purity([("or", 0b11)]))


def test_set_discrimination_counts_signs_of_each_sets_own_model_per_class():
    # class 0: three samples, class 1: one; A0 is preserved on every sample of class 0 with the
    # fine-tuned signs +, -, + (the pre-trained ones are all +), A01 is discarded with the
    # pre-trained signs -, + (it is not in the fine-tuned model on those samples)
    pre = [inter(2, A0=1.0, A01=-2.0), inter(2, A0=1.0), inter(2, A0=1.0, A01=1.0), inter(2, A1=1.0)]
    ft = [inter(2, A0=3.0, A1=1.0), inter(2, A0=-2.0, A01=1.0), inter(2, A0=1.0), inter(2, A1=-1.0)]
    d = set_discrimination(knowledge_report(pre, ft), [0, 0, 0, 1])
    assert d.by_set["preserve"][0].beta == {("and", 0b01): pytest.approx(2 / 3)}
    # class 1's one sample has β = 1 trivially: its purity is recorded, but stays out of the mean
    assert d.by_set["preserve"][1].purity() == 1.0
    assert d.purity("preserve") == pytest.approx(2 / 3)
    assert d.by_set["discard"][0].beta == {("and", 0b11): 0.5}
    assert d.by_set["discard"][0].alpha == {("and", 0b11): pytest.approx(2 / 3)}
    assert d.purity("discard") == 0.5  # class 1 discards nothing: left out of the mean
    assert d.purity("new") == 1.0 and "exclusive" not in d.by_set
    out = d.to_dict()
    assert out["discard"]["by_class"]["1"] == {"purity": None, "n_samples": 1}
    with pytest.raises(PretrainReuseError, match="3 labels for 4 samples"):
        set_discrimination(knowledge_report(pre, ft), [0, 0, 1])
    with pytest.raises(PretrainReuseError, match="labels must be integer class indices"):
        set_discrimination(knowledge_report(pre, ft), ["a", "a", "a", "b"])
    with pytest.raises(PretrainReuseError, match="report must be a KnowledgeReport"):
        set_discrimination(pre, [0, 0, 0, 1])
    assert set_discrimination(knowledge_report(pre, ft), iter([0, 0, 0, 1])).to_dict() == out


def test_set_discrimination_saves_loads_and_plots_its_purities(tmp_path):
    import json

    import matplotlib.pyplot as plt

    from pretrain_reuse import load

    pre = [inter(2, A0=1.0, A01=-2.0), inter(2, A0=1.0), inter(2, A0=1.0, A01=1.0), inter(2, A1=1.0)]
    ft = [inter(2, A0=3.0, A1=1.0), inter(2, A0=-2.0, A01=1.0), inter(2, A0=1.0), inter(2, A1=-1.0)]
    d = set_discrimination(knowledge_report(pre, ft, ft), [0, 0, 0, 1])
    back = load(d.save(tmp_path / "purity.json"))
    assert isinstance(back, SetDiscrimination) and back == d and back.to_dict() == d.to_dict()
    _check_meta(tmp_path / "purity.json", "SetDiscrimination", {"tau": 0.05, "match": "support"})
    assert (back.tau, back.match) == (0.05, "support")
    _, ax = plt.subplots()
    assert d.plot(ax) is ax
    heights = {t.get_text(): p.get_height() for t, p in zip(ax.get_xticklabels(), ax.patches, strict=True)}
    # preserve: class 0 purity 2/3 (A0 signed +, -, +); class 1 has one sample, left out (its
    # purity 1 would be drawn as a dot); exclusive is empty
    assert heights == {"preserve": pytest.approx(2 / 3), "discard": 0.5, "new": 1.0,
                       "exclusive\n(n/a)": 0.0}
    dots = [y for line in ax.lines for y in line.get_ydata()]
    assert sorted(dots) == pytest.approx([0.5, 2 / 3, 1.0])  # discard, preserve, new of class 0
    plt.close("all")
    record = json.loads((tmp_path / "purity.json").read_text())
    record["counts"]["preserve"]["0"]["positive"] = [["and", 1]]  # a row without its count
    (tmp_path / "bad.json").write_text(json.dumps(record))
    with pytest.raises(PretrainReuseError, match=r"bad\.json' has malformed counts"):
        SetDiscrimination.load(tmp_path / "bad.json")
    with pytest.raises(PretrainReuseError, match="holds kind 'set-discrimination', not 'knowledge-conv"):
        Convergence.load(tmp_path / "purity.json")


def _on(x: Interactions, **info) -> Interactions:
    """``x`` as a game recorded by explain (its info names the sample, players and baseline)."""
    return dataclasses.replace(x, info={
        "sample": "a.png", "players": {"players": "grid", "n": x.n}, "baseline": "zero",
        "output": "log-odds", **info})


@pytest.mark.parametrize("other,needle", [
    ({"sample": "b.png"}, "a different sample ('a.png' and 'b.png')"),
    ({"baseline": "blur"}, "a different baseline ('zero' and 'blur')"),
    ({"players": {"players": "grid", "n": 3, "seed": 1}}, "a different players ({"),
])
def test_games_of_other_samples_or_baselines_are_not_compared(other, needle):
    # lists are paired by position: a reordered list compared cat/2 with fish/5 without a word
    with pytest.raises(PretrainReuseError, match=re.escape(needle)):
        knowledge_report([_on(PRE)], [_on(FT, **other)])
    with pytest.raises(PretrainReuseError, match=re.escape(needle)):
        knowledge_convergence([[_on(PRE)], [_on(FT, **other)]])
    with pytest.raises(PretrainReuseError, match=re.escape(needle)):
        transferability(_on(PRE), _on(FT, **other))
    # the same game under another model is compared, and so are different samples of a class
    assert knowledge_report([_on(PRE)], [_on(FT, model="other")]).n_samples == 1
    discrimination_power([_on(PRE), _on(FT, sample="b.png")])


def test_discrimination_power_takes_any_iterable_and_names_a_sample_that_is_not_interactions():
    samples = [inter(2, A0=1.0, A1=-1.0), inter(2, A0=1.0)]
    assert discrimination_power(iter(samples)) == discrimination_power(samples)
    with pytest.raises(PretrainReuseError, match=r"samples\[1\] must be an Interactions object"):
        discrimination_power([samples[0], None])


def test_set_discrimination_of_one_model_against_itself_is_its_discrimination_power():
    rng = np.random.default_rng(0)
    xs = [inter(3, A0=rng.normal(), A01=rng.normal(), O12=rng.normal(), A012=rng.normal())
          for _ in range(8)]
    labels = [0, 1] * 4
    d = set_discrimination(knowledge_report(xs, xs, xs), labels)
    for c in (0, 1):
        own = discrimination_power([x for x, y in zip(xs, labels, strict=True) if y == c])
        assert d.by_set["preserve"][c].beta == own.beta and d.by_set["exclusive"][c].alpha == {}
    assert d.purity("preserve") == pytest.approx(
        np.mean([discrimination_power(xs[c::2]).purity() for c in (0, 1)]))


def test_purity_leaves_out_classes_of_one_sample_and_is_undefined_without_others():
    # the demo's case: one class of two samples among classes of one; the single-sample classes'
    # β = 1 must not pull the overall purity toward 1
    rng = np.random.default_rng(1)
    xs = [inter(3, A0=rng.normal(), A01=rng.normal(), O12=rng.normal(), A012=rng.normal())
          for _ in range(5)]
    labels = [0, 0, 1, 2, 3]
    d = set_discrimination(knowledge_report(xs, xs), labels)
    assert d.purity("preserve") == pytest.approx(discrimination_power(xs[:2]).purity())
    assert d.purity("preserve") < 1.0
    alone = set_discrimination(knowledge_report(xs[2:], xs[2:]), labels[2:])
    assert math.isnan(alone.purity("preserve")) and alone.to_dict()["preserve"]["purity"] is None


# --------------------------------------------------------------------------------------------
# Each knowledge set alone (docs/knowledge.md §5)
# --------------------------------------------------------------------------------------------


def _by_definition(x: Interactions, keep) -> np.ndarray:
    """ŵ(S) = v(∅) + kept AND terms inside S + kept OR terms meeting S, coalition by coalition."""
    return np.array([x.v[0] + sum(x.and_values[t] for kind, t in keep if kind == "and" and t & s == t)
                     + sum(x.or_values[t] for kind, t in keep if kind == "or" and t & s)
                     for s in range(1 << x.n)])


def test_surrogate_equals_its_definition_on_every_coalition():
    rng = np.random.default_rng(0)
    x = Interactions(n=5, and_values=rng.normal(size=32), or_values=rng.normal(size=32),
                     v=rng.normal(size=32), noise=np.zeros(32), kind="and-or")
    keep = [("and", 3), ("or", 6), ("and", 31), ("or", 1), ("and", 16)]
    np.testing.assert_allclose(x.surrogate(keep), _by_definition(x, keep), atol=1e-12)
    np.testing.assert_array_equal(x.surrogate([]), np.full(32, x.v[0]))


@pytest.mark.parametrize("key", [("and", 0), ("or", 8), ("xor", 1), ("and",), ["and", 1]])
def test_surrogate_refuses_what_is_no_interaction_of_its_players(key):
    with pytest.raises(PretrainReuseError, match="no interaction of 3 players; pass \\(type, mask\\)"):
        FT.surrogate([key])
    with pytest.raises(PretrainReuseError, match=r"keep must be \(type, mask\) keys .* got NoneType"):
        FT.surrogate(None)


def _planted(n: int, and_terms: dict, or_terms: dict, bias: float, **info) -> Interactions:
    """Interactions that are exactly the planted terms of their game (no noise)."""
    i_and, i_or = np.zeros(1 << n), np.zeros(1 << n)
    i_and[0] = bias
    for terms, target in ((and_terms, i_and), (or_terms, i_or)):
        for players, value in terms.items():
            target[mask_of(players, n)] = value
    return Interactions(n=n, and_values=i_and, or_values=i_or, noise=np.zeros(1 << n),
                        v=planted_game(n, and_terms, or_terms, bias=bias), kind="and-or", info=info)


# the fine-tuned game: preserved AND {0,1} and OR {2,3}, new AND {0,3} and {2}; the pre-trained
# model also has AND {1,2} (discarded); the scratch model has AND {0,1}, so OR {2,3} is exclusive
BIAS = -1.5
PRESERVED = ({(0, 1): 3.0}, {(2, 3): 1.0})
NEW = {(0, 3): -1.0, (2,): 0.7}
FT4 = _planted(4, {**PRESERVED[0], **NEW}, PRESERVED[1], BIAS, output="log-odds")
PRE4 = _planted(4, {(0, 1): 2.0, (1, 2): 1.5}, {(2, 3): -0.8}, 0.0, output="log-odds")
SCRATCH4 = _planted(4, {(0, 1): 1.0}, {}, 0.0, output="log-odds")


def _fidelity(v: np.ndarray, w: np.ndarray) -> float:
    return 1 - np.sum((v - w) ** 2) / np.sum((v - v.mean()) ** 2)


def test_set_ablation_rebuilds_the_game_from_each_planted_set_alone():
    report = knowledge_report(PRE4, FT4, SCRATCH4)
    a = set_ablation(report, FT4)
    v, span = FT4.v, FT4.v[-1] - FT4.v[0]  # 2.2 - (-1.5) = 3.7
    preserved = planted_game(4, *PRESERVED, bias=BIAS)
    new = planted_game(4, NEW, bias=BIAS)
    exclusive = planted_game(4, {}, PRESERVED[1], bias=BIAS)
    assert list(a.measures) == ["salient", "preserve", "new", "exclusive"]
    assert {k: s.tolist() for k, s in a.sizes.items()} == {"salient": [4], "preserve": [2], "new": [2],
                                                          "exclusive": [1]}
    for name, w in (("salient", v), ("preserve", preserved), ("new", new), ("exclusive", exclusive)):
        assert a.mean(name, "fidelity") == pytest.approx(_fidelity(v, w), abs=1e-12)
        assert a.mean(name, "error") == pytest.approx(np.abs(v - w).mean() / span, abs=1e-12)
    assert a.mean("salient", "fidelity") == pytest.approx(1.0) and a.mean("salient", "error") < 1e-12
    # shares: the planted sums over v(N) - v(∅); preserve and new add up to all of the output
    assert a.mean("preserve", "share") == pytest.approx(4.0 / 3.7)
    assert a.mean("new", "share") == pytest.approx(-0.3 / 3.7)
    assert a.mean("exclusive", "share") == pytest.approx(1.0 / 3.7)
    assert a.mean("salient", "share") == pytest.approx(1.0)
    # v(N) = 2.2 > 0; preserved alone gives 2.5 at N, new alone -1.8, exclusive alone -0.5
    assert [a.mean(k, "same_decision") for k in a.measures] == [1.0, 1.0, 0.0, 0.0]


def test_set_ablation_of_the_pretrained_model_rebuilds_it_from_what_fine_tuning_keeps_or_drops():
    # PRE4: AND {0,1} 2.0 and OR {2,3} -0.8 kept by fine-tuning, AND {1,2} 1.5 dropped; the scratch
    # model has AND {0,1}, so the kept OR {2,3} is exclusive. v(N) = 2.7, v(∅) = 0
    a = set_ablation(knowledge_report(PRE4, FT4, SCRATCH4), PRE4, model="pretrained")
    v = PRE4.v
    kept = planted_game(4, {(0, 1): 2.0}, {(2, 3): -0.8})
    dropped = planted_game(4, {(1, 2): 1.5})
    exclusive = planted_game(4, {}, {(2, 3): -0.8})
    assert a.model == "pretrained" and list(a.measures) == ["salient", "preserve", "discard", "exclusive"]
    for name, w, share in (("salient", v, 1.0), ("preserve", kept, 1.2 / 2.7),
                           ("discard", dropped, 1.5 / 2.7), ("exclusive", exclusive, -0.8 / 2.7)):
        assert a.mean(name, "fidelity") == pytest.approx(_fidelity(v, w), abs=1e-12)
        assert a.mean(name, "share") == pytest.approx(share)
    assert [a.mean(k, "same_decision") for k in a.measures] == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(PretrainReuseError, match="pretrained\\[0\\] is not the pre-trained model's"):
        set_ablation(knowledge_report(PRE4, FT4), FT4, model="pretrained")
    with pytest.raises(PretrainReuseError, match="model='scratch' is not one of"):
        set_ablation(knowledge_report(PRE4, FT4), PRE4, model="scratch")


def test_set_ablation_averages_over_samples_and_leaves_out_those_without_an_effect():
    # FT's game is constant (v = 0): nothing is defined there, and PRE4's game is not log-odds
    flat, plain = FT, _planted(4, {(0, 1): 2.0}, {}, 0.5)
    a = set_ablation(knowledge_report([PRE, PRE4, PRE4], [flat, FT4, plain]), [flat, FT4, plain])
    assert np.isnan(a.measures["preserve"]["fidelity"][0])
    assert a.mean("preserve", "fidelity") == pytest.approx(
        np.mean(a.measures["preserve"]["fidelity"][1:]))
    # the median too: one sample with v(N) near v(∅) pulls the mean of share and R² anywhere
    assert a.median("preserve", "share") == pytest.approx(
        np.median(a.measures["preserve"]["share"][1:]))
    d = a.to_dict()
    assert d["preserve"]["share"]["median"] == pytest.approx(a.median("preserve", "share"))
    assert d["preserve"]["fidelity"]["n_used"] == 2 and d["preserve"]["same_decision"]["n_used"] == 1
    assert d["salient"]["items"] == pytest.approx((4 + 4 + 1) / 3)  # FT, FT4, plain
    alone = set_ablation(knowledge_report(PRE, flat), flat).to_dict()
    assert alone["new"]["fidelity"] == {"mean": None, "median": None, "n_used": 0}
    assert "exclusive" not in alone


def test_set_ablation_refuses_interactions_the_report_was_not_made_from():
    report = knowledge_report([PRE4, PRE4], [FT4, FT4])
    with pytest.raises(PretrainReuseError, match="got 1 finetuned interactions for 2 samples"):
        set_ablation(report, FT4)
    with pytest.raises(PretrainReuseError, match="finetuned\\[1\\] is not the fine-tuned model's"):
        set_ablation(report, [FT4, PRE4])
    # the same salient items with the same effects, but one more: not the report's Ω_ft either
    extra = dataclasses.replace(FT4, and_values=FT4.and_values + np.eye(16)[mask_of((1, 3), 4)])
    with pytest.raises(PretrainReuseError, match="finetuned\\[0\\] is not the fine-tuned model's"):
        set_ablation(report, [extra, FT4])
    with pytest.raises(PretrainReuseError, match="report must be a KnowledgeReport"):
        set_ablation({"samples": []}, FT4)


def test_a_report_of_samples_with_different_players_loads_back_for_set_ablation(tmp_path):
    report = knowledge_report([PRE, PRE4], [FT, FT4])  # 3 and 4 players
    back = KnowledgeReport.load(report.save(tmp_path / "sets.json"))
    assert [s.n for s in back.samples] == [3, 4] and sorted(back.by_order) == [1, 2, 3, 4]
    assert set_ablation(back, [FT, FT4]).to_dict() == set_ablation(report, [FT, FT4]).to_dict()


def test_set_ablation_saves_loads_and_plots_itself(tmp_path):
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pretrain_reuse import load

    # FT's game is constant: its sample is NaN everywhere, which must survive the round trip
    a = set_ablation(knowledge_report([PRE, PRE4], [FT, FT4], [SCRATCH, SCRATCH4]), [FT, FT4])
    b = load(a.save(tmp_path / "ablation.json"))
    assert isinstance(b, SetAblation) and b.to_dict() == a.to_dict()
    _check_meta(tmp_path / "ablation.json", "SetAblation", {"model": "finetuned"})
    for name in a.measures:
        np.testing.assert_array_equal(b.sizes[name], a.sizes[name])
        for m, values in a.measures[name].items():
            np.testing.assert_array_equal(b.measures[name][m], values)
    assert repr(a).startswith("SetAblation(model='finetuned', samples=2, fidelity: salient=1, preserve=0.")
    _, ax = plt.subplots()
    assert a.plot(ax) is ax
    assert [t.get_text() for t in ax.get_xticklabels()] == ["salient", "preserve", "new", "exclusive"]
    heights = [p.get_height() for p in ax.patches]  # the fidelity bars, then the share bars
    assert heights == pytest.approx([a.mean(n, m) for m in ("fidelity", "share") for n in a.measures])
    plt.close("all")
    record = json.loads((tmp_path / "ablation.json").read_text())
    del record["per_sample"]["new"]["share"]
    (tmp_path / "bad.json").write_text(json.dumps(record))
    with pytest.raises(PretrainReuseError, match=r"bad\.json' has malformed per-sample numbers"):
        SetAblation.load(tmp_path / "bad.json")
    (tmp_path / "bogus.json").write_text(json.dumps({**record, "model": "bogus"}))
    with pytest.raises(PretrainReuseError, match=r"bogus\.json' names model 'bogus', not one of"):
        SetAblation.load(tmp_path / "bogus.json")
    with pytest.raises(PretrainReuseError, match="holds kind 'set-ablation', not 'set-discrimination'"):
        SetDiscrimination.load(tmp_path / "ablation.json")


# --------------------------------------------------------------------------------------------
# Synthetic games
# --------------------------------------------------------------------------------------------


def test_planted_game_evaluates_and_and_or_terms_on_every_coalition():
    v = planted_game(3, {(0, 1): 2.0}, {(1, 2): -1.0}, bias=0.5)
    expected = [0.5 + 2.0 * (m & 0b011 == 0b011) - 1.0 * (m & 0b110 != 0) for m in range(8)]
    np.testing.assert_allclose(v, expected)
    noisy = planted_game(3, {(0, 1): 2.0}, noise=0.1, seed=5)
    np.testing.assert_array_equal(noisy, planted_game(3, {(0, 1): 2.0}, noise=0.1, seed=5))
    assert 0 < np.abs(noisy - planted_game(3, {(0, 1): 2.0})).max() < 1.0


def test_planted_game_refuses_an_empty_or_term_and_negative_noise():
    with pytest.raises(PretrainReuseError, match="or_terms has the empty coalition"):
        planted_game(3, or_terms={(): 1.0})
    with pytest.raises(PretrainReuseError, match="noise=-1"):
        planted_game(3, noise=-1)


# --------------------------------------------------------------------------------------------
# Knowledge ratios against accuracy (docs/knowledge.md §5)
# --------------------------------------------------------------------------------------------

# five models: per-sample r_preserve (NaN = empty denominator) and their test accuracies
RATIOS = [[0.2, 0.4, np.nan, 0.3], [0.5, 0.6, 0.7], [0.1, 0.3, 0.2, 0.2, 0.2],
          [0.8, 0.6, 0.7, 0.9], [0.4, 0.5]]
ACCURACY = [0.71, 0.80, 0.65, 0.90, 0.74]


def test_accuracy_correlation_equals_scipy_on_the_per_model_means():
    stats = pytest.importorskip("scipy.stats")
    c = accuracy_correlation(RATIOS, ACCURACY, n_boot=200)
    means = [np.nanmean(r) for r in RATIOS]
    np.testing.assert_allclose(c.ratio, means, atol=1e-15)
    assert c.pearson == pytest.approx(stats.pearsonr(means, ACCURACY)[0], abs=1e-12)
    assert c.spearman == pytest.approx(stats.spearmanr(means, ACCURACY)[0], abs=1e-12)
    assert c.n_samples.tolist() == [3, 3, 5, 4, 2]


def test_spearman_averages_tied_ranks_like_scipy():
    stats = pytest.importorskip("scipy.stats")
    ratios = [[0.3], [0.3], [0.5], [0.1], [0.5], [0.3]]
    accuracy = [0.6, 0.7, 0.7, 0.5, 0.9, 0.6]
    c = accuracy_correlation(ratios, accuracy, n_boot=100)
    assert c.spearman == pytest.approx(stats.spearmanr([0.3, 0.3, 0.5, 0.1, 0.5, 0.3],
                                                       accuracy)[0], abs=1e-12)


def test_accuracy_correlation_intervals_agree_with_scipy_bootstrap():
    # scipy.stats.bootstrap resamples each model's samples independently (paired=False), as we do;
    # the two percentile intervals differ only by Monte-Carlo error. Eight models whose sample
    # ratios overlap, so that the bootstrap distributions (Spearman's too) are spread out.
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    data = [np.clip(rng.normal(0.3 + 0.05 * m, 0.15, size=12), 0, 1) for m in range(8)]
    accuracy = 0.6 + 0.03 * np.arange(8) + rng.normal(0, 0.02, size=8)
    c = accuracy_correlation(data, accuracy, n_boot=4000, level=0.9, seed=1)
    for name, corr in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
        def statistic(*samples, corr=corr):
            return corr([s.mean() for s in samples], accuracy)[0]
        ref = stats.bootstrap(data, statistic, n_resamples=4000, paired=False, vectorized=False,
                              confidence_level=0.9, method="percentile",
                              rng=np.random.default_rng(2))
        lo, hi = getattr(c, f"{name}_ci")
        assert lo <= getattr(c, name) <= hi
        assert lo == pytest.approx(ref.confidence_interval.low, abs=0.02)
        assert hi == pytest.approx(ref.confidence_interval.high, abs=0.02)


def test_accuracy_correlation_is_reproducible_and_report_per_sample_feeds_it():
    a = accuracy_correlation(RATIOS, ACCURACY, n_boot=300, seed=3)
    b = accuracy_correlation(RATIOS, ACCURACY, n_boot=300, seed=3)
    assert a.pearson_ci == b.pearson_ci and a.spearman_ci == b.spearman_ci
    report = knowledge_report([PRE, PRE], [FT, PRE])
    np.testing.assert_allclose(report.per_sample("preserve"), [2 / 3, 1.0])
    with pytest.raises(PretrainReuseError, match="ratio"):
        report.per_sample("preserved")
    np.testing.assert_allclose(report.per_sample("preserve", 1), [1.0, 1.0])
    for order in (0, 4, 1.5):  # NaN for every sample, as if no sample had knowledge of it
        with pytest.raises(PretrainReuseError, match=f"order={order!r} must be an interaction "
                                                     r"order in 1\.\.3 \(the number of players\)"):
            report.per_sample("preserve", order)


@pytest.mark.parametrize("ratios,accuracy,needle", [
    (RATIOS[:2], ACCURACY[:2], "at least 3"),
    (RATIOS, ACCURACY[:4], "one accuracy per model"),
    ([[np.nan], *RATIOS[1:]], ACCURACY, "model 0 has no sample"),
    (RATIOS, [np.nan, *ACCURACY[1:]], "NaN"),
    ([["a"], *RATIOS[1:]], ACCURACY, r"ratios\[0\] must be a flat sequence of numbers"),
    ([[[0.1], [0.2]], *RATIOS[1:]], ACCURACY, r"ratios\[0\] must be a flat sequence of numbers"),
    (RATIOS, ["high", *ACCURACY[1:]], "accuracy must be a flat sequence of numbers"),
])
def test_accuracy_correlation_refuses_bad_inputs(ratios, accuracy, needle):
    with pytest.raises(PretrainReuseError, match=needle):
        accuracy_correlation(ratios, accuracy)


def test_accuracy_correlation_save_and_load_round_trip(tmp_path):
    a = accuracy_correlation(RATIOS, ACCURACY, n_boot=200)
    back = AccuracyCorrelation.load(a.save(tmp_path / "correlation.json"))
    _check_meta(tmp_path / "correlation.json", "AccuracyCorrelation",
                {"n_boot": 200, "level": a.level}, seed=a.seed)
    assert back.to_dict() == a.to_dict()
    np.testing.assert_array_equal(back.ratio, a.ratio)
    np.testing.assert_array_equal(back.n_samples, a.n_samples)
    assert back.pearson_ci == a.pearson_ci and back.pearson == a.pearson
    with pytest.raises(PretrainReuseError, match="exists and is not a knowledge-convergence file"):
        knowledge_convergence(CHECKPOINTS).save(tmp_path / "correlation.json")


def test_accuracy_correlation_plots_each_model_and_states_the_correlations():
    import matplotlib.pyplot as plt

    a = accuracy_correlation(RATIOS, ACCURACY, n_boot=200)
    _, ax = plt.subplots()
    assert a.plot(ax, ratio="r_preserve") is ax
    np.testing.assert_array_equal(ax.collections[0].get_offsets(), np.c_[a.ratio, a.accuracy])
    assert ax.get_xlabel() == "r_preserve (mean over samples)"
    assert ax.get_title().startswith(f"Pearson {a.pearson:+.2f} [{a.pearson_ci[0]:+.2f}, "
                                     f"{a.pearson_ci[1]:+.2f}], Spearman {a.spearman:+.2f}")
    plt.close("all")


def test_accuracy_correlation_refuses_a_seed_default_rng_rejects():
    with pytest.raises(PretrainReuseError, match="seed must be an integer"):
        accuracy_correlation(RATIOS, ACCURACY, seed=-1)


# --------------------------------------------------------------------------------------------
# Docstrings
# --------------------------------------------------------------------------------------------


def _documented(module):
    """The module and every function, class, method and property it defines."""
    yield module.__name__, module
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        yield f"{module.__name__}.{name}", obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if inspect.isfunction(member) or isinstance(member, (property, classmethod, staticmethod)):
                    yield f"{module.__name__}.{name}.{attr}", member


def test_no_docstring_of_the_package_holds_control_characters():
    # LaTeX such as \beta or \frac in a docstring that is not raw becomes \b, \f: help() shows garbage
    bad = []
    for info in pkgutil.walk_packages(pretrain_reuse.__path__, "pretrain_reuse."):
        if info.name.endswith("__main__"):  # importing it runs the CLI
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional extra that is not installed
            continue
        for where, obj in _documented(module):
            doc = getattr(obj, "__doc__", None) or ""
            if any(ord(c) < 0x20 and c not in "\n\t" for c in doc):
                bad.append(where)
    assert not bad, f"docstrings with control characters (make them raw strings): {bad}"


def test_the_knowledge_results_print_as_one_line_summaries():
    # their dataclass reprs printed every order's statistics and every array: 8-10k characters
    report = knowledge_report([PRE, PRE], [FT, PRE], [SCRATCH, SCRATCH])
    curve = knowledge_convergence([[PRE], [FT], [FT]], steps=[10, 20, 40])
    sets = set_discrimination(report, [0, 0])
    corr = accuracy_correlation(RATIOS, ACCURACY, n_boot=100, seed=0)
    summaries = {repr(report): f"means over samples: preserve={report.overall['preserve'].mean:.3g}",
                 repr(curve): f"first_at_threshold={curve.first_at_threshold} (s >= 0.9)",
                 repr(sets): f"preserve={sets.purity('preserve'):.3g}",
                 repr(discrimination_power([PRE, FT])): "Discrimination(n_samples=2, salient items=",
                 repr(corr): f"pearson={corr.pearson:.3g} [{corr.pearson_ci[0]:.3g}, "}
    for text, needle in summaries.items():
        assert "\n" not in text and len(text) < 400 and needle in text, text


def test_decompositions_of_different_kinds_are_not_compared():
    # an AND model against an AND-OR model: its OR interactions never match, inflating the
    # discarded and new knowledge without a word
    and_only = Interactions(n=3, and_values=FT.and_values, or_values=np.zeros(8), v=np.zeros(8),
                            noise=np.zeros(8), kind="and")
    with pytest.raises(PretrainReuseError, match="different kinds \\('and-or' and 'and'\\)"):
        knowledge_report([PRE], [and_only])


def _brute_force_chance(k: SampleKnowledge, role: str) -> dict[str, float]:
    """Each ratio averaged over every way of placing ``role``'s items at random: per stratum
    (type, order, sign), all subsets of that order's coalitions of the role's size there, each
    with one sign-matched copy of the items. Exact enumeration, independent of chance_terms."""
    n = k.n
    omega = getattr(k, role)
    strata = {}
    for item, effect in omega.items():
        strata.setdefault((item[0], bin(item[1]).count("1"), *item[2:]), []).append(effect)
    choices = []
    for (kind, order, *sign), effects in strata.items():
        masks = [m for m in range(1, 2 ** n) if bin(m).count("1") == order]
        choices.append([{(kind, m, *sign): e for m, e in zip(pick, effects, strict=True)}
                        for pick in itertools.combinations(masks, len(effects))])
    totals, count = {}, 0
    for parts in itertools.product(*choices):
        drawn = {key: value for part in parts for key, value in part.items()}
        terms = replace(k, **{role: drawn}).terms()
        for name, (num, _) in terms.items():
            totals[name] = totals.get(name, 0.0) + num
        count += 1
    return {name: total / count for name, total in totals.items()}


@pytest.mark.parametrize("match", ["support", "signed"])
def test_chance_levels_equal_the_exact_mean_over_random_salient_sets(match):
    # n = 4 players: every placement of the other model's items can be enumerated
    rng = np.random.default_rng(3)

    def omega(size):
        items = {}
        while len(items) < size:
            mask = int(rng.integers(1, 16))
            kind = "and" if rng.random() < 0.7 else "or"
            value = float(rng.normal())
            items[(kind, mask, 1 if value > 0 else -1) if match == "signed" else (kind, mask)] = value
        # one item per coalition and type: signed keys of both signs would be two items
        return {key: v for key, v in items.items()}

    k = SampleKnowledge(omega(7), omega(6), omega(5), 4, match)
    observed = k.terms()
    chance = k.chance_terms()
    # the ratios of preserve/discard/inherit/new compare against the other model's set
    reference_ft = _brute_force_chance(k, "finetuned")
    for name in ("preserve", "discard", "preserve_strength", "discard_strength", "scratch_only"):
        assert chance[name][0] == pytest.approx(reference_ft[name], rel=1e-12), name
        assert chance[name][1] == observed[name][1]
    reference_pre = _brute_force_chance(k, "pretrained")
    for name in ("new", "inherit", "new_strength", "inherit_strength"):
        assert chance[name][0] == pytest.approx(reference_pre[name], rel=1e-12), name
    reference_sc = _brute_force_chance(k, "scratch")
    for name in ("exclusive", "learnability", "new_in_scratch"):
        assert chance[name][0] == pytest.approx(reference_sc[name], rel=1e-12), name


def test_a_report_carries_the_chance_levels_of_its_samples(tmp_path):
    games = [planted_game(5, {(0, 1): 1.0, (2,): 0.5}, noise=0.3, seed=s) for s in range(4)]
    pre = and_interactions(np.stack(games))
    ft = and_interactions(np.stack([g + 0.2 * planted_game(5, {(3, 4): 1.0}, seed=9 + s)
                                    for s, g in enumerate(games)]))
    report = knowledge_report(pre, ft)
    expected = np.mean([s.chance_terms()["preserve"][0] / s.chance_terms()["preserve"][1]
                        for s in report.samples])
    assert report.chance["preserve"].mean == pytest.approx(expected)
    assert report.to_dict()["chance"]["preserve"]["mean"] == pytest.approx(expected)
    back = KnowledgeReport.load(report.save(tmp_path / "r.json"))
    assert back.chance == report.chance


def _least_shared(labels) -> int:
    """Brute force: the fewest pairs of one class over every derangement of the samples."""
    n = len(labels)
    return min(sum(labels[i] == labels[p[i]] for i in range(n))
               for p in itertools.permutations(range(n)) if all(p[i] != i for i in range(n)))


@pytest.mark.parametrize("labels", [[0, 1], [0, 0], [0, 0, 0], [3, 1, 2, 1, 3], [0, 0, 0, 1, 2],
                                    [0, 0, 0, 0, 1, 2], [5, 5, 5, 5, 5, 9, 1], [0, 1, 2, 3, 4, 5]])
def test_other_sample_partners_pair_each_sample_with_another_of_another_class_where_it_can(labels):
    partners = other_sample_partners(labels)
    assert sorted(partners) == list(range(len(labels)))  # each sample stands in once
    assert all(partners[i] != i for i in range(len(labels)))
    shared = sum(labels[i] == labels[j] for i, j in enumerate(partners))
    assert shared == _least_shared(labels)


def test_other_sample_partners_need_two_samples():
    with pytest.raises(PretrainReuseError, match="got 1 sample"):
        other_sample_partners([4])


def _sample_games(count: int, seed: int) -> list[Interactions]:
    """Interactions of ``count`` samples whose salient sets differ between samples."""
    rng = np.random.default_rng(seed)
    xs = []
    for s in range(count):
        values = rng.uniform(0.1, 1.0, (2, 16)) * rng.choice([0, 1], (2, 16))
        values[:, 0] = 0.0  # the bias
        xs.append(_on(Interactions(n=4, and_values=values[0], or_values=values[1], v=np.zeros(16),
                                   noise=np.zeros(16), kind="and-or"), sample=f"{s}.png"))
    return xs


def test_other_image_control_compares_each_sample_with_its_partners_knowledge():
    pre, ft, sc = _sample_games(5, 1), _sample_games(5, 2), _sample_games(5, 3)
    partners = other_sample_partners([0, 1, 0, 2, 1])
    control = other_image_control(pre, [ft[j] for j in partners],
                                  scratch_other=(pre, ft, [sc[j] for j in partners]))
    # by hand, from the knowledge sets: preserve and new against the partner's fine-tuned model,
    # exclusive (the preserved items of a sample that the partner's scratch model lacks)
    omega = [[set(knowledge_set(x)) for x in xs] for xs in (pre, ft, sc)]
    o_pre, o_ft, o_sc = omega
    preserve = [len(o_pre[i] & o_ft[j]) / len(o_pre[i]) for i, j in enumerate(partners)]
    new = [len(o_ft[j] - o_pre[i]) / len(o_ft[j]) for i, j in enumerate(partners)]
    exclusive = [len((o_pre[i] & o_ft[i]) - o_sc[j]) / len(o_pre[i] & o_ft[i])
                 for i, j in enumerate(partners) if o_pre[i] & o_ft[i]]
    assert control["preserve"].mean == pytest.approx(np.mean(preserve))
    assert control["new"].mean == pytest.approx(np.mean(new))
    assert control["exclusive"].mean == pytest.approx(np.mean(exclusive))
    assert control["exclusive"].n_used == len(exclusive)
    # the same model on every image: the control is below 1 where the images' sets differ
    same = other_image_control(pre, [pre[j] for j in partners])
    assert same["preserve"].mean < 1.0 and "exclusive" not in same


def test_other_image_pairs_must_be_of_other_samples_and_same_pairs_of_the_same():
    pre, ft = _sample_games(2, 1), _sample_games(2, 2)
    with pytest.raises(PretrainReuseError, match=r"same sample \('0.png'\) where the other-image"):
        other_image_control(pre, ft)
    with pytest.raises(PretrainReuseError, match="a different sample"):
        knowledge_report(pre, ft[::-1])
    with pytest.raises(PretrainReuseError, match=r"different baseline \('zero' and 'blur'\)"):
        other_image_control(pre, [_on(x, sample="x.png", baseline="blur") for x in ft])
    with pytest.raises(PretrainReuseError, match="other_samples"):
        knowledge_report(pre, ft[::-1], other_samples=("scratch",))
