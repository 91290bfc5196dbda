"""A memory estimate from the model's config (docs/pitfalls.md, 11), and from it which decoder layers to checkpoint.

The estimate adds what the weights, the adapters with their optimizer state, the activations and the
log-prob chunk take, each with the knob that shrinks it. Parameter counts are exact for llama-style decoders.
The activations are counted per decoder layer as autograd keeps them (measured with saved-tensor hooks:
tests/test_memory.py), so the estimate can say what checkpointing every k-th layer costs, and
`--gradient-checkpointing auto` checkpoints as few layers as the memory budget allows: recomputing a layer
is a third of its work, and a user cares about time at a memory budget, not about which layers are
recomputed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

GiB = 2**30
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 absmax per 256 blocks
# What a CPU process holds beyond the run's tensors: the RSS after importing torch, transformers, peft and
# bitsandbytes (measured 0.42 GiB), with the tokenizer and loading's leftovers (W1: RSS 0.97 GiB when the
# reference pass begins, of which 0.23 GiB weights and adapters). On CUDA the estimate is compared with
# torch's own allocations, which leave the runtime out.
CPU_RUNTIME_BYTES = 0.75 * GiB
# The default budget on CUDA: the free device memory less this share of the card, for the caching
# allocator's fragmentation and what other kernels' workspaces take.
CUDA_MARGIN = 0.10
# The default budget on a CPU: a third of the RAM available when the run starts, and at most CPU_LEAN_FACTOR
# times what the run needs with every layer checkpointed. RAM is shared with the OS and every other process
# and nothing fails cleanly at its limit (the kernel kills a process), so qbco takes a modest share, and the
# same run picks the same layers on any machine with room for it. On W1 that is every 4th layer: 1.3x the
# speed of every layer at 0.62x TRL's peak (docs/performance.md).
CPU_SHARE = 1 / 3
CPU_LEAN_FACTOR = 2.5


# Logits per LM-head chunk when the chunk is not given in tokens: 2^24 float32 logits are 64 MiB, about three
# times that alive in a chunk's backward; 341 tokens with SmolLM2's 49,152-token vocabulary, 110 with Qwen2.5's.
CHUNK_LOGITS = 2**24


def chunk_tokens(vocab_size: int) -> int:
    """Completion tokens per LM-head chunk so that a chunk holds about CHUNK_LOGITS logits (16 at least)."""
    return max(16, CHUNK_LOGITS // vocab_size)


@dataclass
class Estimate:
    base_params: int  # every parameter of the base
    linear_params: int  # those in the decoder's linear layers (what 4-bit quantizes)
    lora_params: int
    weights_bytes: float
    lora_bytes: float  # LoRA weights, gradients and AdamW's two moments, all fp32
    logits_bytes: float
    n_layers: int
    layer_bytes: float  # one decoder layer's activations kept for its backward, at `tokens` positions
    boundary_bytes: float  # what a checkpointed layer keeps instead: its input hidden states
    runtime_bytes: float
    tokens: int  # positions in the largest decoder call: rows per batch x the longest row

    def checkpointed_layers(self, every_n: int | None) -> int:
        """Layers 0, k, 2k, ... are checkpointed (transformers' every_n_layers); None: none."""
        return 0 if every_n is None else math.ceil(self.n_layers / every_n)

    def activation_bytes(self, every_n: int | None) -> float:
        """What the decoder keeps for backward, plus one layer's activations alive in backward (a
        checkpointed layer's recompute, or the gradients of the layer being differentiated)."""
        c = self.checkpointed_layers(every_n)
        return c * self.boundary_bytes + (self.n_layers - c) * self.layer_bytes + self.layer_bytes

    def total(self, every_n: int | None) -> float:
        return self.runtime_bytes + self.weights_bytes + self.lora_bytes + self.activation_bytes(every_n) + self.logits_bytes

    def line(self, config, every_n: int | None | str = "config", budget: float | None = None) -> str:
        if every_n == "config":  # before a plan: what on / off say, auto's worst case (every layer)
            every_n = None if config.gradient_checkpointing == "off" else 1
        where = f", runtime {self.runtime_bytes / GiB:.2f} GiB" if self.runtime_bytes else ""
        over = ""
        if budget is not None and self.total(every_n) > budget:
            over = (" -- over the budget even with every layer checkpointed: lower --batch-size, "
                    "--max-prompt-length or --max-completion-length")
        return (
            f"memory estimate {self.total(every_n) / GiB:.2f} GiB"
            + (f" for a budget of {budget / GiB:.2f} GiB (--memory-budget)" if budget is not None else "")
            + f": weights {self.weights_bytes / GiB:.2f} GiB, LoRA + AdamW {self.lora_bytes / GiB:.2f} GiB, "
            f"activations {self.activation_bytes(every_n) / GiB:.2f} GiB at {self.tokens} positions "
            f"(--batch-size, --max-prompt-length, --max-completion-length) with {describe(self.n_layers, every_n)} "
            f"(--gradient-checkpointing {config.gradient_checkpointing}), "
            f"log-prob chunk {self.logits_bytes / GiB:.2f} GiB (--logprob-chunk){where}{over}"
        )


def describe(n_layers: int, every_n: int | None) -> str:
    """'every layer checkpointed', 'every 4th layer checkpointed (8 of 30)', 'no layer checkpointed'."""
    if every_n is None:
        return "no layer checkpointed"
    if every_n == 1:
        return "every layer checkpointed"
    c = math.ceil(n_layers / every_n)
    nth = {2: "2nd", 3: "3rd"}.get(every_n, f"{every_n}th")
    return f"every {nth} layer checkpointed ({c} of {n_layers})"


def rows_per_call(config) -> int:
    """Rows in one decoder call under autograd: a micro-batch (dpo: a pair per unit, so twice as many)."""
    return config.batch_size * (2 if config.loss == "dpo" else 1)


def estimate(hf_config, config, dtype_bytes: int, longest_row: int | None = None, device_type: str = "cpu") -> Estimate:
    """hf_config: a transformers PretrainedConfig of a llama-style decoder; config: a TrainConfig.
    longest_row: the longest encoded row (prompt + completion tokens) of the run; None: the configured maxima."""
    h, n_layers, vocab = hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.vocab_size
    inter = hf_config.intermediate_size
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    hd = getattr(hf_config, "head_dim", None) or h // heads
    shapes = [(h, heads * hd), (h, kv * hd), (h, kv * hd), (heads * hd, h), (h, inter), (h, inter), (inter, h)]
    linear = n_layers * sum(i * o for i, o in shapes)
    bias = n_layers * (heads * hd + 2 * kv * hd) if getattr(hf_config, "attention_bias", False) else 0
    embeddings = vocab * h * (1 if getattr(hf_config, "tie_word_embeddings", False) else 2)
    norms = (2 * n_layers + 1) * h
    # shapes follow LLAMA_LINEARS; a --lora-targets list adapts the layers it names (as peft matches them, by name)
    wanted = None if config.lora_targets == "all-linear" else {t.strip() for t in config.lora_targets.split(",")}
    lora = n_layers * sum(config.lora_r * (i + o) for name, (i, o) in zip(LLAMA_LINEARS, shapes) if wanted is None or name in wanted)
    adapted = sum(1 for name in LLAMA_LINEARS if wanted is None or name in wanted)
    row = longest_row if longest_row is not None else config.max_prompt_length + config.max_completion_length
    tokens = rows_per_call(config) * row
    q = heads * hd
    # Per position, as autograd keeps it for a layer that is not checkpointed (saved-tensor hooks:
    # tests/test_memory.py): the MLP's gate, up, silu(gate) and their product (4 x intermediate); the two
    # norm outputs, the rotated queries and the attention output (4 x hidden); keys and values, repeated to
    # every query head when the batch is padded (2 x q; 2 x kv without padding: less); both RMSNorms' inputs
    # in float32 (2 x hidden); each adapter's [r] down-projection in the adapters' float32; the attention's
    # log-sum-exp per head and the norms' 1/rms.
    per_position = (4 * inter + 4 * h + 2 * q) * dtype_bytes + 2 * h * 4 + adapted * config.lora_r * 4 + (heads + 2) * 4
    per_chunk = config.logprob_chunk or chunk_tokens(vocab)
    chunk = min(per_chunk, rows_per_call(config) * min(row, config.max_completion_length))
    return Estimate(
        base_params=linear + bias + embeddings + norms,
        linear_params=linear,
        lora_params=lora,
        weights_bytes=(linear * NF4_BYTES if config.load_in_4bit else linear * dtype_bytes) + (embeddings + norms + bias) * dtype_bytes,
        lora_bytes=16 * lora,
        logits_bytes=3 * chunk * vocab * 4,  # fp32 logits, their exp and their gradient, one chunk at a time
        n_layers=n_layers,
        layer_bytes=tokens * per_position,
        boundary_bytes=tokens * h * dtype_bytes,
        runtime_bytes=CPU_RUNTIME_BYTES if device_type == "cpu" else 0.0,
        tokens=tokens,
    )


def choose_every_n(est: Estimate, budget: float) -> int | None:
    """The fewest checkpointed layers whose estimate fits `budget` (bytes): None (no checkpointing) if it
    fits, else the largest k with every k-th layer checkpointed, else 1 (every layer: the least there is)."""
    for every_n in (None, *range(est.n_layers, 0, -1)):
        if est.total(every_n) <= budget:
            return every_n
    return 1


def available_ram() -> float:
    """Bytes of RAM available to a new allocation (Linux MemAvailable; elsewhere the physical memory)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget(device, lean: float) -> float:
    """Bytes the run may use when --memory-budget is not given: on CUDA the free device memory less a
    margin (CUDA_MARGIN of the card); on a CPU, CPU_SHARE of the RAM available now and at most
    CPU_LEAN_FACTOR x `lean` (the estimate with every layer checkpointed)."""
    if device.type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        return max(0.0, free - CUDA_MARGIN * total)
    return min(CPU_SHARE * available_ram(), CPU_LEAN_FACTOR * lean)


@dataclass
class Plan:
    """Which layers a run checkpoints, and why: the line the run prints and its summary shows."""

    every_n: int | None
    budget: float | None  # bytes; None unless --gradient-checkpointing auto
    estimate: Estimate

    def summary(self) -> str:
        text = describe(self.estimate.n_layers, self.every_n)
        text += f", estimate {self.estimate.total(self.every_n) / GiB:.2f} GiB"
        return text + (f" for a budget of {self.budget / GiB:.2f} GiB" if self.budget is not None else "")


def plan(hf_config, config, dtype_bytes: int, longest_row: int, device) -> Plan:
    """--gradient-checkpointing on: every layer; off: none; auto: choose_every_n against the budget
    (--memory-budget GiB, or default_budget)."""
    est = estimate(hf_config, config, dtype_bytes, longest_row, device.type)
    if config.gradient_checkpointing == "on":
        return Plan(1, None, est)
    if config.gradient_checkpointing == "off":
        return Plan(None, None, est)
    budget = config.memory_budget * GiB if config.memory_budget is not None else default_budget(device, est.total(1))
    return Plan(choose_every_n(est, budget), budget, est)


def out_of_memory_message(p: Plan | None, config, where: str) -> str:
    """What to change after running out of memory: checkpoint more layers first (it costs only time),
    then shrink the work."""
    shrink = "lower --batch-size (and raise --grad-accum to keep the step), --max-prompt-length or --max-completion-length"
    if p is None:
        return f"out of memory {where}: {shrink}"
    now = describe(p.estimate.n_layers, p.every_n)
    estimate_text = f"the estimate was {p.estimate.total(p.every_n) / GiB:.2f} GiB"
    if p.every_n == 1:
        return f"out of memory {where} with {now} ({estimate_text}): {shrink}"
    if p.budget is not None:
        return (f"out of memory {where} with {now} ({estimate_text} for a budget of {p.budget / GiB:.2f} GiB): "
                f"lower --memory-budget below {p.budget / GiB:.1f} so that more layers are checkpointed, "
                f"or --gradient-checkpointing on; else {shrink}")
    return f"out of memory {where} with {now} ({estimate_text}): use --gradient-checkpointing auto or on; else {shrink}"
