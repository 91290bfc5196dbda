"""The BCO loss and the reward shift against arithmetic done by hand.

Notation: l(x) = -log sigmoid(x) = log(1 + e^-x).
    l(0.5) = 0.474077, l(1.5) = 0.201413, l(1) = 0.313262, l(0) = 0.693147, l(-2) = 2.126928,
    l(0.75) = 0.386871, l(-0.25) = 0.825939.
"""

import pytest
import torch
import torch.nn.functional as F

from qbco.reward.loss import bco_loss, implicit_rewards, sft_loss
from qbco.reward.shift import RewardShift

T, Fa = True, False


def test_implicit_reward_is_beta_times_log_ratio():
    r = implicit_rewards(torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -4.0]), beta=0.1)
    assert r.tolist() == pytest.approx([0.2, -0.6])


def test_balanced_batch_by_hand():
    """beta 0.5, policy [2, 0, -2, 4], ref 0 -> r = [1, 0, -1, 2]; labels up, down, down, up; delta 0.5.
    up: r - delta = 0.5, 1.5 -> (l(0.5) + l(1.5)) / 2 = 0.337745
    down: -(r - delta) = 0.5, 1.5 -> (l(0.5) + l(1.5)) / 2 = 0.337745;  total 0.675490"""
    out = bco_loss(torch.tensor([2.0, 0.0, -2.0, 4.0]), torch.zeros(4), torch.tensor([T, Fa, Fa, T]), delta=0.5, beta=0.5)
    assert float(out.loss) == pytest.approx(0.675490, abs=1e-6)
    assert out.rewards.tolist() == pytest.approx([1.0, 0.0, -1.0, 2.0])


def test_imbalanced_batch_by_hand():
    """r = [1, 0, -1, 2], labels up, down, down, down, delta 0.
    up: l(1) = 0.313262; down: (l(0) + l(1) + l(-2)) / 3 = (0.693147 + 0.313262 + 2.126928) / 3 = 1.044446
    total 1.357708: each class is a mean of its own, so the 3 downs do not outweigh the 1 up."""
    out = bco_loss(torch.tensor([1.0, 0.0, -1.0, 2.0]), torch.zeros(4), torch.tensor([T, Fa, Fa, Fa]), delta=0.0, beta=1.0)
    assert float(out.loss) == pytest.approx(1.357708, abs=1e-6)


def test_one_class_batch_by_hand():
    """All thumbs-up, r = [1, 0], delta 0.25: (l(0.75) + l(-0.25)) / 2 = (0.386871 + 0.825939) / 2 = 0.606405."""
    out = bco_loss(torch.tensor([1.0, 0.0]), torch.zeros(2), torch.tensor([T, T]), delta=0.25, beta=1.0)
    assert float(out.loss) == pytest.approx(0.606405, abs=1e-6)


def test_integer_labels_are_not_compared_by_identity():
    """0/1 labels give the same loss as booleans (TRL split batches with `label is True`: docs/pitfalls.md, 14)."""
    pol, ref = torch.tensor([1.0, -1.0, 0.5]), torch.zeros(3)
    a = bco_loss(pol, ref, torch.tensor([1, 0, 1]), delta=0.1, beta=1.0).loss
    b = bco_loss(pol, ref, torch.tensor([T, Fa, T]), delta=0.1, beta=1.0).loss
    assert float(a) == float(b) and torch.isfinite(a)


def test_delta_zero_is_plain_bce_per_class():
    """With delta = 0 the loss is binary cross-entropy on logits r, averaged within each class, summed."""
    torch.manual_seed(0)
    pol, ref = torch.randn(10), torch.randn(10)
    labels = torch.tensor([T, Fa, Fa, T, Fa, Fa, Fa, T, Fa, Fa])
    r = 0.3 * (pol - ref)
    expected = F.binary_cross_entropy_with_logits(r[labels], torch.ones(3)) + F.binary_cross_entropy_with_logits(
        r[~labels], torch.zeros(7)
    )
    assert float(bco_loss(pol, ref, labels, delta=0.0, beta=0.3).loss) == pytest.approx(float(expected), rel=1e-6)


def test_window_counts_make_micro_batches_add_up_to_the_big_batch():
    """Micro-batches normalised by the window's class counts sum to the loss (and gradient) of one batch."""
    torch.manual_seed(1)
    pol = torch.randn(8, requires_grad=True)
    ref = torch.randn(8)
    labels = torch.tensor([T, Fa, Fa, Fa, T, Fa, Fa, Fa])  # second half-window has one up, first too
    whole = bco_loss(pol, ref, labels, delta=0.2, beta=0.5).loss
    (g_whole,) = torch.autograd.grad(whole, pol)
    parts = sum(
        bco_loss(pol[i : i + 2], ref[i : i + 2], labels[i : i + 2], delta=0.2, beta=0.5, n_up=2, n_down=6).loss
        for i in range(0, 8, 2)
    )
    (g_parts,) = torch.autograd.grad(parts, pol)
    assert float(parts) == pytest.approx(float(whole), rel=1e-6)
    assert torch.allclose(g_parts, g_whole, atol=1e-7)


def test_shift_ema_over_steps_by_hand():
    """decay 0.9, both means start at 0.
    step 1: up [1, 3] (mean 2), down [-1]: mu_up = 0.2, mu_down = -0.1, delta = 0.05
    step 2: only down [-2, -4] (mean -3): mu_down = -0.09 - 0.3 = -0.39, mu_up stays 0.2, delta = -0.095
    step 3: only up [0.5]: mu_up = 0.18 + 0.05 = 0.23, delta = (0.23 - 0.39) / 2 = -0.08"""
    shift = RewardShift(decay=0.9)
    assert shift.delta == 0.0
    shift.update(torch.tensor([1.0, 3.0, -1.0]), torch.tensor([T, T, Fa]))
    assert (shift.mu_up, shift.mu_down, shift.delta) == pytest.approx((0.2, -0.1, 0.05))
    shift.update(torch.tensor([-2.0, -4.0]), torch.tensor([Fa, Fa]))
    assert (shift.mu_up, shift.mu_down, shift.delta) == pytest.approx((0.2, -0.39, -0.095))
    shift.update(torch.tensor([0.5]), torch.tensor([T]))
    assert (shift.mu_up, shift.mu_down, shift.delta) == pytest.approx((0.23, -0.39, -0.08))


def test_shift_does_not_lean_to_the_majority_class():
    """A 90/10 stream and a 50/50 stream with the same class means give the same delta (docs/pitfalls.md, 2).
    A mean over all rewards would give 0.8 for the first and 0 for the second after convergence."""
    imbalanced, balanced = RewardShift(0.5), RewardShift(0.5)
    for _ in range(30):
        imbalanced.update(torch.tensor([1.0] * 9 + [-1.0]), torch.tensor([T] * 9 + [Fa]))
        balanced.update(torch.tensor([1.0] * 5 + [-1.0] * 5), torch.tensor([T] * 5 + [Fa] * 5))
    assert imbalanced.delta == pytest.approx(balanced.delta, abs=1e-12)
    assert imbalanced.delta == pytest.approx(0.0, abs=1e-6)


def test_shift_state_round_trips():
    a = RewardShift(0.8)
    a.update(torch.tensor([0.3, -0.7]), torch.tensor([T, Fa]))
    b = RewardShift()
    b.load_state_dict(a.state_dict())
    assert (b.decay, b.mu_up, b.mu_down, b.delta) == (a.decay, a.mu_up, a.mu_down, a.delta)


def test_sft_term_by_hand():
    """policy log-probs [-6, -2, -9, -3] over [3, 4, 3, 1] completion tokens, labels up, down, down, up.
    Per-token NLL of the thumbs-up rows: 6/3 = 2 and 3/1 = 3 -> (2 + 3) / 2 = 2.5; the thumbs-down rows
    (-2/4, -9/3) do not count. Over a window of 4 thumbs-up rows: (2 + 3) / 4 = 1.25."""
    policy = torch.tensor([-6.0, -2.0, -9.0, -3.0], requires_grad=True)
    tokens = torch.tensor([3, 4, 3, 1])
    labels = torch.tensor([T, Fa, Fa, T])
    value = sft_loss(policy, tokens, labels)
    assert float(value) == pytest.approx(2.5)
    assert float(sft_loss(policy, tokens, labels, n_up=4)) == pytest.approx(1.25)
    value.backward()  # d/d logp_i = -1 / (|y_i| n_up) for a thumbs-up row, 0 for a thumbs-down one
    assert policy.grad.tolist() == pytest.approx([-1 / 6, 0.0, 0.0, -1 / 2])
    none_up = sft_loss(policy, tokens, torch.tensor([Fa, Fa, Fa, Fa]))
    assert float(none_up) == 0.0
