"""Log-probs for training and scoring: summed log pi(y_t | x, y_<t) over completion tokens, from hidden states.

Policy, reference, evaluation, scoring and the benchmark all call `completion_logps`. It runs the decoder
once, keeps the hidden states only at positions that predict a completion token, and applies the LM head to
those in chunks, so full [batch, length, vocab] logits never exist (docs/pitfalls.md, 6). One path elsewhere
computes log-probs on purpose without it: the merge's fidelity check (qbco.export.merge) reads the model's
own forward, so that a mistake here cannot hide a mistake in a merged model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from qbco.common.errors import QbcoError
from qbco.data.encoding import Encoded, batch_order, collate, iter_batches
from qbco.model.lora import reference
from qbco.model.memory import chunk_tokens
from qbco.model.refcache import cached


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# Model types whose CausalLM.forward multiplies the LM head's output by a config value (read in each forward).
# The same key means different things in different models (hyperclovax multiplies by `logits_scaling`, granite
# divides), so a scale is applied only for the types listed here; any other type with such a key is refused.
LOGIT_SCALES = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass"), ("logit_scale", False)),
    **dict.fromkeys(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared"),
                    ("logits_scaling", True)),  # divides
}
CAP_KEY = "final_logit_softcapping"  # Gemma 2, 3, 3n, 4, VaultGemma, ...: cap * tanh(z / cap), after any scale
# Config keys that change the logits after the head (or the hidden states just before it) in some forward;
# besides these, any key naming a logit with a scale, cap, multiplier or temperature counts.
TRANSFORM_KEYS = ("lm_head_multiplier", "output_multiplier", "logits_mup_width_multiplier", "dim_model_base")
NOT_AFTER_THE_HEAD = re.compile(r"attn|attention|router|init|contrastive|to_keep")  # inside the decoder, or not logits


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to z = W h before the softmax:  t = cap tanh(scale z / cap), or t = scale z
    without a cap. Identity for most models; Gemma's softcap, Cohere's logit_scale, Granite's 1 / logits_scaling
    (docs/pitfalls.md, 15). The gradient needs dt/dz = scale (1 - (t / cap)^2)."""

    scale: float = 1.0
    cap: float | None = None

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        """t from float32 logits z, in place."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.cap is not None:
            z.div_(self.cap).tanh_().mul_(self.cap)
        return z

    def slope(self, t: torch.Tensor) -> torch.Tensor | float:
        """dt/dz, from t: a tensor under a cap, else the constant scale."""
        if self.cap is None:
            return self.scale
        return t.div(self.cap).square_().neg_().add_(1.0).mul_(self.scale)


IDENTITY = LogitTransform()


def logit_transform(config) -> LogitTransform:
    """The transform a model of this config applies after its LM head; a QbcoError naming the model type when
    its config holds a transform qbco does not apply (every reward would be silently wrong)."""
    configs = [config]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        configs.append(text)
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", "?")
    scale, cap, unknown = 1.0, None, []
    for c in configs:
        keys = set(c.to_dict()) | {k for k in (CAP_KEY, *TRANSFORM_KEYS) if hasattr(c, k)}
        for key in sorted(keys):
            value = getattr(c, key, None)
            if value is None or value is False:
                continue
            if key == CAP_KEY:
                cap = float(value)
            elif LOGIT_SCALES.get(c.model_type, (None,))[0] == key:
                scale = 1.0 / float(value) if LOGIT_SCALES[c.model_type][1] else float(value)
            elif key in TRANSFORM_KEYS or (
                "logit" in key and re.search(r"scal|cap|mult|temperature", key) and not NOT_AFTER_THE_HEAD.search(key)
            ):
                if value == 1 and re.search(r"scal|mult", key):
                    continue  # a scale of 1 is no transform, whether the forward multiplies or divides by it
                unknown.append(f"{key} = {value}")
    if unknown:
        raise QbcoError(
            f"model type '{model_type}' transforms its logits after the LM head ({', '.join(unknown)}), which qbco's "
            "log-prob path does not reproduce, so every reward would be wrong; supported: Gemma-style "
            f"{CAP_KEY}, and the scales of {', '.join(sorted(LOGIT_SCALES))} (docs/pitfalls.md, 15)"
        )
    if cap is not None and cap <= 0:
        raise QbcoError(f"model type '{model_type}': {CAP_KEY} must be > 0 (got {cap})")
    return LogitTransform(scale, cap)


def check_against_forward(lm: torch.nn.Module, tokens: int = 16) -> float:
    """Refuse a model whose own forward gives other log-probs than qbco's path (decoder, LM head, the config's
    logit transform): a transform that no config key names (a remote model's code, a custom head) would
    otherwise make every reward silently wrong (docs/pitfalls.md, 15). One forward of `tokens` fixed tokens,
    compared per token; the tolerance allows for the forward's own rounding of low-precision logits.
    Returns the largest difference seen."""
    model_type = getattr(lm.config, "model_type", type(lm).__name__)
    try:
        head, decoder = lm.get_output_embeddings(), lm.get_decoder()
        vocab = head.weight.shape[0]
    except (AttributeError, TypeError) as err:
        raise QbcoError(f"model type '{model_type}' has no LM head and decoder qbco can call ({err})") from None
    transform = logit_transform(lm.config)
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(head.weight.device)
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            theirs = lm(input_ids=ids, use_cache=False).logits[0, :-1].float()
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
            ours = token_logps(head, hidden, ids[0, 1:], transform)
    finally:
        lm.train(was_training)
    expected = theirs.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1) - theirs.logsumexp(-1)
    diff = float((ours - expected).abs().max())
    eps = torch.finfo(head.weight.dtype).eps if head.weight.dtype.is_floating_point else 2**-7
    tolerance = 1e-3 + 4 * eps * float(theirs.abs().max())
    if not diff <= tolerance:  # a NaN fails too
        raise QbcoError(
            f"model type '{model_type}': qbco's log-probs (decoder, LM head, {transform}) differ from the model's own "
            f"forward by {diff:.3g} nats a token (tolerance {tolerance:.2g}); its forward transforms the logits in a "
            "way qbco does not reproduce, so every reward would be wrong (docs/pitfalls.md, 15)"
        )
    return diff


# LM-head weight elements cast to float32 at a time when the head is in a low-precision dtype: 64 MiB.
HEAD_SLICE = 2**24


def _head_slices(weight: torch.Tensor):
    """(start, end, float32 weight rows) over the vocabulary; one slice, uncopied, when it is float32 already."""
    if weight.dtype == torch.float32:
        yield 0, weight.shape[0], weight
        return
    rows = max(1, HEAD_SLICE // weight.shape[1])
    for start in range(0, weight.shape[0], rows):
        yield start, min(start + rows, weight.shape[0]), weight[start : start + rows].float()


def head_logits(head: torch.nn.Module, hidden: torch.Tensor, transform: LogitTransform = IDENTITY) -> torch.Tensor:
    """[n, vocab] float32 logits of the model's forward, transformed, computed in float32 from the hidden states
    (a bf16 head's output rounded to bf16 is off by up to |z| / 256, which the gradient at a confident token
    magnifies: see HeadLogps). A low-precision weight is cast a slice at a time, never whole."""
    h = hidden.float()
    bias = head.bias.float() if getattr(head, "bias", None) is not None else None
    if head.weight.dtype == torch.float32:
        return transform.apply_(torch.nn.functional.linear(h, head.weight, bias))
    z = torch.empty(h.shape[0], head.weight.shape[0], device=h.device, dtype=torch.float32)
    for start, end, w in _head_slices(head.weight):
        z[:, start:end] = torch.nn.functional.linear(h, w, None if bias is None else bias[start:end])
    return transform.apply_(z)


def token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                transform: LogitTransform = IDENTITY) -> torch.Tensor:
    """log softmax(t)[target] per row, t the transformed float32 logits, as gather - logsumexp (no log_softmax copy)."""
    logits = head_logits(head, hidden, transform)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class HeadLogps(torch.autograd.Function):
    """token_logps with its gradient taken in forward, while the chunk's logits exist anyway:

        logp_i = t_i[y_i] - logsumexp(t_i),   t_i = T(z_i),   z_i = W h_i (+ b)
        d logp_i / d h_i = ((e_y - softmax(t_i)) * T'(z_i)) W

    all in float32, and 1 - p_y as the sum of the other p_v: at a confident token it is a small difference
    that bf16 logits or probabilities (or a bf16 product with W) would swamp (on a bf16 head the gradient's
    error against float64 fell from 26% to 0.16%, median over tokens with p_y > 0.95: tests/test_precision.py).
    Backward is g_i times that [n, hidden] gradient, kept in float32 so that fp16 cannot flush it to zero
    before the loss scale multiplies it. The LM head's weight is frozen (qbco never puts LoRA on it), so
    nothing else needs a gradient. Against checkpointing the chunk, the
    [n, vocab] logits are made once instead of twice and never outlive forward.
    """

    @staticmethod
    def forward(ctx, hidden, targets, head, transform):
        t = head_logits(head, hidden, transform)
        lse = torch.logsumexp(t, dim=-1)
        logp = t.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
        slope = transform.slope(t)
        coef = t.sub_(lse.unsqueeze(-1)).exp_().neg_()  # -softmax, in place of the logits
        y = targets.unsqueeze(-1)
        # e_y - softmax, with 1 - p_y taken as the sum of the other p_v: at a confident token 1 - p_y is a
        # small difference of numbers near 1, the sum of small terms is not.
        coef.scatter_(-1, y, 0.0)
        coef.scatter_(-1, y, -coef.sum(-1, keepdim=True))
        if isinstance(slope, torch.Tensor) or slope != 1.0:
            coef.mul_(slope)
        grad = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
        for start, end, w in _head_slices(head.weight):
            grad.addmm_(coef[:, start:end], w)
        ctx.save_for_backward(grad)
        ctx.dtype = hidden.dtype
        return logp

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g.float().unsqueeze(-1)).to(ctx.dtype), None, None, None


# What one more decoder call costs, in padded positions' worth: the Python work over every module and one more
# dequantization of every 4-bit weight, per pass. Measured on SmolLM2 on one CPU thread: 0.3 s per call for
# forward and backward, about 35 positions at 9 ms each; 64 errs on the side of fewer calls.
GROUP_OVERHEAD = 64
# The same on CUDA, where a call's kernel launches and 4-bit dequantizations weigh more against a position and a
# GPU that is not saturated computes extra positions almost for free. NOT MEASURED (no GPU was lent to the
# session that set it; bench/group_overhead.py measures it): the arithmetic for a 3B model, forward, recompute
# and backward (~4,000 launches at ~10 us, three dequantizations of every weight) against 24 GFLOP a position,
# gives ~150 positions on a T4 and ~900 on an H100; 256 until a measurement replaces it.
GROUP_OVERHEAD_CUDA = 256


def group_overhead(device: torch.device | str) -> int:
    """GROUP_OVERHEAD for the device kind: the CPU figure was measured on a CPU and is not a GPU's."""
    return GROUP_OVERHEAD_CUDA if torch.device(device).type == "cuda" else GROUP_OVERHEAD


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
    groups = [list(range(len(ends)))] if sharded(model) else length_groups(ends.tolist(), group_overhead(input_ids.device))
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


def sharded(model: torch.nn.Module) -> bool:
    """A decoder sharded by FSDP runs every forward on all ranks together, so each batch takes exactly one
    decoder call there (length_groups would cut the ranks' batches into different numbers of calls)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(causal_lm(model).get_decoder(), FSDPModule)


def _group_logps(model, input_ids, attention_mask, completion_mask, chunk: int) -> torch.Tensor:
    """completion_logps for rows sent to the decoder together.

    Token t is predicted by the hidden state at t-1, so the positions kept are completion_mask[:, 1:]. The
    model's logit transform (softcap, scale) is applied as its forward applies it. Under autograd each chunk's
    gradient is taken in its forward (HeadLogps): no logits are kept for backward.
    """
    lm = causal_lm(model)
    mask = None if bool(attention_mask.all()) else attention_mask  # no padding: the causal fast path
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
    keep = completion_mask[:, 1:].bool()
    h = hidden[:, :-1][keep]  # [N, H]: only positions that predict a completion token
    targets = input_ids[:, 1:][keep]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(keep)[keep]
    head, transform = lm.get_output_embeddings(), logit_transform(lm.config)
    parts = []
    for start in range(0, h.shape[0], chunk):
        hc, tc = h[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and hc.requires_grad:
            if head.weight.requires_grad:
                raise ValueError("completion_logps: the LM head must be frozen (its gradient is not computed)")
            parts.append(HeadLogps.apply(hc, tc, head, transform))
        else:
            parts.append(token_logps(head, hc, tc, transform))
    per_token = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    return torch.zeros(input_ids.shape[0], device=input_ids.device, dtype=torch.float32).index_add(0, rows, per_token)


def dataset_logps(model, encoded: list[Encoded], batch_size: int, pad_id: int, device, chunk: int | None,
                  on_rows=None) -> torch.Tensor:
    """[N] completion log-probs of every encoded row under `model` as it is now, without gradients.
    `on_rows(done)`, when given, hears the number of rows done at the start and after every batch."""
    out = torch.zeros(len(encoded), dtype=torch.float32)
    was_training = model.training
    model.eval()  # safe on 4-bit CPU layers: loading.disable_cpu_repack keeps them differentiable
    done = 0
    with torch.no_grad():
        for batch in iter_batches(encoded, batch_size, pad_id):
            if on_rows is not None:
                on_rows(done)
            b = batch.to(device)
            out[batch.index] = completion_logps(model, b.input_ids, b.attention_mask, b.completion_mask, chunk).cpu()
            done += len(batch.index)
    if on_rows is not None and encoded:
        on_rows(done)
    model.train(was_training)
    return out


def reference_logps(model, encoded, batch_size, pad_id, device, chunk, cache_key: str | None = None,
                    on_rows=None, parallel=None) -> torch.Tensor:
    """One no-grad pass of the reference (adapters disabled) over a dataset; every later step reuses it.
    With a cache_key (qbco.model.refcache.cache_key) the result is read from, or written to, the disk cache, batch
    by batch: an interrupted pass keeps its finished batches (refcache.ReferenceInterrupted says how many).
    `on_rows` hears the pass's progress as in dataset_logps; a result read from the cache needs no pass and
    says nothing. With several processes (a qbco.train.distributed.Parallel) each computes its share of the rows,
    every one gets all the values, and rank 0 alone reads or writes the cache (Parallel.reference_pass)."""
    if parallel is not None and parallel.world > 1:
        return parallel.reference_pass(model, encoded, batch_size, pad_id, device, chunk, cache_key, on_rows)
    if cache_key is None or not encoded:
        with reference(model):
            return dataset_logps(model, encoded, batch_size, pad_id, device, chunk, on_rows)
    done = 0  # rows computed by this pass (a rerun skips those the cache's parts hold)

    def compute(rows: list[int]) -> torch.Tensor:
        nonlocal done
        if on_rows is not None:
            on_rows(done)
        b = collate(encoded, rows, pad_id).to(device)
        value = completion_logps(model, b.input_ids, b.attention_mask, b.completion_mask, chunk)
        done += len(rows)
        return value

    was_training = model.training
    model.eval()  # as in dataset_logps: safe on 4-bit CPU layers (loading.disable_cpu_repack)
    try:
        with reference(model):
            value = cached(cache_key, len(encoded), batch_order(encoded, batch_size), compute)
    finally:
        model.train(was_training)
    if on_rows is not None and done:
        on_rows(len(encoded))  # every row is known now, those from earlier parts too
    return value
