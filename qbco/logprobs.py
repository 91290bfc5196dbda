"""The one path for log-probs: summed log pi(y_t | x, y_<t) over completion tokens, from hidden states.

Policy, reference, evaluation and the benchmark all call `completion_logps`. It runs the decoder once,
keeps the hidden states only at positions that predict a completion token, and applies the LM head to
those in chunks, so full [batch, length, vocab] logits never exist (docs/pitfalls.md, 6).
"""

from __future__ import annotations

import torch

from qbco.data import Encoded, batch_order, collate, iter_batches
from qbco.models import reference


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(head(hidden))[target] per row, as gather - logsumexp in float32 (no log_softmax copy)."""
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class HeadLogps(torch.autograd.Function):
    """token_logps with its gradient taken in forward, while the chunk's logits exist anyway:

        logp_t = z_t[y_t] - logsumexp(z_t),   z_t = W h_t (+ b)
        d logp_t / d h_t = W[y_t] - softmax(z_t) W

    Backward is g_t times that [n, hidden] gradient. The LM head's weight is frozen (qbco never puts LoRA on
    it), so nothing else needs a gradient. Against checkpointing the chunk, the [n, vocab] logits are made
    once instead of twice and never outlive forward.
    """

    @staticmethod
    def forward(ctx, hidden, targets, head):
        logits = head(hidden).float()
        lse = torch.logsumexp(logits, dim=-1)
        logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
        weight = head.weight
        probs = logits.sub_(lse.unsqueeze(-1)).exp_().to(weight.dtype)  # softmax, in place of the logits
        grad = weight[targets].float() - (probs @ weight).float()
        ctx.save_for_backward(grad.to(hidden.dtype))
        return logp

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.unsqueeze(-1).to(grad.dtype), None, None


# Logits per LM-head chunk when the chunk is not given in tokens: 2^24 float32 logits are 64 MiB, about three
# times that alive in a chunk's backward; 341 tokens with SmolLM2's 49,152-token vocabulary, 110 with Qwen2.5's.
CHUNK_LOGITS = 2**24
# What one more decoder call costs, in padded positions' worth: the Python work over every module and one more
# dequantization of every 4-bit weight, per pass. Measured on SmolLM2 on one CPU thread: 0.3 s per call for
# forward and backward, about 35 positions at 9 ms each; 64 errs on the side of fewer calls (faster kernels
# and launch costs on a GPU make a call dearer against a position).
GROUP_OVERHEAD = 64


def length_groups(lengths: list[int], overhead: int | None = None) -> list[list[int]]:
    """Rows cut into groups, each padded only to its own longest row, minimising padded positions.

    Rows sorted by length are split into contiguous runs; a run i..j-1 costs (j - i) * length[j-1] positions
    plus `overhead` for its decoder call. best[j] = min over i of best[i] + cost(i, j), an O(B^2) dynamic
    programme. The batch itself is unchanged: the loss still sees every row of it.
    """
    overhead = GROUP_OVERHEAD if overhead is None else overhead
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_len = [lengths[i] for i in order]
    best, cut = [0] + [None] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * sorted_len[j - 1] + overhead
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """[B] sums over completion tokens of log p(token | everything before it). Prompt and padding never count.

    Rows of very different lengths go through the decoder in separate calls (`length_groups`), each cut to
    its own longest row, so padding costs little; every row's sum is the one the whole batch would give.
    `chunk` is completion tokens per LM-head chunk; None sizes it by logits (CHUNK_LOGITS / vocabulary).
    """
    if chunk is None:
        chunk = chunk_tokens(causal_lm(model).get_output_embeddings().weight.shape[0])
    ends = (attention_mask * torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)).amax(1)
    groups = length_groups(ends.tolist())
    if len(groups) <= 1:
        if not groups:
            return torch.zeros(0, device=input_ids.device, dtype=torch.float32)
        width = int(ends.max())
        return _group_logps(model, input_ids[:, :width], attention_mask[:, :width], completion_mask[:, :width], chunk)
    parts = []
    for group in groups:
        rows = torch.tensor(group, device=input_ids.device)
        width = int(ends[rows].max())
        parts.append(
            _group_logps(model, input_ids[rows, :width], attention_mask[rows, :width], completion_mask[rows, :width], chunk)
        )
    order = torch.tensor([i for group in groups for i in group], device=input_ids.device)
    return torch.cat(parts)[torch.argsort(order)]


def chunk_tokens(vocab_size: int) -> int:
    """Completion tokens per LM-head chunk so that a chunk holds about CHUNK_LOGITS logits (16 at least)."""
    return max(16, CHUNK_LOGITS // vocab_size)


def _group_logps(model, input_ids, attention_mask, completion_mask, chunk: int) -> torch.Tensor:
    """completion_logps for rows sent to the decoder together.

    Token t is predicted by the hidden state at t-1, so the positions kept are completion_mask[:, 1:].
    Under autograd each chunk's gradient is taken in its forward (HeadLogps): no logits are kept for backward.
    """
    lm = causal_lm(model)
    mask = None if bool(attention_mask.all()) else attention_mask  # no padding: the causal fast path
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
    keep = completion_mask[:, 1:].bool()
    h = hidden[:, :-1][keep]  # [N, H]: only positions that predict a completion token
    targets = input_ids[:, 1:][keep]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(keep)[keep]
    head = lm.get_output_embeddings()
    parts = []
    for start in range(0, h.shape[0], chunk):
        hc, tc = h[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and hc.requires_grad:
            if head.weight.requires_grad:
                raise ValueError("completion_logps: the LM head must be frozen (its gradient is not computed)")
            parts.append(HeadLogps.apply(hc, tc, head))
        else:
            parts.append(token_logps(head, hc, tc))
    per_token = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    return torch.zeros(input_ids.shape[0], device=input_ids.device, dtype=torch.float32).index_add(0, rows, per_token)


def dataset_logps(model, encoded: list[Encoded], batch_size: int, pad_id: int, device, chunk: int | None) -> torch.Tensor:
    """[N] completion log-probs of every encoded row under `model` as it is now, without gradients."""
    out = torch.zeros(len(encoded), dtype=torch.float32)
    was_training = model.training
    model.eval()  # safe on 4-bit CPU layers: models.disable_cpu_repack keeps them differentiable
    with torch.no_grad():
        for batch in iter_batches(encoded, batch_size, pad_id):
            b = batch.to(device)
            out[batch.index] = completion_logps(model, b.input_ids, b.attention_mask, b.completion_mask, chunk).cpu()
    model.train(was_training)
    return out


def reference_logps(model, encoded, batch_size, pad_id, device, chunk, cache_key: str | None = None) -> torch.Tensor:
    """One no-grad pass of the reference (adapters disabled) over a dataset; every later step reuses it.
    With a cache_key (qbco.refcache.cache_key) the result is read from, or written to, the disk cache, batch
    by batch: an interrupted pass keeps its finished batches (refcache.ReferenceInterrupted says how many)."""
    if cache_key is None or not encoded:
        with reference(model):
            return dataset_logps(model, encoded, batch_size, pad_id, device, chunk)
    from qbco.refcache import cached

    def compute(rows: list[int]) -> torch.Tensor:
        b = collate(encoded, rows, pad_id).to(device)
        return completion_logps(model, b.input_ids, b.attention_mask, b.completion_mask, chunk)

    was_training = model.training
    model.eval()  # as in dataset_logps: safe on 4-bit CPU layers (models.disable_cpu_repack)
    try:
        with reference(model):
            return cached(cache_key, len(encoded), batch_order(encoded, batch_size), compute)
    finally:
        model.train(was_training)
