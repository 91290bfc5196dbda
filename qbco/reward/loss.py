"""The BCO loss as a pure function (Jung et al. 2024, "Binary Classifier Optimization for Large Language
Model Alignment", arXiv 2404.04656).

    r(x, y) = beta * sum_t [log pi_theta(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]   (completion tokens)
    L_BCO   = E_up[ -log sigmoid(r - delta) ] + E_down[ -log sigmoid(-(r - delta)) ]
    delta   = (E_up[r] + E_down[r]) / 2                                              (Eq. 7, detached)

BCE is the same loss with delta = 0. Each expectation is a mean over that class; under gradient
accumulation the class counts of the whole window are the denominators, so that a window of micro-batches
gives exactly the update of one big batch (docs/pitfalls.md, 1).
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


def sft_loss(
    policy_logps: torch.Tensor,
    completion_tokens: torch.Tensor,
    labels: torch.Tensor,
    n_up: float | None = None,
) -> torch.Tensor:
    """The per-token negative log-likelihood of the thumbs-up completions, the likelihood term that RPO
    (Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv 2404.19733) and Llama 3's
    DPO + NLL (arXiv 2407.21783, Section 4.1.4) add to a preference loss on the chosen answers:

        L_SFT = sum_{i up} [ -log pi_theta(y_i | x_i) / |y_i| ] / n_up

    log pi_theta(y_i | x_i) is summed over the completion's |y_i| tokens (`completion_tokens`), so each
    thumbs-up row weighs the same whatever its length. n_up: the count the mean divides by (default: this
    batch's thumbs-up rows; pass the accumulation window's, as for bco_loss). Thumbs-down rows are not in it,
    and no reference enters: it pulls the good completions up in absolute terms, which a loss over
    differences or classes alone never asks for (docs/results.md: likelihood displacement). 0 without
    thumbs-up rows.
    """
    labels = labels.bool()
    n_up = int(labels.sum()) if n_up is None else n_up
    if n_up == 0:
        return policy_logps.new_zeros(())
    per_token = -policy_logps[labels] / completion_tokens[labels].to(policy_logps.dtype)
    return per_token.sum() / n_up


# ---------------------------------------------------------------- the loss family beside BCO: KTO and DPO


@dataclass
class KTOOutput(LossOutput):
    kl: torch.Tensor  # scalar z_0 in nats per sequence, clamped at 0 and detached


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    labels: torch.Tensor,
    kl_policy_logps: torch.Tensor,
    kl_reference_logps: torch.Tensor,
    beta: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> KTOOutput:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv 2402.01306,
    Section 4.1), on the same unpaired thumbs-up/down rows as BCO:

        r_theta(x, y) = log pi_theta(y|x) - log pi_ref(y|x)                      (summed over completion tokens)
        z_0           = max(0, mean_i [log pi_theta(y'_i|x_i) - log pi_ref(y'_i|x_i)])   (detached)
        v(x, y)       = sigmoid(beta * (r_theta(x, y) - z_0))     for a desirable (thumbs-up) y
                        sigmoid(beta * (z_0 - r_theta(x, y)))     for an undesirable (thumbs-down) y
        L_KTO         = mean over the batch of  lambda_D * (1 - v)  (up)  or  lambda_U * (1 - v)  (down)

    z_0 is the paper's batch estimate of KL(pi_theta || pi_ref): the log-ratio of mismatched pairs, each
    prompt x_i with a completion y'_i of another row of the batch (TRL pairs row i with row i+1's
    completion); kl_policy_logps / kl_reference_logps are those pairs' summed log-probs. It is clamped at 0
    and carries no gradient, as in the paper. beta multiplies r_theta - z_0, so z_0 is in the units of the
    log-ratio (nats per sequence); beta * z_0 is the reference point in reward units.
    labels: bool [B], True = thumbs-up (desirable). rewards = beta * r_theta, detached.
    """
    labels = labels.bool()
    logratios = policy_logps - reference_logps
    kl = (kl_policy_logps - kl_reference_logps).mean().clamp(min=0).detach()
    up = torch.sigmoid(beta * (logratios - kl))
    down = torch.sigmoid(beta * (kl - logratios))
    losses = torch.where(labels, lambda_d * (1 - up), lambda_u * (1 - down))
    return KTOOutput(loss=losses.mean(), rewards=(beta * logratios).detach(), kl=kl)


def dpo_loss(
    chosen_policy_logps: torch.Tensor,
    chosen_reference_logps: torch.Tensor,
    rejected_policy_logps: torch.Tensor,
    rejected_reference_logps: torch.Tensor,
    beta: float,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290, Eq. 7) on pairs:

        r_w = beta * (log pi_theta(y_w|x) - log pi_ref(y_w|x))     (chosen, summed over completion tokens)
        r_l = beta * (log pi_theta(y_l|x) - log pi_ref(y_l|x))     (rejected)
        L_DPO = mean over pairs of  -log sigmoid(r_w - r_l)

    Inputs are [P] per pair. rewards = [r_w (P), then r_l (P)], detached: the chosen rows are the thumbs-up
    rows and the rejected rows the thumbs-down rows. BCE on the same two rows (bco_loss, delta = 0) is an
    upper bound of this loss (arXiv 2404.04656, Theorem 1).
    """
    r_w = implicit_rewards(chosen_policy_logps, chosen_reference_logps, beta)
    r_l = implicit_rewards(rejected_policy_logps, rejected_reference_logps, beta)
    loss = -F.logsigmoid(r_w - r_l).mean()
    return LossOutput(loss=loss, rewards=torch.cat([r_w, r_l]).detach())
