"""The memory estimate's parameter counts against the real models (transformers' and peft's own counts)."""

import pytest
import torch
from transformers import AutoConfig

from qbco.config import TrainConfig
from qbco.memory import GiB, estimate
from qbco.models import attach_lora, load_base


def test_counts_match_the_real_model_and_adapters(tiny_model_dir):
    hf_config = AutoConfig.from_pretrained(tiny_model_dir)
    config = TrainConfig(lora_r=4, load_in_4bit=False)
    est = estimate(hf_config, config, dtype_bytes=4)
    base = load_base(str(tiny_model_dir), load_in_4bit=False, dtype=torch.float32, device=torch.device("cpu"))
    assert est.base_params == base.num_parameters()
    model = attach_lora(base, r=4, alpha=8, dropout=0.0, targets="all-linear", gradient_checkpointing=False)
    assert est.lora_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("targets", ["q_proj,v_proj", "q_proj, k_proj, v_proj, o_proj", "gate_proj,up_proj,down_proj", "o_proj"])
def test_lora_counts_for_a_list_of_targets_match_peft(tiny_model_dir, targets):
    """A --lora-targets list printed 0 GiB for the adapters; the count is peft's own for every list."""
    hf_config = AutoConfig.from_pretrained(tiny_model_dir)
    config = TrainConfig(lora_r=4, load_in_4bit=False, lora_targets=targets)
    est = estimate(hf_config, config, dtype_bytes=4)
    base = load_base(str(tiny_model_dir), load_in_4bit=False, dtype=torch.float32, device=torch.device("cpu"))
    model = attach_lora(base, r=4, alpha=8, dropout=0.0, targets=targets, gradient_checkpointing=False)
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
