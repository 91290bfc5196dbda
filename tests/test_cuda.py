"""The fused LoRA layer and the LM head's gradient on CUDA in bf16, as a GPU run computes them, against the
straightforward computation (peft's own LoRA forward; full logits, log_softmax, gather). Skipped without
CUDA; bench/gpu/run.sh runs them on a GPU machine. QBCO_CUDA_TESTS_ON_CPU=1 runs the same code on the CPU
(the dry run of that script)."""

import os

import pytest
import torch
from test_fused_lora import lora_model, run, unfused
from test_logprobs import straightforward

from qbco.model.loading import load_base
from qbco.model.logprobs import completion_logps


@pytest.fixture(scope="module")
def device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("QBCO_CUDA_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip("no CUDA device")


@pytest.mark.parametrize("four_bit", [False, True])
def test_fused_lora_in_bf16_matches_peft(tiny_model_dir, device, four_bit):
    """bf16 base and activations, fp32 adapters: outputs within 5% of the largest logit, every adapter's
    gradient within 5% (relative norm) of peft's, and the layers really are 4-bit where asked."""
    import bitsandbytes as bnb

    base = load_base(str(tiny_model_dir), load_in_4bit=four_bit, dtype=torch.bfloat16, device=device)
    fused = lora_model(base, 0.0)
    if four_bit:
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in fused.modules())
    assert next(p for p in fused.parameters() if p.requires_grad).device.type == device.type
    plain = unfused(fused)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(3)).to(device)
    f_logits, f_grads, f_input = run(fused, ids)
    p_logits, p_grads, _ = run(plain, ids)
    assert f_logits.dtype == torch.bfloat16 and f_input.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in f_grads.values())
    assert (f_logits.float() - p_logits.float()).abs().max() < 0.05 * p_logits.float().abs().max()
    for name in p_grads:
        assert p_grads[name].abs().sum() > 0
        err = (f_grads[name] - p_grads[name]).norm() / p_grads[name].norm()
        assert err < 0.05, f"{name}: relative error {err:.2e}"


def test_head_gradient_in_bf16_matches_full_logits(tiny_model_dir, device):
    """completion_logps (LM head in chunks, its gradient taken in forward) against full logits on an NF4 base
    with LoRA in bf16: the same log-probs and the same LoRA gradients, to bf16's precision."""
    base = load_base(str(tiny_model_dir), load_in_4bit=True, dtype=torch.bfloat16, device=device)
    model = lora_model(base, 0.0)
    model.train()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 60, (3, 14), generator=g).to(device)
    attn = torch.ones_like(ids)
    attn[2, 10:] = 0
    comp = torch.zeros_like(ids)
    comp[:, 6:] = attn[:, 6:]
    params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    fast = completion_logps(model, ids, attn, comp, chunk=4)  # 23 completion tokens in chunks of 4
    g_fast = torch.autograd.grad(fast.sum(), params)
    slow = straightforward(model, ids, attn, comp)
    g_slow = torch.autograd.grad(slow.sum(), params)
    assert fast.dtype == torch.float32
    assert torch.allclose(fast, slow, rtol=0.02, atol=0.05 * float(slow.detach().abs().max()))
    for a, b in zip(g_fast, g_slow):
        assert b.abs().sum() > 0
        assert (a - b).norm() / b.norm() < 0.05
