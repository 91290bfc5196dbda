"""The memory estimate against the real models: parameter counts (transformers' and peft's own), the activations
a layer keeps (autograd's saved tensors), and which layers a budget checkpoints."""

import pytest
import torch
from transformers import AutoConfig

import qbco.model.memory as qmemory
from qbco.model.loading import load_base
from qbco.model.lora import attach_lora
from qbco.model.memory import Estimate, GiB, choose_every_n, estimate, plan
from qbco.model.recompute import enable_recompute, recomputed_layers
from qbco.run.config import TrainConfig


def test_counts_match_the_real_model_and_adapters(tiny_model_dir):
    hf_config = AutoConfig.from_pretrained(tiny_model_dir)
    config = TrainConfig(lora_r=4, load_in_4bit=False)
    est = estimate(hf_config, config, dtype_bytes=4)
    base = load_base(str(tiny_model_dir), load_in_4bit=False, dtype=torch.float32, device=torch.device("cpu"))
    assert est.base_params == base.num_parameters()
    model = attach_lora(base, r=4, alpha=8, dropout=0.0, targets="all-linear", every_n_layers=None)
    assert est.lora_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("targets", ["q_proj,v_proj", "q_proj, k_proj, v_proj, o_proj", "gate_proj,up_proj,down_proj", "o_proj"])
def test_lora_counts_for_a_list_of_targets_match_peft(tiny_model_dir, targets):
    """A --lora-targets list printed 0 GiB for the adapters; the count is peft's own for every list."""
    hf_config = AutoConfig.from_pretrained(tiny_model_dir)
    config = TrainConfig(lora_r=4, load_in_4bit=False, lora_targets=targets)
    est = estimate(hf_config, config, dtype_bytes=4)
    base = load_base(str(tiny_model_dir), load_in_4bit=False, dtype=torch.float32, device=torch.device("cpu"))
    model = attach_lora(base, r=4, alpha=8, dropout=0.0, targets=targets, every_n_layers=None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert est.lora_params == trainable > 0
    assert est.lora_bytes == 16 * trainable  # fp32 weights, gradients and AdamW's two moments


def test_qwen_scale_figures_are_what_the_hand_arithmetic_says():
    """Qwen2.5-3B shape: hidden 2048, 36 layers, intermediate 11008, 16 heads / 2 kv heads of 128, vocab 151936,
    tied. Linear params = 36 x (2048*2048 + 2*2048*256 + 2048*2048 + 3*2048*11008) = 36 x 77,070,336 = 2,774,532,096.
    The default chunk holds 2^24 // 151,936 = 110 positions: 110 x 151,936 fp32 logits = 63.8 MiB, x3 = 191 MiB;
    a chunk of 1024 positions = 0.58 GiB, x3 = 1.74 GiB."""
    from transformers import Qwen2Config

    hf = Qwen2Config(hidden_size=2048, num_hidden_layers=36, intermediate_size=11008, num_attention_heads=16,
                     num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    est = estimate(hf, TrainConfig(max_prompt_length=1536, max_completion_length=512), dtype_bytes=2)
    assert est.linear_params == 2_774_532_096
    assert est.logits_bytes == 3 * 110 * 151936 * 4
    tokens = estimate(hf, TrainConfig(max_prompt_length=1536, max_completion_length=512, logprob_chunk=1024), dtype_bytes=2)
    assert abs(tokens.logits_bytes / GiB - 3 * 1024 * 151936 * 4 / GiB) < 1e-9
    assert 1.3 < est.weights_bytes / GiB < 2.3  # 2.77 B params in NF4 plus bf16 embeddings


def saved_bytes_per_layer(model, ids, attn, comp):
    """Bytes autograd keeps for backward inside each decoder layer's forward (saved-tensor hooks, each
    storage counted once; parameters, and what every layer shares such as the mask and the rotary tables,
    left out): the independent measurement the estimate's per-layer figure is checked against."""
    from qbco.model.logprobs import causal_lm, completion_logps

    current, seen = {"layer": None}, {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layers = causal_lm(model).model.layers
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: current.update(layer=i)))
        handles.append(layer.register_forward_hook(lambda m, a, o: current.update(layer=None)))

    def pack(t):
        storage = t.untyped_storage()
        if current["layer"] is not None and storage.data_ptr() not in params:
            seen.setdefault(current["layer"], {})[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        completion_logps(model, ids, attn, comp)
    for h in handles:
        h.remove()
    shared = set.intersection(*(set(v) for v in seen.values()))
    return {i: sum(n for ptr, n in v.items() if ptr not in shared) for i, v in seen.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_per_layer_activations_are_what_autograd_keeps(tmp_path, dtype, load_in_4bit):
    """A 3-layer llama (hidden 64, intermediate 128, 4 heads, 2 kv heads of 16), LoRA r=4 on every linear
    layer, a batch of 2 x 24 with one padded row: a layer that is not checkpointed keeps within 3% of the
    estimate's layer_bytes, a checkpointed one exactly its input (boundary_bytes). In fp32 the count is, per
    position, 4 x 128 (MLP) + 8 x 64 (norm inputs and outputs, queries, keys and values repeated to 4 heads,
    attention output) + 7 x 4 (adapters) + 4 + 2 = 1058 floats."""
    from conftest import make_tiny_llama

    folder = tmp_path / "m"
    make_tiny_llama(300, layers=3).save_pretrained(folder)
    hf_config = AutoConfig.from_pretrained(folder)
    config = TrainConfig(lora_r=4, batch_size=2, load_in_4bit=load_in_4bit)
    ids = torch.randint(3, 300, (2, 24))
    attn = torch.ones(2, 24, dtype=torch.long)
    attn[1, 20:] = 0
    comp = torch.zeros(2, 24, dtype=torch.long)
    comp[:, 12:] = attn[:, 12:]
    est = estimate(hf_config, config, dtype_bytes=dtype.itemsize, longest_row=24)
    for every_n, expected in ((None, est.layer_bytes), (1, est.boundary_bytes)):
        base = load_base(str(folder), load_in_4bit=load_in_4bit, dtype=dtype, device=torch.device("cpu"))
        model = attach_lora(base, r=4, alpha=8, dropout=0.0, targets="all-linear", every_n_layers=every_n)
        model.train()
        measured = saved_bytes_per_layer(model, ids, attn, comp)
        for layer in (1, 2):  # layer 0's input is the embedding output, which needs no gradient without checkpointing
            if every_n is None:
                assert measured[layer] == pytest.approx(expected, rel=0.03), (layer, measured[layer], expected)
            else:
                assert measured[layer] == expected


def test_fewer_checkpointed_layers_cost_what_the_estimate_adds():
    """Hand arithmetic on an Estimate of 4 layers, 10 bytes a layer, 1 byte a checkpointed layer, nothing else:
    none checkpointed 4 x 10 + 10 (backward) = 50; every 4th (layer 0): 1 + 3 x 10 + 10 = 41; every 3rd or
    2nd (two layers): 2 + 20 + 10 = 32; every layer: 4 + 10 = 14. The choice is the fewest that fit."""
    est = Estimate(base_params=0, linear_params=0, lora_params=0, weights_bytes=0, lora_bytes=0, logits_bytes=0,
                   n_layers=4, layer_bytes=10, boundary_bytes=1, runtime_bytes=0, tokens=1)
    assert [est.total(k) for k in (None, 4, 3, 2, 1)] == [50, 41, 32, 32, 14]
    assert [choose_every_n(est, b) for b in (60, 50, 45, 41, 35, 32, 20, 14, 5)] == [None, None, 4, 4, 3, 3, 1, 1, 1]


def test_plan_follows_the_flag_and_the_budget(tiny_model_dir, monkeypatch):
    hf_config = AutoConfig.from_pretrained(tiny_model_dir)
    cpu = torch.device("cpu")
    on = plan(hf_config, TrainConfig(gradient_checkpointing="on"), 4, 50, cpu)
    off = plan(hf_config, TrainConfig(gradient_checkpointing="off"), 4, 50, cpu)
    assert (on.every_n, on.budget, off.every_n, off.budget) == (1, None, None, None)
    est = on.estimate
    roomy = plan(hf_config, TrainConfig(memory_budget=est.total(None) / GiB), 4, 50, cpu)
    tight = plan(hf_config, TrainConfig(memory_budget=est.total(2) / GiB), 4, 50, cpu)  # 2 layers: 2 fits, 3 not
    assert (roomy.every_n, tight.every_n, tight.budget) == (None, 2, est.total(2))
    # The default budget on a CPU: a share of the RAM available now, at most a multiple of the leanest estimate.
    monkeypatch.setattr(qmemory, "available_ram", lambda: 100 * GiB)
    default = plan(hf_config, TrainConfig(), 4, 50, cpu)
    assert default.budget == pytest.approx(qmemory.CPU_LEAN_FACTOR * est.total(1))
    monkeypatch.setattr(qmemory, "available_ram", lambda: 1 * GiB)
    scarce = plan(hf_config, TrainConfig(), 4, 50, cpu)
    assert scarce.budget == pytest.approx(qmemory.CPU_SHARE * GiB) and scarce.every_n == 1
    assert "for a budget of" in default.summary() and "checkpointed" in default.summary()


def test_cuda_default_budget_is_the_free_memory_less_the_margin(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 * GiB, 80 * GiB))
    assert qmemory.default_budget(torch.device("cuda"), GiB) == pytest.approx(30 * GiB - qmemory.CUDA_MARGIN * 80 * GiB)


def test_only_the_checkpointed_layers_run_twice(tmp_path):
    """Every 2nd of 4 layers: layers 0 and 2 run their forward again in backward, 1 and 3 do not; then the
    same model switched to none and to every layer (enable_recompute changes it in place)."""
    from conftest import make_tiny_llama

    from qbco.model.logprobs import causal_lm, completion_logps

    folder = tmp_path / "m"
    make_tiny_llama(300, layers=4).save_pretrained(folder)
    base = load_base(str(folder), load_in_4bit=False, dtype=torch.float32, device=torch.device("cpu"))
    model = attach_lora(base, r=4, alpha=8, dropout=0.0, targets="all-linear", every_n_layers=2)
    model.train()
    calls = [0] * 4
    for i, layer in enumerate(causal_lm(model).model.layers):
        # a pre-hook: the recompute stops early, once the last saved tensor is made again, before any hook after
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(3, 300, (2, 16))
    mask, comp = torch.ones_like(ids), torch.cat([torch.zeros(2, 8), torch.ones(2, 8)], 1).long()

    def one_step():
        calls[:] = [0] * 4
        completion_logps(model, ids, mask, comp).sum().backward()
        return list(calls)

    assert recomputed_layers(model) == [0, 2]
    assert one_step() == [2, 1, 2, 1]
    enable_recompute(model, None)
    assert recomputed_layers(model) == [] and one_step() == [1, 1, 1, 1]
    enable_recompute(model, 1)
    assert recomputed_layers(model) == [0, 1, 2, 3] and one_step() == [2, 2, 2, 2]
