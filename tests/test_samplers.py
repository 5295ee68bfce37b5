"""The low-data and long-tail samplers refuse a fraction or ratio the data cannot realise (it
would run under a label it does not have) and record the one they realise."""

import math

import numpy as np
import pytest

from pretrain_reuse.data.samplers import subsample_fraction, subsample_long_tail
from pretrain_reuse.errors import PretrainReuseError


def _labels(counts):
    return np.random.default_rng(0).permutation(np.repeat(np.arange(len(counts)), counts))


def test_a_fraction_below_one_image_of_the_largest_class_is_refused_naming_the_smallest():
    labels = _labels([40, 40, 40, 40])
    with pytest.raises(PretrainReuseError, match=r"fraction 0\.01 keeps less than one image of "
                       r"every class \(the largest has 40\); the smallest fraction this data "
                       r"allows is 0\.025$"):
        subsample_fraction(labels, 0.01, seed=0)
    sub = subsample_fraction(labels, 0.025, seed=0)  # the bound itself: one image per class
    assert np.bincount(labels[sub.indices]).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("counts", [[3, 3, 3], [49, 49, 2], [7, 30]])
def test_the_smallest_fraction_named_is_accepted_and_the_realised_share_recorded(counts):
    labels = _labels(counts)
    with pytest.raises(PretrainReuseError) as err:
        subsample_fraction(labels, 0.5 / max(counts), seed=0)
    bound = float(str(err.value).rsplit(" ", 1)[1])
    sub = subsample_fraction(labels, bound, seed=0)
    kept = [max(1, math.floor(bound * n + 1e-9)) for n in counts]
    assert np.bincount(labels[sub.indices]).tolist() == kept and max(kept) >= 1
    assert sub.params["realised"] == pytest.approx(sum(kept) / sum(counts))


def test_a_ratio_above_the_largest_class_is_refused_and_the_realised_ratio_recorded():
    labels = _labels([40] * 16)
    with pytest.raises(PretrainReuseError, match=r"long-tail ratio 1000 asks for less than one "
                       r"image in the smallest class \(the largest has 40\); the largest ratio "
                       r"this data allows is 40$"):
        subsample_long_tail(labels, 1000, seed=0)
    kept = np.bincount(labels[subsample_long_tail(labels, 40, seed=0).indices])
    assert kept.max() == 40 and kept.min() == 1
    # 40 / 3 floors to 13 at the last rank: the ratio realised is 40 / 13, not 3
    sub = subsample_long_tail(labels, 3, seed=0)
    per_class = [math.floor(40 * 3 ** (-c / 15) + 1e-9) for c in range(16)]
    assert sub.params["per_class"] == per_class
    assert sub.params["realised"] == pytest.approx(40 / 13)


def test_the_finetune_config_offers_the_samplers_long_tail_orders():
    from pretrain_reuse.data.samplers import ORDERS
    from pretrain_reuse.finetune.config import CHOICES

    assert CHOICES["long_tail_order"] == ORDERS
