"""LoRA on a frozen linear layer (4-bit or float) as one autograd function, the LoRA term added in place.

    y = x W^T + b + s (x' A^T) B^T          x' = dropout(x), s = alpha / r

peft computes the same sum as `base(x).clone() + lora_B(lora_A(dropout(x))) * s`: beyond the base output
that is four [tokens, out] tensors per layer and call (the clone, B's output, the scaled copy, the sum), each
a full pass over memory. On a CPU the fused form made a W1 step 4% faster and its peak RSS a third lower
(bench/step_ablation.py, docs/performance.md).
Here the LoRA term goes into the base output with one `addmm_`, and backward needs only

    dL/dx  = g W + s (g B) A   (the second term goes to x' when dropout is on)
    dL/dB  = s g^T (x' A^T)
    dL/dA  = s (g B)^T x'

with the scale applied to the [tokens, r] factors. W is frozen; a 4-bit W is dequantized again in backward,
as bitsandbytes does, never stored. The base output comes from the layer itself, so the 4-bit kernels are
bitsandbytes' own. Anything else peft supports (several active adapters, DoRA, merged or disabled adapters,
autocast) takes peft's own forward.
"""

from __future__ import annotations

import types

import torch


def _frozen_weight(layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """[out, in] weight of a bitsandbytes Linear4bit (dequantized) or an nn.Linear, in `dtype`."""
    weight = layer.weight
    # Under FSDP the gathered 4-bit weight is a plain tensor; bitsandbytes keeps the state on the layer too.
    state = getattr(weight, "quant_state", None) or getattr(layer, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data.view(-1, 1), state).to(dtype)
    return weight.to(dtype)


class LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_lora, lora_a, lora_b, scaling: float, layer: torch.nn.Module):
        # x: [N, in] as the layer receives it; x_lora: dropout(x) in the adapter dtype, or None for identity.
        with torch.no_grad():
            y = layer(x)
            xl = x.to(lora_a.dtype) if x_lora is None else x_lora
            xa = xl @ lora_a.t()  # [N, r]
            y.addmm_(xa.to(y.dtype), lora_b.t().to(y.dtype), alpha=scaling)
        ctx.save_for_backward(x if x_lora is None else x_lora, xa, lora_a, lora_b)
        ctx.scaling, ctx.layer, ctx.identity = scaling, layer, x_lora is None
        return y

    @staticmethod
    def backward(ctx, g):
        xl, xa, lora_a, lora_b = ctx.saved_tensors
        s, dtype = ctx.scaling, lora_a.dtype
        xl = xl.to(dtype)
        g_lora = g.to(dtype)
        gb = (g_lora @ lora_b).mul_(s)  # [N, r]: s (g B)
        grad_a = gb.t() @ xl if ctx.needs_input_grad[2] else None
        grad_b = g_lora.t() @ (xa * s) if ctx.needs_input_grad[3] else None
        grad_x = grad_x_lora = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ _frozen_weight(ctx.layer, g.dtype)
            if ctx.identity:
                grad_x.addmm_(gb.to(g.dtype), lora_a.to(g.dtype))
        if not ctx.identity and ctx.needs_input_grad[1]:
            grad_x_lora = gb @ lora_a
        return grad_x, grad_x_lora, grad_a, grad_b, None, None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Replaces a peft LoRA layer's forward; falls back to peft's own outside plain single-adapter LoRA."""
    adapters = self.active_adapters
    plain = (
        not args
        and not kwargs
        and not self.disable_adapters
        and not self.merged
        and len(adapters) == 1
        and adapters[0] in self.lora_A
        and adapters[0] not in getattr(self, "lora_variant", {})
        and not torch.is_autocast_enabled()
    )
    if not plain:
        return self._peft_forward(x, *args, **kwargs)
    name = adapters[0]
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    dropout = self.lora_dropout[name]
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    identity = isinstance(dropout, torch.nn.Identity) or not dropout.training or dropout.p == 0
    x_lora = None if identity else dropout(x2.to(lora_a.dtype))
    y = LoRALinear.apply(x2, x_lora, lora_a, lora_b, float(self.scaling[name]), self.get_base_layer())
    return y.reshape(*shape[:-1], y.shape[-1])


def fuse_lora(model: torch.nn.Module) -> int:
    """Give every peft LoRA layer over a Linear4bit or nn.Linear the fused forward; returns how many."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or hasattr(module, "_peft_forward"):
            continue
        base = module.get_base_layer()
        if type(base) not in (torch.nn.Linear, bnb.nn.Linear4bit):
            continue
        module._peft_forward = module.forward
        module.forward = types.MethodType(_fused_forward, module)
        count += 1
    return count


def unfuse_lora(model: torch.nn.Module) -> None:
    """Put peft's own forward back on every fused layer (the straightforward path for comparisons)."""
    for module in model.modules():
        if "_peft_forward" in module.__dict__:
            del module.__dict__["forward"], module.__dict__["_peft_forward"]
