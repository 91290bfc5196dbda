"""LoRA adapters on a frozen base, and the reference policy: the same model with its adapters disabled, never
a second copy (docs/pitfalls.md, 10)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from qbco.model.fused_lora import fuse_lora
from qbco.model.recompute import enable_recompute

# Never LoRA these: a LoRA on a tied lm_head changes the input embeddings too (docs/pitfalls.md, 12).
EXCLUDED_TARGETS = ("lm_head", "embed_tokens")


def lora_target_modules(model: torch.nn.Module, targets: str) -> list[str]:
    """Names of the decoder's linear layers to adapt: every one ('all-linear') or a given list."""
    if targets != "all-linear":
        return [t.strip() for t in targets.split(",") if t.strip()]
    import bitsandbytes as bnb

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, bnb.nn.Linear4bit)):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in EXCLUDED_TARGETS:
                names.add(leaf)
    return sorted(names)


def attach_lora(model, r: int, alpha: int, dropout: float, targets: str, every_n_layers: int | None = 1):
    """A PeftModel with fresh adapters (B = 0, so policy == reference at step 0), recomputing every
    `every_n_layers`-th decoder layer in backward (None: none; see recompute.enable_recompute)."""
    from peft import LoraConfig, get_peft_model

    enable_recompute(model, every_n_layers)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_modules(model, targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # autocast_adapter_dtype (peft's default) keeps the adapters in fp32 under a bf16 base.
    peft_model = get_peft_model(model, config)
    fuse_lora(peft_model)  # the same sums as peft's forward, without its four extra passes per layer
    return peft_model


@contextmanager
def reference(model):
    """The reference policy: the same PeftModel with its adapters disabled, without gradients."""
    with model.disable_adapter(), torch.no_grad():
        yield model
