"""Masked image games and the learned baseline, against hand-built inputs and closed forms."""

import numpy as np
import pytest
import torch
from torch import nn

from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.knowledge import harsanyi_and
from pretrain_reuse.knowledge.games import (
    baseline_input,
    class_output,
    grid_players,
    learn_baseline,
    mask_players,
    masked_game,
)

# a 1x2x2 image, players = its two columns
X = torch.ones(1, 2, 2)
COLUMNS = mask_players(np.array([[[1, 0], [1, 0]], [[0, 1], [0, 1]]], bool))


def _linear(w: list[float]) -> nn.Module:
    """Logits [w . x, 0]: the log-odds of class 0 is w . x, a game with closed-form interactions."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(len(w), 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([w, [0.0] * len(w)]))
    return net.eval()


def test_masked_game_evaluates_the_model_on_every_hand_built_masked_input():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Tanh(), nn.Linear(3, 3)).eval()
    x, b = torch.randn(3, 2, 2), torch.randn(3, 2, 2)
    v = masked_game(net, x, 1, COLUMNS, b, batch_size=3)
    for s in range(4):
        xs = b.clone()
        for col in range(2):
            if s >> col & 1:
                xs[:, :, col] = x[:, :, col]
        with torch.no_grad():
            z = net(xs[None]).double()[0]
        # float32 logits: a batch of 3 and a batch of 1 may round differently
        assert v[s] == pytest.approx(float(z[1] - torch.logsumexp(z[[0, 2]], 0)), abs=1e-6)


def test_players_of_another_size_than_the_input_are_refused():
    with pytest.raises(PretrainReuseError, match="players are 2x2 but the input is 3x3"):
        masked_game(_linear([1.0] * 9), torch.ones(1, 3, 3), 0, COLUMNS, torch.zeros(1, 3, 3))


def test_an_input_or_baseline_of_the_wrong_kind_or_shape_is_one_line():
    # a NumPy input was .to()'s TypeError, a baseline of another shape a broadcasting error
    net, x = _linear([1.0] * 4), torch.ones(1, 2, 2)
    for args, message in (((x.numpy(), torch.zeros(1, 2, 2)), "x must be a torch tensor"),
                          ((x, np.zeros((1, 2, 2))), "baseline must be a torch tensor"),
                          ((x[None], torch.zeros(1, 1, 2, 2)), r"x must be one input \(C, H, W\)"),
                          ((x, torch.zeros(3, 2, 2)), r"baseline is \(3, 2, 2\) but the input is "
                                                      r"\(1, 2, 2\)")):
        with pytest.raises(PretrainReuseError, match=message):
            masked_game(net, args[0], 0, COLUMNS, args[1])
    with pytest.raises(PretrainReuseError, match=r"init is \(1, 3, 3\) but the input"):
        learn_baseline(net, x, 0, COLUMNS, torch.zeros(1, 3, 3), torch.zeros(1, 3, 3),
                       torch.ones(1, 3, 3))


def test_class_output_refuses_logits_without_the_class():
    with pytest.raises(PretrainReuseError, match="class 3"):
        class_output(torch.zeros(2, 3), 3)


@pytest.mark.parametrize("sigma", [None, 1.5])
def test_blur_baseline_equals_scipys_gaussian_filter_with_edge_replication(sigma):
    from scipy.ndimage import gaussian_filter

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 20, 28)))
    got = baseline_input(x, "blur", sigma=sigma).numpy()
    s = sigma or 28 / 8  # default: 1/8 of the longer side
    # the same kernel: std s, cut at int(3 s) pixels, edges repeated ("nearest")
    expected = np.stack([gaussian_filter(c, s, mode="nearest", radius=int(3 * s)) for c in x.numpy()])
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_shrink_baseline_moves_every_value_toward_zero_by_at_most_tau():
    x = torch.tensor([[[-3.5, -2.0, -0.5], [0.0, 1.9, 2.5]]], dtype=torch.float64)
    expected = [[[-1.5, 0.0, 0.0], [0.0, 0.0, 0.5]]]  # sign(x) max(|x| - 2, 0)
    np.testing.assert_array_equal(baseline_input(x, "shrink").numpy(), expected)
    np.testing.assert_array_equal(baseline_input(x, "shrink", tau=0.5).numpy(),
                                  [[[-3.0, -1.5, 0.0], [0.0, 1.4, 2.0]]])
    with pytest.raises(PretrainReuseError, match="tau=-1 must be a number >= 0"):
        baseline_input(x, "shrink", tau=-1)


def test_class_outputs_equal_their_closed_forms_including_a_saturated_probability():
    z = torch.tensor([[2.0, -1.0, 0.5], [30.0, 0.0, 0.0], [-30.0, 0.0, 0.0]])
    e = np.exp
    torch.testing.assert_close(class_output(z, 0, "logit"),
                               torch.tensor([2.0, 30.0, -30.0], dtype=torch.float64))
    log_odds = [2.0 - np.log(e(-1.0) + e(0.5)), 30.0 - np.log(2.0), -30.0 - np.log(2.0)]
    torch.testing.assert_close(class_output(z, 0, "log-odds"),
                               torch.tensor(log_odds, dtype=torch.float64))
    # log(p / (1 - p + 1e-7) + 1e-7): the log-odds while 1 - p and p are far above 1e-7, then
    # ±log(1e7) = ±16.118 at p ≈ 1 (1 - p = 2e^-30) and p ≈ 0
    p1 = 1.0 / (1.0 + 2.0 * e(-30.0))
    clipped = class_output(z, 0, "log-odds-clipped").numpy()
    assert clipped[0] == pytest.approx(log_odds[0], abs=1e-5)
    assert clipped[1] == pytest.approx(np.log(p1 / (2.0 * e(-30.0) + 1e-7) + 1e-7), abs=1e-6)
    assert clipped[1] == pytest.approx(np.log(1e7), abs=1e-5)
    assert clipped[2] == pytest.approx(-np.log(1e7), abs=1e-5)


def test_learned_baseline_reaches_the_closed_form_minimum_of_a_linear_game():
    # v_b(S) = sum_{i in S} w_i.x_i + sum_{i not in S} w_i.b_i: I(∅) = w.b, I({i}) = w_i.(x_i - b_i),
    # so Σ|I| >= |w.x| = 4 (triangle inequality), reached when all terms share the sign of w.x.
    # From b = -1: Σ|I| = 4 + 2 * 4 = 12.
    net = _linear([1.0, 1.0, 1.0, 1.0])
    init = torch.full_like(X, -1.0)
    res = learn_baseline(net, X, 0, COLUMNS, init, init - 1, init + 3, lr=0.05, steps=60)
    assert res.loss[0] == pytest.approx(12.0)
    assert res.loss[res.best_step] == pytest.approx(4.0, abs=1e-6)
    assert res.loss.min() == res.loss[res.best_step] < res.loss[0]
    assert np.abs(harsanyi_and(res.game)).sum() == pytest.approx(res.loss[res.best_step])
    assert net[1].weight.grad is None  # only the baseline was differentiated


def _columns_of_three(background: str):
    """Players: the first two columns of a 1x2x3 image; the third is of no player."""
    masks = np.zeros((2, 2, 3), bool)
    masks[0, :, 0] = masks[1, :, 1] = True
    return mask_players(masks, background=background)


def test_the_integrated_background_of_a_linear_game_is_its_mean_blend():
    # for a linear log-odds, the mean over the blends a = 0.1 ... 1.0 of the pixels of no player
    # is the blend at the mean a = 0.55: v(S) = w.(m_S x + (1 - m_S) b) with m = 0.55 there
    torch.manual_seed(0)
    x, b, w = torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.randn(6)
    v = masked_game(_linear(w.tolist()), x, 0, _columns_of_three("integrated"), b)
    for s in range(4):
        m = torch.tensor([[s & 1, s >> 1 & 1, 0.55]] * 2).view(1, 2, 3)
        assert v[s] == pytest.approx(float(w @ (m * x + (1 - m) * b).flatten()), abs=1e-6)


def test_a_baseline_learned_under_the_integrated_background_reaches_the_closed_form_minimum():
    # x = 1, b = -1 at the start, the third column's b fixed at -1 (its box is a point), so it
    # shows 0.55 - 0.45 = 0.1 per pixel: I(∅) = Σ_players b + 0.2, I({i}) = Σ_col i (1 - b), the
    # rest 0; Σ|I| starts at 3.8 + 4 + 4 = 11.8 and its minimum is |v(N)| = 4 + 0.2 (with the
    # baseline background the third column would show -1: 14 and 2)
    net = _linear([1.0] * 6)
    x, init = torch.ones(1, 2, 3), torch.full((1, 2, 3), -1.0)
    lower, upper = init - 1, init + 3
    lower[..., 2] = upper[..., 2] = -1.0
    res = learn_baseline(net, x, 0, _columns_of_three("integrated"), init, lower, upper, lr=0.05,
                         steps=80)
    assert res.loss[0] == pytest.approx(11.8)
    assert res.loss[res.best_step] == pytest.approx(4.2, abs=1e-6)
    torch.testing.assert_close(res.baseline[..., 2], torch.full((1, 2), -1.0))


def test_learned_baseline_stays_in_its_box_and_stops_at_the_binding_bound():
    # the box [-1.2, -0.5] excludes the unconstrained optimum: the best b is the upper bound
    # -0.5 everywhere, where Σ|I| = |w.b| + 2 * 2 * 1.5 = 2 + 6 = 8
    net = _linear([1.0, 1.0, 1.0, 1.0])
    init = torch.full_like(X, -1.0)
    lower, upper = torch.full_like(X, -1.2), torch.full_like(X, -0.5)
    res = learn_baseline(net, X, 0, COLUMNS, init, lower, upper, lr=0.05, steps=40)
    assert bool(((res.baseline >= lower) & (res.baseline <= upper)).all())
    torch.testing.assert_close(res.baseline, upper)
    assert res.loss[res.best_step] == pytest.approx(8.0, abs=1e-6)


def test_learned_baseline_of_a_cnn_is_never_worse_than_its_start_and_reproducible():
    from pretrain_reuse.models import SmallCNN

    torch.manual_seed(0)
    net = SmallCNN(width=4, num_classes=3).eval()
    x = torch.randn(3, 16, 16)
    players = grid_players((16, 16), (2, 2))
    init = baseline_input(x, "zero")
    runs = [learn_baseline(net, x, 2, players, init, init - 0.5, init + 0.5, steps=3)
            for _ in range(2)]
    a, b = runs
    torch.testing.assert_close(a.baseline, b.baseline, rtol=0, atol=0)
    np.testing.assert_array_equal(a.loss, b.loss)
    assert a.loss[a.best_step] <= a.loss[0]
    # the game returned is the game of the returned baseline
    np.testing.assert_allclose(masked_game(net, x, 2, players, a.baseline), a.game, atol=1e-12)
    assert bool(((a.baseline >= init - 0.5) & (a.baseline <= init + 0.5)).all())


@pytest.mark.parametrize("kw,needle", [
    ({"steps": -1}, "steps"),
    ({"lr": 0.0}, "lr"),
    ({"lower": torch.zeros(1, 2, 2)}, "inside"),
    ({"upper": torch.zeros(1, 1, 2)}, "same shape"),
])
def test_learned_baseline_refuses_bad_settings(kw, needle):
    init = torch.full_like(X, -1.0)
    args = {"init": init, "lower": init - 1, "upper": init + 1} | kw
    with pytest.raises(PretrainReuseError, match=needle):
        learn_baseline(_linear([1.0] * 4), X, 0, COLUMNS, args.pop("init"), args.pop("lower"),
                       args.pop("upper"), **args)


def test_explain_gives_the_model_back_in_the_train_or_eval_mode_it_came_in():
    # explain left a model in the middle of training (or with frozen parts) in eval mode
    from pretrain_reuse.data import open_dataset
    from pretrain_reuse.knowledge.explain import ExplainConfig, explain
    from pretrain_reuse.models import create_backbone

    net = create_backbone("smallcnn-s", num_classes=10).train()
    next(iter(net.body.children())).eval()  # a frozen first block
    modes = [m.training for m in net.modules()]
    data = open_dataset("synthetic:target", split="test")
    cfg = ExplainConfig(players="grid:2x2", samples=2)
    assert len(explain(net, data, np.arange(2), cfg, progress=False)) == 2
    assert [m.training for m in net.modules()] == modes
    with torch.no_grad():
        net.head.weight.fill_(float("nan"))
    with pytest.raises(PretrainReuseError, match="NaN or infinite"):
        explain(net, data, np.arange(2), cfg, progress=False)
    assert [m.training for m in net.modules()] == modes


def test_the_public_game_functions_compute_without_tf32():
    # only explain's own path switched TF32 off: masked_game called directly ran cuDNN's
    # convolutions in TF32 on Ampere GPUs (1e-3 errors, summed into spurious interactions)
    seen = []

    def model(x):
        seen.append((torch.backends.cudnn.conv.fp32_precision,
                     torch.backends.cuda.matmul.fp32_precision))
        return torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1)

    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    x = torch.rand(3, 8, 8)
    players = grid_players((8, 8), (2, 2))
    try:
        conv.fp32_precision = matmul.fp32_precision = "tf32"
        masked_game(model, x, 0, players, baseline_input(x, "zero"), batch_size=16)
        zero = torch.zeros_like(x)
        learn_baseline(model, x, 0, players, zero, zero - 1, zero + 1, steps=1)
        assert set(seen) == {("ieee", "ieee")}
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        conv.fp32_precision, matmul.fp32_precision = before
