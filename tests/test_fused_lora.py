"""qbco.model.fused_lora against peft's own LoRA forward (the unpatched layers, an independent implementation):
the same outputs and the same gradients for every adapter and for the input, on a float and on a 4-bit
NF4 base, with and without dropout, in training under checkpointing and in evaluation. Where peft does
something the fused path does not cover (adapters disabled, merged), peft's forward runs."""

import copy

import bitsandbytes as bnb
import pytest
import torch

from qbco.model.fused_lora import LoRALinear, fuse_lora, unfuse_lora
from qbco.model.loading import load_base
from qbco.model.lora import attach_lora

CPU = torch.device("cpu")


def unfused(model):
    """The same PeftModel with peft's own forward back on every layer (the instance attribute removed)."""
    twin = copy.deepcopy(model)
    unfuse_lora(twin)
    return twin


def lora_model(base, dropout):
    torch.manual_seed(7)
    model = attach_lora(base, r=4, alpha=8, dropout=dropout, targets="all-linear", every_n_layers=1)
    torch.manual_seed(8)  # non-zero B, so the LoRA term is in the output and every gradient is non-zero
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def run(model, ids, seed=5):
    """Logits and the gradients of every adapter and of the input embeddings for a fixed loss."""
    model.train()
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout masks in both models
    logits = model(inputs_embeds=embeds).logits
    (logits.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads, embeds.grad.clone()


@pytest.fixture(scope="module")
def bases(tiny_model_dir):
    return {
        "float": lambda: load_base(str(tiny_model_dir), load_in_4bit=False, dtype=torch.float32, device=CPU),
        "nf4": lambda: load_base(str(tiny_model_dir), load_in_4bit=True, dtype=torch.float32, device=CPU),
    }


@pytest.mark.parametrize("kind", ["float", "nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_equals_peft_in_outputs_and_every_gradient(bases, kind, dropout):
    fused = lora_model(bases[kind](), dropout)  # qbco.model.loading.attach_lora fuses every layer
    assert sum("_peft_forward" in m.__dict__ for m in fused.modules()) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    if kind == "nf4":
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in fused.modules())
    plain = unfused(fused)
    ids = torch.randint(3, 60, (3, 11), generator=torch.Generator().manual_seed(1))
    calls = []
    original = LoRALinear.apply
    LoRALinear.apply = lambda *a: calls.append(1) or original(*a)
    try:
        f_logits, f_grads, f_input = run(fused, ids)
    finally:
        LoRALinear.apply = original
    p_logits, p_grads, p_input = run(plain, ids)

    assert len(calls) == 2 * 14  # every layer fused, forward and checkpoint recompute
    assert torch.allclose(f_logits, p_logits, rtol=1e-5, atol=1e-6)
    assert f_grads.keys() == p_grads.keys() and len(f_grads) == 28
    for name in p_grads:
        assert p_grads[name].abs().sum() > 0
        err = (f_grads[name] - p_grads[name]).norm() / p_grads[name].norm()
        assert err < 1e-5, f"{name}: relative error {err:.2e}"
    assert torch.allclose(f_input, p_input, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("four_bit", [False, True])
def test_bf16_compute_matches_peft(tiny_model_dir, four_bit):
    """The dtype path of a CUDA run (bf16 base and activations, fp32 adapters), here on the CPU."""
    base = load_base(str(tiny_model_dir), load_in_4bit=four_bit, dtype=torch.bfloat16, device=CPU)
    fused = lora_model(base, 0.0)
    plain = unfused(fused)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(3))
    f_logits, f_grads, f_input = run(fused, ids)
    p_logits, p_grads, _ = run(plain, ids)
    assert f_logits.dtype == torch.bfloat16 and f_input.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in f_grads.values())
    assert (f_logits.float() - p_logits.float()).abs().max() < 0.05 * p_logits.float().abs().max()
    for name in p_grads:
        err = (f_grads[name] - p_grads[name]).norm() / p_grads[name].norm()
        assert err < 0.05, f"{name}: relative error {err:.2e}"


def test_eval_and_disabled_adapters_match_peft(bases):
    fused = lora_model(bases["nf4"](), 0.2)
    plain = unfused(fused)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(2))
    fused.eval(), plain.eval()
    with torch.no_grad():
        assert torch.allclose(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
        with fused.disable_adapter(), plain.disable_adapter():
            off = fused(input_ids=ids).logits
            assert torch.allclose(off, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(off, fused(input_ids=ids).logits, atol=1e-4)  # the adapters do matter


def test_fusing_twice_changes_nothing(bases):
    model = unfused(lora_model(bases["float"](), 0.0))
    assert fuse_lora(model) == 14
    assert fuse_lora(model) == 0
