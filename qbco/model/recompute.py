"""Activation recompute ("gradient checkpointing", the flag's name in transformers): which decoder layers keep
only their inputs in forward and recompute the rest in backward. Not to be confused with a run's checkpoints
(qbco.train.checkpoint), the saved training state."""

from __future__ import annotations

import torch

from qbco.model.device import compute_dtype
from qbco.model.memory import Plan, plan


def enable_recompute(model, every_n_layers: int | None) -> None:
    """Recompute decoder layers 0, n, 2n, ... (transformers' own `every_n_layers`; 1: every layer) or, with
    None, none. Non-reentrant: it gives LoRA gradients even though no input requires grad (the reentrant kind
    trains nothing: docs/pitfalls.md, 8). May be called again on the same model to change n."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.use_cache = False
    if every_n_layers is None:
        if recomputed_layers(base):
            off = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
            off()
            base.disable_input_require_grads()  # the embedding hook that enabling added: no use without it
        return
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)


def recomputed_layers(model) -> list[int]:
    """Indices of the decoder layers that recompute their activations in backward."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    return [i for i, m in enumerate(layers) if m.gradient_checkpointing]


def apply_recompute(model, config, encoded, device: torch.device, chosen: Plan | None = None) -> Plan | None:
    """The run's recompute plan (qbco.model.memory.plan at its longest encoded row, from
    --gradient-checkpointing and --memory-budget), set on the model; returns the plan, whose estimate line the
    run prints and whose summary it reports (None where the model's config gives no estimate: then every
    layer unless off)."""
    if chosen is not None:  # planned before the model loaded (qbco.train.prepare.memory_plan): the line already said
        enable_recompute(model, chosen.every_n)
        return chosen
    longest = max((len(e) for e in encoded), default=config.max_prompt_length + config.max_completion_length)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        p = plan(base.config, config, compute_dtype(config.dtype, device).itemsize, longest, device)
    except (AttributeError, TypeError):  # not a llama-style decoder config: no estimate, the safe choice
        enable_recompute(model, None if config.gradient_checkpointing == "off" else 1)
        return None
    enable_recompute(model, p.every_n)
    return p
