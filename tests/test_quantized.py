"""4-bit NF4 correctness on the CPU: LoRA gradients through bitsandbytes equal those through a float base
that holds the same dequantized weights, also after a no-grad evaluation pass (docs/pitfalls.md, 13), and
gradient checkpointing still trains every adapter (docs/pitfalls.md, 8)."""

import bitsandbytes as bnb
import pytest
import torch

from qbco.data.encoding import Encoded
from qbco.model.loading import load_base
from qbco.model.logprobs import completion_logps, dataset_logps
from qbco.model.lora import attach_lora
from qbco.model.recompute import recomputed_layers

CPU = torch.device("cpu")


def float_twin(q_model, folder):
    """A plain fp32 model whose linear weights are the dequantized NF4 weights of `q_model`; every other
    module (embeddings, norms, tied head) is the same fp32 tensor in both, so only bitsandbytes differs."""
    f_model = load_base(str(folder), load_in_4bit=False, dtype=torch.float32, device=CPU)
    q_modules = dict(q_model.named_modules())
    n = 0
    for name, module in f_model.named_modules():
        q = q_modules.get(name)
        if isinstance(q, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
            module.weight.data.copy_(w.reshape(module.weight.shape))
            n += 1
    assert n > 0
    return f_model


def with_lora(model, checkpointing=True):
    torch.manual_seed(7)
    peft_model = attach_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear", every_n_layers=1 if checkpointing else None)
    torch.manual_seed(8)  # non-zero A and B, identical in both models, so every adapter gets a gradient
    with torch.no_grad():
        for _name, p in sorted(peft_model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.05)
    peft_model.train()
    return peft_model


def lora_grads(peft_model, ids, attn, comp):
    peft_model.zero_grad(set_to_none=True)
    completion_logps(peft_model, ids, attn, comp).sum().backward()
    return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    q = load_base(str(tiny_model_dir), load_in_4bit=True, dtype=torch.float32, device=CPU)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in q.modules())
    f = float_twin(q, tiny_model_dir)
    return with_lora(q), with_lora(f)


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (3, 12), generator=g)
    attn = torch.ones_like(ids)
    comp = torch.zeros_like(ids)
    comp[:, 6:] = 1
    return ids, attn, comp


def assert_close(q_grads, f_grads):
    assert q_grads.keys() == f_grads.keys() and len(q_grads) > 0
    for name in q_grads:
        err = (q_grads[name] - f_grads[name]).norm() / f_grads[name].norm()
        assert err < 1e-3, f"{name}: relative error {err:.2e}"


def test_lora_gradients_on_4bit_equal_the_dequantized_float_base(models):
    q_model, f_model = models
    assert_close(lora_grads(q_model, *inputs()), lora_grads(f_model, *inputs()))


def test_gradients_stay_right_after_a_no_grad_eval_pass(models):
    """An evaluation / reference pass runs the 4-bit layers in eval mode without grad; on a CPU with
    avx512bf16 bitsandbytes would repack the weights for a kernel with no backward (docs/pitfalls.md, 13)."""
    q_model, f_model = models
    ids, attn, comp = inputs()
    rows = [Encoded(ids[i, :6].tolist(), ids[i, 6:].tolist(), True, False, False) for i in range(3)]
    dataset_logps(q_model, rows, batch_size=2, pad_id=0, device=CPU, chunk=1024)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in q_model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert_close(lora_grads(q_model, ids, attn, comp), lora_grads(f_model, ids, attn, comp))


def test_checkpointing_gives_every_fresh_lora_b_a_gradient(tiny_model_dir):
    """Fresh adapters (B = 0) under non-reentrant checkpointing: after one backward every lora_B has a
    non-zero gradient (the reentrant kind leaves them at None: docs/pitfalls.md, 8)."""
    torch.manual_seed(0)
    base = load_base(str(tiny_model_dir), load_in_4bit=True, dtype=torch.float32, device=CPU)
    model = attach_lora(base, r=4, alpha=8, dropout=0.0, targets="all-linear", every_n_layers=1)
    model.train()
    assert recomputed_layers(model) == [0, 1]
    completion_logps(model, *inputs()).sum().backward()
    b_grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert len(b_grads) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(g is not None and g.abs().sum() > 0 for g in b_grads.values())
