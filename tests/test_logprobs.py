"""The one log-prob path: completion tokens only, chunked LM head, reference = adapters disabled."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import make_tiny_llama
from qbco.logprobs import completion_logps
from qbco.models import reference

VOCAB = 50


def straightforward(model, input_ids, attention_mask, completion_mask):
    """Independent reference: full logits, log_softmax, gather, sum over completion positions."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (lp * completion_mask[:, 1:]).sum(-1)


def batch():
    """Two rows, right-padded: row 0 = 4 prompt + 3 completion tokens; row 1 = 2 prompt + 5 completion + 2 pad."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    attn = torch.tensor([[1] * 7 + [0, 0], [1] * 7 + [0, 0]])
    comp = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 0, 0]])
    return ids, attn, comp


@pytest.fixture
def model():
    return make_tiny_llama(VOCAB, seed=3).eval()


def test_values_and_gradients_equal_the_straightforward_computation(model):
    ids, attn, comp = batch()
    fast = completion_logps(model, ids, attn, comp, chunk=3)  # 8 completion tokens in chunks of 3
    slow = straightforward(model, ids, attn, comp)
    assert torch.allclose(fast, slow, atol=1e-5)
    w = model.model.layers[0].mlp.up_proj.weight
    (g_fast,) = torch.autograd.grad(fast.sum(), w)
    (g_slow,) = torch.autograd.grad(slow.sum(), w)
    assert torch.allclose(g_fast, g_slow, atol=1e-6)


def test_prompt_tokens_own_log_probs_never_count(model):
    """The sum runs over completion positions only: it differs from the sum over every position."""
    ids, attn, comp = batch()
    with torch.no_grad():
        value = completion_logps(model, ids, attn, comp)
        everything = straightforward(model, ids, attn, attn)
        without_first = straightforward(model, ids, attn, comp)
    assert torch.allclose(value, without_first, atol=1e-5)
    assert (value - everything).abs().min() > 1.0


def test_padding_tokens_do_not_change_the_result(model):
    ids, attn, comp = batch()
    other = ids.clone()
    other[:, 7:] = torch.tensor([[5, 6], [7, 8]])  # different ids under attention_mask 0
    with torch.no_grad():
        assert torch.equal(completion_logps(model, ids, attn, comp), completion_logps(model, other, attn, comp))


def test_a_completion_token_changes_the_result(model):
    ids, attn, comp = batch()
    other = ids.clone()
    other[0, 5] = (ids[0, 5] + 1) % VOCAB
    with torch.no_grad():
        a, b = completion_logps(model, ids, attn, comp), completion_logps(model, other, attn, comp)
    assert a[0] != b[0] and a[1] == b[1]


def test_reference_is_the_base_with_adapters_disabled(model):
    """Fresh adapters (B = 0): reference == policy exactly, so r = 0 at step 0; trained adapters: they differ."""
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    ids, attn, comp = batch()
    with torch.no_grad():
        policy = completion_logps(peft_model, ids, attn, comp)
    with reference(peft_model):
        ref = completion_logps(peft_model, ids, attn, comp)
    assert torch.equal(policy, ref)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        trained = completion_logps(peft_model, ids, attn, comp)
    with reference(peft_model):
        ref_after = completion_logps(peft_model, ids, attn, comp)
    assert torch.equal(ref_after, ref)  # the reference did not move
    assert (trained - ref_after).abs().min() > 1e-4  # and the policy did
    with torch.no_grad():  # leaving the context turns the adapters back on
        assert torch.equal(completion_logps(peft_model, ids, attn, comp), trained)
