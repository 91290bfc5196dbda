"""The one path for log-probs: summed log pi(y_t | x, y_<t) over completion tokens, from hidden states.

Policy, reference, evaluation and the benchmark all call `completion_logps`. It runs the decoder once,
keeps the hidden states only at positions that predict a completion token, and applies the LM head to
those in chunks, so full [batch, length, vocab] logits never exist (PITFALLS 6).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from qbco.data import Encoded, iter_batches
from qbco.models import reference


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(head(hidden))[target] per row, as gather - logsumexp in float32 (no log_softmax copy)."""
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    chunk: int = 1024,
) -> torch.Tensor:
    """[B] sums over completion tokens of log p(token | everything before it). Prompt and padding never count.

    Token t is predicted by the hidden state at t-1, so the positions kept are completion_mask[:, 1:].
    Under autograd each chunk is checkpointed: its logits are recomputed in backward instead of stored.
    """
    lm = causal_lm(model)
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    keep = completion_mask[:, 1:].bool()
    h = hidden[:, :-1][keep]  # [N, H]: only positions that predict a completion token
    targets = input_ids[:, 1:][keep]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(keep)[keep]
    head = lm.get_output_embeddings()
    parts = []
    for start in range(0, h.shape[0], chunk):
        hc, tc = h[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and hc.requires_grad:
            parts.append(checkpoint(token_logps, head, hc, tc, use_reentrant=False))
        else:
            parts.append(token_logps(head, hc, tc))
    per_token = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    return torch.zeros(input_ids.shape[0], device=input_ids.device, dtype=torch.float32).index_add(0, rows, per_token)


def dataset_logps(model, encoded: list[Encoded], batch_size: int, pad_id: int, device, chunk: int) -> torch.Tensor:
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
    With a cache_key (qbco.refcache.cache_key) the result is read from, or written to, the disk cache."""
    def compute():
        with reference(model):
            return dataset_logps(model, encoded, batch_size, pad_id, device, chunk)

    if cache_key is None or not encoded:
        return compute()
    from qbco.refcache import cached

    return cached(cache_key, compute)
