"""A memory estimate from the model's config, printed before anything is loaded (docs/pitfalls.md, 11): what the
weights, the adapters with their optimizer state, the activations and the log-prob chunk will take, each
with the knob that shrinks it. Parameter counts are exact for llama-style decoders; activations are rough."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 absmax per 256 blocks


@dataclass
class Estimate:
    base_params: int  # every parameter of the base
    linear_params: int  # those in the decoder's linear layers (what 4-bit quantizes)
    lora_params: int
    weights_bytes: float
    lora_bytes: float  # LoRA weights, gradients and AdamW's two moments, all fp32
    activation_bytes: float
    logits_bytes: float

    def line(self, config) -> str:
        tokens = config.max_prompt_length + config.max_completion_length
        ckpt = "on" if config.gradient_checkpointing else "off"
        return (
            f"memory estimate: weights {self.weights_bytes / GiB:.2f} GiB, LoRA + AdamW {self.lora_bytes / GiB:.2f} GiB, "
            f"activations ~{self.activation_bytes / GiB:.2f} GiB at {config.batch_size} x {tokens} tokens "
            f"(--batch-size, --max-prompt-length, --max-completion-length; checkpointing {ckpt}), "
            f"log-prob chunk {self.logits_bytes / GiB:.2f} GiB (--logprob-chunk)"
        )


def estimate(hf_config, config, dtype_bytes: int) -> Estimate:
    """hf_config: a transformers PretrainedConfig of a llama-style decoder; config: a TrainConfig."""
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
    tokens = config.batch_size * (config.max_prompt_length + config.max_completion_length)
    layer_peak = tokens * (6 * h + 4 * inter) * dtype_bytes  # one layer's activations, held for its backward
    saved = tokens * h * dtype_bytes * n_layers if config.gradient_checkpointing else layer_peak * n_layers
    from qbco.logprobs import chunk_tokens

    per_chunk = config.logprob_chunk or chunk_tokens(vocab)
    chunk = min(per_chunk, config.batch_size * config.max_completion_length)
    return Estimate(
        base_params=linear + bias + embeddings + norms,
        linear_params=linear,
        lora_params=lora,
        weights_bytes=(linear * NF4_BYTES if config.load_in_4bit else linear * dtype_bytes) + (embeddings + norms + bias) * dtype_bytes,
        lora_bytes=16 * lora,
        activation_bytes=saved + layer_peak,
        logits_bytes=3 * chunk * vocab * 4,  # fp32 logits, their exp and their gradient, one chunk at a time
    )
