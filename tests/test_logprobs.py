"""The one log-prob path: completion tokens only, chunked LM head, reference = adapters disabled."""

import pytest
import torch
from conftest import make_tiny_llama
from peft import LoraConfig, get_peft_model

from qbco.model.logprobs import completion_logps
from qbco.model.lora import reference

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
    m = make_tiny_llama(VOCAB, seed=3).eval()
    m.get_output_embeddings().weight.requires_grad_(False)  # frozen, as under LoRA: completion_logps needs it
    return m


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


def brute_force_groups(lengths, overhead):
    """Every split of the length-sorted rows into contiguous runs, the cheapest cost found by enumeration."""
    import itertools

    s = sorted(lengths)
    best = None
    for k in range(len(s)):
        for cuts in itertools.combinations(range(1, len(s)), k):
            bounds = (0, *cuts, len(s))
            cost = sum((j - i) * s[j - 1] + overhead for i, j in itertools.pairwise(bounds))
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_length_groups_are_the_cheapest_split(seed):
    import random

    from qbco.model.logprobs import length_groups

    rng = random.Random(seed)
    lengths = [rng.randrange(5, 300) for _ in range(rng.randrange(1, 9))]
    overhead = rng.choice([0, 16, 64, 1000])
    groups = length_groups(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every row once
    cost = sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)
    assert cost == brute_force_groups(lengths, overhead)


def test_rows_grouped_by_length_give_the_straightforward_values_and_gradients(model, monkeypatch):
    """Four rows of lengths 12, 5, 9 and 3 (right-padded to 12); with no per-call overhead every length is
    its own decoder call, each cut to its own width, yet each row's value and the gradient are those of the
    straightforward full-batch computation."""
    import qbco.model.logprobs as ql

    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (4, 12), generator=g)
    lengths, prompts = [12, 5, 9, 3], [4, 2, 6, 1]
    attn = torch.tensor([[1] * n + [0] * (12 - n) for n in lengths])
    comp = torch.tensor([[0] * p + [1] * (n - p) + [0] * (12 - n) for n, p in zip(lengths, prompts)])
    ids = ids * attn  # padding id 0
    monkeypatch.setattr(ql, "GROUP_OVERHEAD", 0)
    assert len(ql.length_groups(lengths)) == 4
    calls = []
    decoder = model.get_decoder()
    original = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda **kw: calls.append(kw["input_ids"].shape) or original(**kw))
    fast = completion_logps(model, ids, attn, comp, chunk=4)
    assert sorted(calls) == [(1, 3), (1, 5), (1, 9), (1, 12)]
    monkeypatch.setattr(decoder, "forward", original)
    slow = straightforward(model, ids, attn, comp)
    assert torch.allclose(fast, slow, atol=1e-5)
    w = model.model.layers[1].self_attn.q_proj.weight
    (g_fast,) = torch.autograd.grad(fast @ torch.tensor([1.0, -2.0, 0.5, 3.0]), w)
    (g_slow,) = torch.autograd.grad(slow @ torch.tensor([1.0, -2.0, 0.5, 3.0]), w)
    assert torch.allclose(g_fast, g_slow, atol=1e-6)


def test_the_default_chunk_holds_2_to_the_24_logits(model, monkeypatch):
    """SmolLM2's 49,152 entries: 341 tokens a chunk; Qwen2.5's 151,936: 110. With the tiny model's 50 entries
    and 2^7 logits a chunk is 16 tokens (the floor), so 8 completion tokens make one chunk, 40 make three."""
    import qbco.model.logprobs as ql
    import qbco.model.memory as qmemory

    assert qmemory.chunk_tokens(49152) == 341
    assert qmemory.chunk_tokens(151936) == 110
    monkeypatch.setattr(qmemory, "CHUNK_LOGITS", 2**7)
    sizes = []
    original = ql.token_logps
    monkeypatch.setattr(ql, "token_logps", lambda h, hid, *rest: sizes.append(hid.shape[0]) or original(h, hid, *rest))
    ids, attn, comp = batch()
    with torch.no_grad():
        completion_logps(model, ids, attn, comp)
    assert sizes == [8]
    ids = torch.randint(3, VOCAB, (1, 45), generator=torch.Generator().manual_seed(0))
    comp = torch.zeros_like(ids)
    comp[:, 5:] = 1
    sizes.clear()
    with torch.no_grad():
        completion_logps(model, ids, torch.ones_like(ids), comp)
    assert sizes == [16, 16, 8]


def test_a_trainable_lm_head_is_refused(model):
    model.get_output_embeddings().weight.requires_grad_(True)
    ids, attn, comp = batch()
    with pytest.raises(ValueError, match="LM head must be frozen"):
        completion_logps(model, ids, attn, comp)
