"""The one path for log-probs: summed log pi(y_t | x, y_<t) over completion tokens, from hidden states.

Policy, reference, evaluation and the benchmark all call `completion_logps`. It runs the decoder once,
keeps the hidden states only at positions that predict a completion token, and applies the LM head to
those in chunks, so full [batch, length, vocab] logits never exist (PITFALLS 6).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


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
