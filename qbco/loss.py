"""The BCO loss as a pure function (Jung et al. 2024, "Binary Classifier Optimization for Large Language
Model Alignment", arXiv 2404.04656).

    r(x, y) = beta * sum_t [log pi_theta(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]   (completion tokens)
    L_BCO   = E_up[ -log sigmoid(r - delta) ] + E_down[ -log sigmoid(-(r - delta)) ]
    delta   = (E_up[r] + E_down[r]) / 2                                              (Eq. 7, detached)

BCE is the same loss with delta = 0. Each expectation is a mean over that class; under gradient
accumulation the class counts of the whole window are the denominators, so that a window of micro-batches
gives exactly the update of one big batch (PITFALLS 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    rewards: torch.Tensor  # [B] r(x, y), detached


def implicit_rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """r = beta * (log pi_theta(y|x) - log pi_ref(y|x)), with log-probs summed over completion tokens."""
    return beta * (policy_logps - reference_logps)


def bco_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    labels: torch.Tensor,
    delta: float,
    beta: float,
    n_up: int | None = None,
    n_down: int | None = None,
) -> LossOutput:
    """sum_up -log sigmoid(r - delta) / n_up + sum_down -log sigmoid(-(r - delta)) / n_down.

    labels: bool [B], True = thumbs-up. n_up / n_down: the class counts the means divide by (default: this
    batch's; pass the accumulation window's). A class with no rows contributes 0.
    """
    labels = labels.bool()
    rewards = implicit_rewards(policy_logps, reference_logps, beta)
    shifted = rewards - delta
    n_up = int(labels.sum()) if n_up is None else n_up
    n_down = int((~labels).sum()) if n_down is None else n_down
    up_terms = -F.logsigmoid(shifted[labels])
    down_terms = -F.logsigmoid(-shifted[~labels])
    loss = rewards.new_zeros(())
    if n_up > 0:
        loss = loss + up_terms.sum() / n_up
    if n_down > 0:
        loss = loss + down_terms.sum() / n_down
    return LossOutput(loss=loss, rewards=rewards.detach())
