"""The optimisations do not change training: qbco's fast path (decoder once per group of rows of like length,
LM head only at completion positions in chunks, LoRA fused into the base layer's output, reference log-probs
precomputed once for the dataset) gives, step for step, the losses and
gradient norms of the straightforward computation written here (full logits -> log_softmax -> gather over
completion positions, the reference computed for every batch with the adapters disabled)."""

import json
import math

import pytest
import torch

from qbco.data.encoding import collate, encode_all
from qbco.data.feedback import load_feedback
from qbco.model.device import default_device
from qbco.model.fused_lora import unfuse_lora
from qbco.model.loading import load_policy
from qbco.reward.loss import bco_loss
from qbco.reward.shift import RewardShift
from qbco.run.config import build_config
from qbco.train.loop import train

STEPS = 5


def straightforward_logps(model, b):
    """sum over completion tokens of log_softmax(full logits)[token]: every position, every vocabulary entry."""
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].float()
    per_token = torch.log_softmax(logits, -1).gather(-1, b.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (per_token * b.completion_mask[:, 1:]).sum(-1)


def straightforward_run(config):
    """The training loop without any of qbco's shortcuts. Each step is the whole training set (batch_size is
    at least its size), so the losses do not depend on the order rows are drawn in, only on the arithmetic."""
    train_rows, _ = load_feedback(config.data, config.eval_fraction, config.seed)
    torch.manual_seed(config.seed)  # as train() does before loading: the same fresh adapters
    tokenizer, model, _ = load_policy(config, default_device())
    unfuse_lora(model)  # peft's own LoRA forward, not qbco.model.fused_lora's
    enc = encode_all(train_rows, tokenizer, config.max_prompt_length, config.max_completion_length)
    assert len(enc) <= config.batch_size
    b = collate(enc, list(range(len(enc))), tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, (STEPS - s) / STEPS))
    shift = RewardShift(config.ema_decay)
    losses, norms = [], []
    for _ in range(STEPS):
        with model.disable_adapter(), torch.no_grad():  # the reference, again for every batch
            ref = straightforward_logps(model, b)
        policy = straightforward_logps(model, b)
        result = bco_loss(policy, ref, b.labels, shift.delta, config.beta)
        result.loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        shift.update(result.rewards, b.labels)
        losses.append(result.loss.item())
    return losses, norms


@pytest.fixture
def one_thread():
    """Tiny matmuls by the thousand: one thread is faster, and steady on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Many chunks of 16 completion tokens with every row length its own decoder call; one chunk for all rows in one call.
@pytest.mark.parametrize("chunk,group_overhead", [(16, 0), (1024, 10**9)])
def test_fast_path_losses_equal_the_straightforward_computation(tmp_path, monkeypatch, one_thread, tiny_model_dir,
                                                                separable_file, chunk, group_overhead):
    import qbco.model.logprobs as ql

    monkeypatch.setenv("QBCO_CACHE", str(tmp_path / "cache"))  # the reference is computed here, not read from a cache
    monkeypatch.setattr(ql, "GROUP_OVERHEAD", group_overhead)
    calls = []
    original = ql._group_logps
    monkeypatch.setattr(ql, "_group_logps", lambda *a: calls.append(a[1].shape[0]) or original(*a))
    n_rows = len(separable_file.read_text().splitlines())
    config = build_config(
        model=str(tiny_model_dir), data=str(separable_file), output=str(tmp_path / "run"), eval_fraction=0.0,
        batch_size=n_rows, epochs=STEPS, max_steps=STEPS, warmup_ratio=0.0, lr=1e-2, beta=0.5,
        max_prompt_length=32, max_completion_length=16, load_in_4bit=False, gradient_checkpointing=True,
        logprob_chunk=chunk, seed=3, sft_weight=0.0,  # the paper's loss: straightforward_run computes it alone
    )
    train(config, log=lambda message: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fast = [m for m in records if "step" in m and m.get("split") != "eval"]
    slow_losses, slow_norms = straightforward_run(config)

    assert len(fast) == STEPS
    # One decoder call per batch (the reference pass's and each step's), or one per row length and batch.
    assert len(calls) == STEPS + 1 if group_overhead else len(calls) >= 2 * (STEPS + 1)
    assert [m["loss"] for m in fast] == pytest.approx(slow_losses, rel=1e-5, abs=1e-6)
    assert [m["grad_norm"] for m in fast] == pytest.approx(slow_norms, rel=1e-4, abs=1e-6)
    # The comparison has teeth: the model learnt, so later losses are not the step-0 value 2 log 2.
    assert fast[0]["loss"] == pytest.approx(2 * math.log(2), rel=1e-6)
    assert abs(fast[-1]["loss"] - fast[0]["loss"]) > 0.05
