"""Evaluation figures as pure functions of rewards, labels and delta: classification and calibration of
p(up) = sigmoid(r - delta), preference pairs, drift from the reference, and slices. No model here:
qbco/eval/evaluate.py computes the inputs; the losses come from qbco/reward/loss.py, never a second copy."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from qbco.common.errors import QbcoError

try:
    from scipy.special import expit
    from sklearn.metrics import (
        average_precision_score,
        brier_score_loss,
        log_loss,
        precision_recall_curve,
        precision_recall_fscore_support,
        roc_auc_score,
    )
except ImportError:  # a dependency of qbco; a broken install gets one line
    raise QbcoError("qbco needs scikit-learn for its figures and calibration: pip install scikit-learn") from None

from qbco.reward.loss import bco_loss, dpo_loss, implicit_rewards

N_BINS = 10


def _labels(labels) -> np.ndarray:
    return np.asarray(torch.as_tensor(labels).bool().cpu().numpy(), dtype=bool)


def margins(rewards, delta: float) -> torch.Tensor:
    """r - delta in the rewards' own dtype, the same arithmetic as training's held-out accuracy."""
    return torch.as_tensor(rewards) - delta


def p_up(rewards, delta: float) -> np.ndarray:
    """p(up) = sigmoid(r - delta), float64."""
    return expit(margins(rewards, delta).double().cpu().numpy())


# ---------------------------------------------------------------- calibration


def reliability_bins(probs, labels, n_bins: int = N_BINS) -> list[dict]:
    """Equal-width bins of predicted p(up), [k/n, (k+1)/n) with the last closed at 1: per bin the rows,
    their mean predicted p(up) and the observed share of thumbs-up (None for an empty bin)."""
    p, y = np.asarray(probs, dtype=np.float64), _labels(labels)
    which = np.clip(np.floor(p * n_bins).astype(int), 0, n_bins - 1)
    bins = []
    for k in range(n_bins):
        inside = which == k
        n = int(inside.sum())
        bins.append({
            "low": k / n_bins,
            "high": (k + 1) / n_bins,
            "rows": n,
            "mean_p_up": float(p[inside].mean()) if n else None,
            "observed_up": float(y[inside].mean()) if n else None,
        })
    return bins


def ece(probs, labels, n_bins: int = N_BINS) -> float:
    """Expected calibration error of p(up) over equal-width bins B_1..B_n of predicted p(up):

        ECE = sum_k |B_k| / N * | mean_{i in B_k} y_i  -  mean_{i in B_k} p_i |

    y_i = 1 for thumbs-up; empty bins contribute 0. 0 is perfect calibration, 1 the worst.
    """
    n = len(np.asarray(probs))
    if n == 0:
        raise ValueError("ece of no rows")
    return float(sum(b["rows"] / n * abs(b["observed_up"] - b["mean_p_up"]) for b in reliability_bins(probs, labels, n_bins) if b["rows"]))


# ---------------------------------------------------------------- binary feedback


def _classification(y: np.ndarray, predicted: np.ndarray) -> dict:
    precision, recall, f1, _ = precision_recall_fscore_support(
        y, predicted, average="binary", pos_label=True, zero_division=0
    )
    return {"accuracy": float((predicted == y).mean()), "precision": float(precision), "recall": float(recall), "f1": float(f1)}


def best_f1_threshold(probs, labels) -> float | None:
    """The p(up) threshold t (call a row thumbs-up when p >= t) with the highest F1; None without thumbs-up rows.
    Ties go to the lowest such t."""
    p, y = np.asarray(probs, dtype=np.float64), _labels(labels)
    if not y.any():
        return None
    precision, recall, thresholds = precision_recall_curve(y, p)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(thresholds[int(np.argmax(f1))])


def finite_or_none(value: float) -> float | None:
    """A figure, or None (JSON null: no figure) for a NaN or an infinity, which is not one."""
    return value if value is None or math.isfinite(value) else None


def held_out_figures(rewards, labels, delta: float) -> dict:
    """Training's held-out line. Rows with a non-finite reward r (NaN, inf: an overflow) are counted in
    eval_non_finite and left out of both figures, never folded into a class:

        eval_reward_accuracy = mean over finite rows of [ (r - delta > 0) == label ]
        eval_loss            = bco_loss of the finite rows (per-class means, beta 1, the final delta)

    Each is None when no row is finite (or the loss itself is not finite); eval_rows counts every row."""
    rewards = torch.as_tensor(rewards).double()
    labels = torch.as_tensor(labels).bool()
    finite = torch.isfinite(rewards)
    r, y = rewards[finite], labels[finite]
    loss = accuracy = None
    if len(r):
        loss = finite_or_none(float(bco_loss(r, torch.zeros_like(r), y, delta, beta=1.0).loss))
        accuracy = float((((r - delta) > 0) == y).double().mean())
    return {"eval_loss": loss, "eval_reward_accuracy": accuracy, "eval_rows": int(len(rewards)),
            "eval_non_finite": int((~finite).sum())}


def binary_figures(rewards, labels, delta: float, n_bins: int = N_BINS) -> dict:
    """Every figure of thumbs-up/down prediction with p(up) = sigmoid(r - delta).

    at_0.5 calls a row thumbs-up when p > 0.5, i.e. r - delta > 0 (training's eval_reward_accuracy);
    at_best_f1 when p >= the F1-best threshold, which it states. roc_auc / pr_auc are None when the rows
    hold one class only (pr_auc: no thumbs-up). log_loss is binary cross-entropy of p(up) per row (nats);
    bco_loss is the training objective on these rows (per-class means, the same delta). Rows whose reward is
    not finite are left out of every figure and counted in non_finite ("rows" counts the others).
    """
    rewards = torch.as_tensor(rewards)
    y = _labels(labels)
    finite = torch.isfinite(rewards).cpu().numpy()
    rewards, y = rewards[torch.from_numpy(finite)], y[finite]
    if not len(y):
        return {"rows": 0, "non_finite": int((~finite).sum()), "thumbs_up": 0, "thumbs_up_share": None, "roc_auc": None,
                "pr_auc": None,
                "at_0.5": {"threshold": 0.5, "reward_margin": 0.0, **dict.fromkeys(("accuracy", "precision", "recall", "f1"))},
                "at_best_f1": None, "log_loss": None, "brier": None, "ece": None,
                "bco_loss": None, "reliability": []}
    p = p_up(rewards, delta)
    both = bool(y.any() and (~y).any())
    at_half = _classification(y, margins(rewards, delta).cpu().numpy() > 0)
    t = best_f1_threshold(p, y)
    at_best = None
    if t is not None:
        at_best = {"threshold": t, "reward_margin": _logit(t), **_classification(y, p >= t)}
    return {
        "rows": int(len(y)),
        "non_finite": int((~finite).sum()),
        "thumbs_up": int(y.sum()),
        "thumbs_up_share": float(y.mean()),
        "roc_auc": float(roc_auc_score(y, p)) if both else None,
        "pr_auc": float(average_precision_score(y, p)) if y.any() else None,
        "at_0.5": {"threshold": 0.5, "reward_margin": 0.0, **at_half},
        "at_best_f1": at_best,
        "log_loss": float(log_loss(y, p, labels=[False, True])),
        "brier": float(brier_score_loss(y, p, pos_label=True)),
        "ece": ece(p, y, n_bins),
        "bco_loss": float(bco_loss(rewards, torch.zeros_like(rewards), torch.as_tensor(y), delta, beta=1.0).loss),
        "reliability": reliability_bins(p, y, n_bins),
    }


def _logit(p: float) -> float | None:
    """r - delta at which p(up) = p (None at 0 or 1)."""
    return math.log(p / (1 - p)) if 0 < p < 1 else None


# ---------------------------------------------------------------- pairs


def pair_figures(rewards, pairs: Sequence[tuple[int, int]], delta: float) -> dict | None:
    """Preference figures on (chosen, rejected) pairs of rows; None without pairs.

    reward_accuracy: share of pairs with r_chosen > r_rejected (a tie counts as wrong); mean_margin: mean of
    r_chosen - r_rejected; dpo_loss: mean of -log sigmoid(r_w - r_l); bce_loss: mean over pairs of
    -log sigmoid(r_w) - log sigmoid(-r_l) (BCE, delta = 0), bco_loss the same with the run's delta. Theorem 1
    of arXiv 2404.04656: bce_loss >= dpo_loss, so bce_minus_dpo >= 0 (and bco_minus_dpo too: a shared shift
    leaves r_w - r_l alone).
    """
    if not pairs:
        return None
    r = torch.as_tensor(rewards).double()
    w = torch.tensor([a for a, _ in pairs])
    l = torch.tensor([b for _, b in pairs])
    r_w, r_l = r[w], r[l]
    zeros = torch.zeros_like(r_w)
    dpo = float(dpo_loss(r_w, zeros, r_l, zeros, beta=1.0).loss)
    # bco_loss on the pairs' rows: each class a mean over the P pairs, so their sum is the mean per-pair BCE.
    rows, labels = torch.cat([r_w, r_l]), torch.cat([torch.ones(len(pairs), dtype=torch.bool), torch.zeros(len(pairs), dtype=torch.bool)])
    bce = float(bco_loss(rows, torch.zeros_like(rows), labels, 0.0, beta=1.0).loss)
    bco = float(bco_loss(rows, torch.zeros_like(rows), labels, delta, beta=1.0).loss)
    return {
        "pairs": len(pairs),
        "reward_accuracy": float((r_w > r_l).double().mean()),
        "mean_margin": float((r_w - r_l).mean()),
        "dpo_loss": dpo,
        "bce_loss": bce,
        "bco_loss": bco,
        "bce_minus_dpo": bce - dpo,
        "bco_minus_dpo": bco - dpo,
    }


# ---------------------------------------------------------------- drift from the reference


def drift(policy_logps, reference_logps, completion_tokens, beta: float) -> dict:
    """Mean log-ratio log pi_theta(y|x) - log pi_ref(y|x) on the rows, in nats: per sequence (mean over rows
    of the log-ratio summed over completion tokens) and per completion token (summed log-ratio / summed
    completion tokens); mean_reward = beta * per sequence. Negative: the policy gives these completions less
    probability than the reference. Were the completions drawn from pi_ref, per_sequence would estimate
    -KL(pi_ref || pi_theta) <= 0 (arXiv 2404.04656, Appendix B: the average implicit reward tracks -KL).
    """
    ratio = (torch.as_tensor(policy_logps).double() - torch.as_tensor(reference_logps).double()).cpu()
    tokens = torch.as_tensor(completion_tokens).double().cpu()
    return {
        "log_ratio_per_sequence": float(ratio.mean()),
        "log_ratio_per_token": float(ratio.sum() / tokens.sum()),
        "mean_reward": float(beta * ratio.mean()),
        "completion_tokens": int(tokens.sum()),
    }


# ---------------------------------------------------------------- slices and the whole


def slice_indices(values: Sequence) -> dict[str, list[int]]:
    """Row indices per slice value (as text; a missing value is '(missing)'), in sorted order of the values."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, v in enumerate(values):
        groups["(missing)" if v is None else str(v)].append(i)
    return dict(sorted(groups.items()))


def all_figures(policy_logps, reference_logps, labels, completion_tokens, pairs, beta: float, delta: float) -> dict:
    """binary, pairs and drift figures of a set of rows; pairs index into these rows."""
    policy_logps, reference_logps = torch.as_tensor(policy_logps), torch.as_tensor(reference_logps)
    rewards = implicit_rewards(policy_logps, reference_logps, beta)
    up = _labels(labels)
    figures = {
        "binary": binary_figures(rewards, labels, delta),
        "pairs": pair_figures(rewards, pairs, delta),
        "drift": drift(policy_logps, reference_logps, completion_tokens, beta),
    }
    for name, mask in (("thumbs_up", up), ("thumbs_down", ~up)):
        idx = torch.from_numpy(np.flatnonzero(mask))
        figures["drift"][name] = (
            drift(policy_logps[idx], reference_logps[idx], torch.as_tensor(completion_tokens)[idx], beta) if len(idx) else None
        )
    return figures


def subset(indices: Sequence[int], pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The pairs with both rows among `indices`, renumbered to positions in `indices`."""
    where = {i: k for k, i in enumerate(indices)}
    return [(where[w], where[l]) for w, l in pairs if w in where and l in where]
