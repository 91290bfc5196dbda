"""Evaluation figures and the KTO / DPO losses against arithmetic done by hand.

Notation: s(x) = sigmoid(x); l(x) = -log s(x) = log(1 + e^-x).
    l(3) = 0.048587, l(2) = 0.126928, l(1.5) = 0.201413, l(1) = 0.313262, l(0.5) = 0.474077,
    l(-0.5) = 0.974077, l(-1) = 1.313262.
"""

import math

import pytest
import torch

from qbco.reward import metrics
from qbco.reward.loss import bco_loss, dpo_loss, kto_loss

T, Fa = True, False


# ---------------------------------------------------------------- calibration


def test_ece_by_hand_count():
    """p = [0.05, 0.15, 0.18, 0.42, 0.48, 0.71, 0.93, 0.97], y = [0, 0, 1, 0, 1, 1, 1, 1], 10 bins of width 0.1:
    bin 0: {0.05}        mean p 0.05,  observed 0    gap 0.05,  weight 1/8
    bin 1: {0.15, 0.18}  mean p 0.165, observed 0.5  gap 0.335, weight 2/8
    bin 4: {0.42, 0.48}  mean p 0.45,  observed 0.5  gap 0.05,  weight 2/8
    bin 7: {0.71}        mean p 0.71,  observed 1    gap 0.29,  weight 1/8
    bin 9: {0.93, 0.97}  mean p 0.95,  observed 1    gap 0.05,  weight 2/8
    ECE = (0.05 + 2 * 0.335 + 2 * 0.05 + 0.29 + 2 * 0.05) / 8 = 1.21 / 8 = 0.15125"""
    p = [0.05, 0.15, 0.18, 0.42, 0.48, 0.71, 0.93, 0.97]
    y = [0, 0, 1, 0, 1, 1, 1, 1]
    assert metrics.ece(p, y) == pytest.approx(0.15125, abs=1e-12)
    bins = metrics.reliability_bins(p, y)
    assert [b["rows"] for b in bins] == [1, 2, 0, 0, 2, 0, 0, 1, 0, 2]
    assert bins[1]["mean_p_up"] == pytest.approx(0.165) and bins[1]["observed_up"] == 0.5
    assert bins[2]["mean_p_up"] is None and bins[2]["observed_up"] is None


def test_bin_edges_are_closed_on_the_left_and_one_is_in_the_last_bin():
    """0.0 -> bin 0, 0.1 -> bin 1 (not 0), 0.5 -> bin 5, 1.0 -> bin 9."""
    bins = metrics.reliability_bins([0.0, 0.1, 0.5, 1.0], [0, 0, 1, 1])
    assert [k for k, b in enumerate(bins) for _ in range(b["rows"])] == [0, 1, 5, 9]


def test_perfectly_calibrated_bins_have_zero_ece():
    """Bin 2 holds p = 0.25 four times with one thumbs-up: observed 0.25 = predicted."""
    assert metrics.ece([0.25] * 4 + [0.75] * 4, [1, 0, 0, 0, 1, 1, 1, 0]) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- binary feedback (scikit-learn backed)

REWARDS = torch.tensor([2.0, 1.0, 0.5, -0.5, -1.0, -2.0])
LABELS = torch.tensor([T, T, Fa, T, Fa, Fa])
DELTA = 0.25


def test_binary_figures_by_hand():
    """r - delta = [1.75, 0.75, 0.25, -0.75, -1.25, -2.25], labels [1, 1, 0, 1, 0, 0].
    p = s(r - delta) = [0.851953, 0.679179, 0.562177, 0.320821, 0.222700, 0.095349].
    At p > 0.5 (r - delta > 0): called up [1, 1, 1, 0, 0, 0]: TP 2, FP 1, FN 1, TN 2
        accuracy 4/6, precision 2/3, recall 2/3, F1 2/3.
    ROC-AUC: of the 9 (up, down) pairs the up row scores higher in 8 (only -0.75 < 0.25): 8/9.
    PR-AUC (average precision): ranked labels 1, 1, 0, 1, 0, 0: recall steps of 1/3 at precision 1, 1, 3/4:
        (1 + 1 + 0.75) / 3 = 11/12.
    F1 by number k of top rows called up: k=1 0.5, k=2 0.8, k=3 2/3, k=4 2*(3/4)*1/(7/4) = 6/7, k=5 0.75, k=6 2/3
        -> best at k = 4, threshold p = s(-0.75) = 0.320821 (margin -0.75): accuracy 5/6, precision 3/4, recall 1.
    Brier: (p - y)^2 = 0.021918, 0.102926, 0.316042, 0.461284, 0.049595, 0.009092; mean 0.160143.
    log-loss: l(1.75), l(0.75), l(-0.25), l(-0.75), l(1.25), l(2.25)
        = 0.160224 + 0.386871 + 0.825939 + 1.136871 + 0.251929 + 0.100207 = 2.862041; / 6 = 0.477007.
    BCO loss (per-class means): up (0.160224 + 0.386871 + 1.136871) / 3 + down (0.825939 + 0.251929 + 0.100207) / 3
        = 0.561322 + 0.392692 = 0.954014."""
    b = metrics.binary_figures(REWARDS, LABELS, DELTA)
    assert (b["rows"], b["thumbs_up"], b["thumbs_up_share"]) == (6, 3, 0.5)
    half = b["at_0.5"]
    assert half["accuracy"] == pytest.approx(4 / 6)
    assert (half["precision"], half["recall"], half["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert b["roc_auc"] == pytest.approx(8 / 9)
    assert b["pr_auc"] == pytest.approx(11 / 12)
    best = b["at_best_f1"]
    assert best["threshold"] == pytest.approx(0.320821, abs=1e-6)
    assert best["reward_margin"] == pytest.approx(-0.75, abs=1e-6)
    assert (best["accuracy"], best["precision"], best["recall"], best["f1"]) == pytest.approx((5 / 6, 3 / 4, 1.0, 6 / 7))
    assert b["brier"] == pytest.approx(0.160143, abs=1e-6)
    assert b["log_loss"] == pytest.approx(0.477007, abs=1e-6)
    assert b["bco_loss"] == pytest.approx(0.954014, abs=1e-6)
    assert sum(bin_["rows"] for bin_ in b["reliability"]) == 6


def test_accuracy_at_half_is_the_sign_of_r_minus_delta():
    """A margin of 1e-9 in float32 is p = 0.5 after rounding, yet r - delta > 0 calls it thumbs-up, as training does."""
    r = torch.tensor([0.25 + 1e-7, 0.25 - 1e-7])
    b = metrics.binary_figures(r, torch.tensor([T, Fa]), 0.25)
    assert b["at_0.5"]["accuracy"] == 1.0


def test_one_class_rows_leave_the_undefined_figures_empty():
    """All thumbs-down: no ROC-AUC, PR-AUC or best threshold; the rest is defined (called down: accuracy 1)."""
    b = metrics.binary_figures(torch.tensor([-1.0, -2.0]), torch.tensor([Fa, Fa]), 0.0)
    assert b["roc_auc"] is None and b["pr_auc"] is None and b["at_best_f1"] is None
    assert b["at_0.5"]["accuracy"] == 1.0 and b["at_0.5"]["f1"] == 0.0
    assert math.isfinite(b["log_loss"]) and math.isfinite(b["ece"])


# ---------------------------------------------------------------- pairs


def test_prompt_pairs_are_every_up_down_combination_within_a_prompt():
    """prompt a: up 0, downs 1 and 2 -> (0,1), (0,2); prompt b: up 3, down 4 -> (3,4); prompt c: only ups -> none."""
    keys = ["a", "a", "a", "b", "b", "c", "c"]
    labels = [T, Fa, Fa, T, Fa, T, T]
    from qbco.data.feedback import prompt_pairs

    assert prompt_pairs(keys, labels) == [(0, 1), (0, 2), (3, 4)]


def test_pair_figures_by_hand():
    """r = [2, -1, -0.5, 0.5, 1], pairs (0,1), (0,2), (3,4): margins r_w - r_l = 3, 2.5, -0.5.
    reward accuracy 2/3; mean margin 5/3.
    DPO: (l(3) + l(2.5) + l(-0.5)) / 3 = (0.048587 + 0.078890 + 0.974077) / 3 = 0.367185.
    BCE: per pair l(r_w) + l(-r_l): l(2) + l(1) = 0.440190; l(2) + l(0.5) = 0.601005; l(0.5) + l(-1) = 1.787339;
        mean 0.942844 >= DPO (Theorem 1); gap 0.575660."""
    r = torch.tensor([2.0, -1.0, -0.5, 0.5, 1.0])
    p = metrics.pair_figures(r, [(0, 1), (0, 2), (3, 4)], delta=0.0)
    assert p["pairs"] == 3
    assert p["reward_accuracy"] == pytest.approx(2 / 3)
    assert p["mean_margin"] == pytest.approx(5 / 3)
    assert p["dpo_loss"] == pytest.approx(0.367185, abs=1e-6)
    assert p["bce_loss"] == pytest.approx(0.942844, abs=1e-6)
    assert p["bce_minus_dpo"] == pytest.approx(0.575660, abs=1e-6)
    assert p["bco_loss"] == pytest.approx(p["bce_loss"])  # delta 0
    assert metrics.pair_figures(r, [], 0.0) is None


def test_bce_upper_bounds_dpo_on_random_pairs():
    """Theorem 1 (arXiv 2404.04656): -log s(r_w) - log s(-r_l) >= -log s(r_w - r_l) for every pair, here as
    bco_loss (delta = 0) on the pair's two rows against dpo_loss on the pair, at several reward scales; and
    with any delta, since shifting both rewards leaves r_w - r_l alone."""
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 10.0, 100.0):
        for _ in range(50):
            r_w, r_l = (scale * torch.randn(2, generator=g, dtype=torch.float64)).unbind()
            zero = torch.zeros(1, dtype=torch.float64)
            dpo = dpo_loss(r_w.view(1), zero, r_l.view(1), zero, beta=1.0).loss
            rows = torch.stack([r_w, r_l])
            bce = bco_loss(rows, torch.zeros(2, dtype=torch.float64), torch.tensor([T, Fa]), 0.0, beta=1.0).loss
            assert float(bce) >= float(dpo) - 1e-12, (float(r_w), float(r_l))
    r = torch.randn(40, generator=g) * 3
    pairs = [(i, i + 20) for i in range(20)]
    for delta in (-2.0, 0.0, 1.5):
        fig = metrics.pair_figures(r, pairs, delta)
        assert fig["bce_minus_dpo"] >= 0 and fig["bco_minus_dpo"] >= 0


# ---------------------------------------------------------------- drift and slices


def test_drift_by_hand():
    """policy [-12, -4], reference [-9, -5] -> log-ratio [-3, +1] nats; completion tokens [4, 2].
    per sequence (-3 + 1) / 2 = -1 nat; per token (-3 + 1) / (4 + 2) = -1/3 nat; mean reward (beta 0.1) -0.1."""
    d = metrics.drift(torch.tensor([-12.0, -4.0]), torch.tensor([-9.0, -5.0]), torch.tensor([4, 2]), beta=0.1)
    assert d["log_ratio_per_sequence"] == pytest.approx(-1.0)
    assert d["log_ratio_per_token"] == pytest.approx(-1 / 3)
    assert d["mean_reward"] == pytest.approx(-0.1)
    assert d["completion_tokens"] == 6


def test_slices_and_their_pairs():
    """Slice values sort as text, a missing value is its own slice; a slice keeps the pairs whose two rows it holds,
    renumbered; all_figures of a slice equals binary_figures of its rows."""
    values = ["units", "math", "units", None, "math"]
    groups = metrics.slice_indices(values)
    assert groups == {"(missing)": [3], "math": [1, 4], "units": [0, 2]}
    assert metrics.subset([1, 4], [(1, 4), (0, 2), (1, 3)]) == [(0, 1)]
    pol, ref = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0]), torch.tensor([-2.0, -2.0, -2.0, -2.0, -2.0])
    labels = torch.tensor([T, T, Fa, Fa, Fa])
    tokens = torch.tensor([1, 2, 3, 4, 5])
    idx = torch.tensor(groups["math"])
    whole = metrics.all_figures(pol[idx], ref[idx], labels[idx], tokens[idx], [(0, 1)], beta=0.5, delta=0.1)
    assert whole["binary"] == metrics.binary_figures(0.5 * (pol[idx] - ref[idx]), labels[idx], 0.1)
    assert whole["pairs"]["pairs"] == 1 and whole["pairs"]["reward_accuracy"] == 1.0
    assert whole["drift"]["thumbs_up"]["log_ratio_per_sequence"] == pytest.approx(0.0)
    assert whole["drift"]["thumbs_down"]["log_ratio_per_token"] == pytest.approx(-3 / 5)


# ---------------------------------------------------------------- KTO and DPO


def test_dpo_by_hand():
    """beta 0.5; chosen policy [-1, -2], reference [-2, -2] -> r_w = [0.5, 0];
    rejected policy [-3, -1], reference [-2, -2] -> r_l = [-0.5, 0.5]; r_w - r_l = [1, -0.5].
    loss = (l(1) + l(-0.5)) / 2 = (0.313262 + 0.974077) / 2 = 0.643669."""
    out = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0]), beta=0.5)
    assert float(out.loss) == pytest.approx(0.643669, abs=1e-6)
    assert out.rewards.tolist() == pytest.approx([0.5, 0.0, -0.5, 0.5])


def test_kto_by_hand():
    """beta 0.5, lambda_D 1, lambda_U 2. policy [-2, -5, -3], reference [-3, -4, -3] -> log-ratio [1, -1, 0];
    labels up, down, up. Mismatched pairs: policy [-6, -7, -4], reference [-7, -7.5, -4.5] -> [1, 0.5, 0.5],
    z_0 = max(0, 2/3) = 0.666667.
    row 0 (up):   v = s(0.5 * (1 - 2/3)) = s(1/6) = 0.541570       loss 1 * (1 - v) = 0.458430
    row 1 (down): v = s(0.5 * (2/3 + 1)) = s(5/6) = 0.697059       loss 2 * (1 - v) = 0.605881
    row 2 (up):   v = s(0.5 * (0 - 2/3)) = s(-1/3) = 0.417430      loss 1 * (1 - v) = 0.582570
    mean (0.458430 + 0.605881 + 0.582570) / 3 = 0.548960"""
    out = kto_loss(
        torch.tensor([-2.0, -5.0, -3.0]), torch.tensor([-3.0, -4.0, -3.0]), torch.tensor([T, Fa, T]),
        torch.tensor([-6.0, -7.0, -4.0]), torch.tensor([-7.0, -7.5, -4.5]), beta=0.5, lambda_d=1.0, lambda_u=2.0,
    )
    assert float(out.kl) == pytest.approx(2 / 3, abs=1e-6)
    assert float(out.loss) == pytest.approx(0.548960, abs=1e-6)
    assert out.rewards.tolist() == pytest.approx([0.5, -0.5, 0.0])


def test_kto_reference_point_is_clamped_and_carries_no_gradient():
    """Mismatched log-ratios [-1, -3] (mean -2) give z_0 = max(0, -2) = 0; z_0 is detached, so the mismatched
    policy log-probs get no gradient. log-ratio [0], up, beta 1: loss 1 - s(0) = 0.5."""
    kl_policy = torch.tensor([-5.0, -6.0], requires_grad=True)
    policy = torch.tensor([-1.0], requires_grad=True)
    out = kto_loss(policy, torch.tensor([-1.0]), torch.tensor([T]), kl_policy, torch.tensor([-4.0, -3.0]), beta=1.0)
    assert float(out.kl) == 0.0 and out.loss.item() == pytest.approx(0.5)
    grad_policy, grad_kl = torch.autograd.grad(out.loss, [policy, kl_policy], allow_unused=True)
    assert grad_kl is None and float(grad_policy) == pytest.approx(-0.25)  # d(1 - s(x))/dx at 0 = -1/4


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _log1p_exp(x: float) -> float:  # log(1 + e^x), overflow-free
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def test_kto_and_dpo_match_an_independent_computation_on_a_shared_batch():
    """One random batch; the reference is written here with Python floats and loops from the papers' equations,
    no torch and no qbco code: KTO (arXiv 2402.01306) and DPO (arXiv 2305.18290)."""
    g = torch.Generator().manual_seed(3)
    n, beta, lam_d, lam_u = 16, 0.3, 1.0, 1.33
    policy = (-20 + 8 * torch.randn(n, generator=g, dtype=torch.float64))
    reference = policy - 3 * torch.randn(n, generator=g, dtype=torch.float64)
    labels = torch.rand(n, generator=g) < 0.4
    kl_policy = -25 + 5 * torch.randn(n, generator=g, dtype=torch.float64)
    kl_reference = kl_policy - 2 * torch.rand(n, generator=g, dtype=torch.float64)  # positive KL estimate

    pol, ref, lab = policy.tolist(), reference.tolist(), labels.tolist()
    z0 = max(0.0, sum(a - b for a, b in zip(kl_policy.tolist(), kl_reference.tolist())) / n)
    total = 0.0
    for p, r, up in zip(pol, ref, lab):
        ratio = p - r
        if up:
            total += lam_d * (1 - _sigmoid(beta * (ratio - z0)))
        else:
            total += lam_u * (1 - _sigmoid(beta * (z0 - ratio)))
    kto_expected = total / n
    kto = kto_loss(policy, reference, labels, kl_policy, kl_reference, beta, lam_d, lam_u)
    assert float(kto.kl) == pytest.approx(z0, rel=1e-12) and z0 > 0
    assert float(kto.loss) == pytest.approx(kto_expected, rel=1e-12)

    # DPO on the batch cut into pairs: rows 0..7 chosen, 8..15 rejected.
    h = n // 2
    dpo_expected = sum(
        _log1p_exp(-(beta * (pol[i] - ref[i]) - beta * (pol[h + i] - ref[h + i]))) for i in range(h)
    ) / h
    dpo = dpo_loss(policy[:h], reference[:h], policy[h:], reference[h:], beta)
    assert float(dpo.loss) == pytest.approx(dpo_expected, rel=1e-12)
    # and the BCE (delta 0) on the same pairs' rows is no smaller (Theorem 1)
    pair_labels = torch.tensor([T] * h + [Fa] * h)
    assert float(bco_loss(policy, reference, pair_labels, 0.0, beta).loss) >= dpo_expected


def test_non_finite_rewards_are_counted_and_left_out_of_every_figure():
    """A NaN reward is no thumbs-down: the figures are those of the finite rows, and the others are counted."""
    r = torch.tensor([2.0, -1.0, 0.5, -3.0, float("nan"), float("inf"), float("-inf")])
    y = torch.tensor([True, False, True, False, True, True, False])
    with_bad, clean = metrics.binary_figures(r, y, 0.1), metrics.binary_figures(r[:4], y[:4], 0.1)
    assert with_bad.pop("non_finite") == 3 and clean.pop("non_finite") == 0
    assert with_bad == clean
    line = metrics.held_out_figures(r, y, 0.1)
    assert line == {"eval_loss": pytest.approx(clean["bco_loss"]), "eval_reward_accuracy": 1.0, "eval_rows": 7,
                    "eval_non_finite": 3}
    nothing = metrics.held_out_figures(torch.tensor([float("nan")] * 3), torch.tensor([True, False, True]), 0.0)
    assert nothing == {"eval_loss": None, "eval_reward_accuracy": None, "eval_rows": 3, "eval_non_finite": 3}
    assert metrics.binary_figures(torch.tensor([float("nan")]), torch.tensor([True]), 0.0)["rows"] == 0
