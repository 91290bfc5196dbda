"""The training loop on a tiny random llama: it learns a separable feedback set, its files and metrics
are what the issue says, and gradient accumulation does not change the update."""

import json
import os

import pytest
from safetensors.torch import load_file

from qbco.run.config import build_config
from qbco.train.loop import train

KEYS = {"step", "epoch", "loss", "delta", "reward_up", "reward_down", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}


def run(tmp_path, name, model_dir, data, **overrides):
    settings = dict(model=str(model_dir), data=str(data), output=str(tmp_path / name), eval_fraction=0.25,
                    lr=1e-2, beta=0.5, epochs=4, batch_size=8, max_prompt_length=32, max_completion_length=16)
    settings.update(overrides)
    return train(build_config(**settings), log=lambda message: None)


def read_metrics(folder):
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m.get("split") != "eval"], [m for m in lines if m.get("split") == "eval"]


def test_tiny_llama_learns_separable_feedback(tmp_path, tiny_model_dir, separable_file):
    result = run(tmp_path, "run", tiny_model_dir, separable_file, sft_weight=0.0)  # BCO's own loss learns it
    steps, evals = read_metrics(result.output)
    assert len(steps) == result.steps and all(KEYS <= m.keys() for m in steps)
    assert [m["step"] for m in steps] == list(range(1, result.steps + 1))
    k = max(1, len(steps) // 5)
    first, last = [m["loss"] for m in steps[:k]], [m["loss"] for m in steps[-k:]]
    assert sum(last) / k < 0.6 * sum(first) / k
    assert steps[0]["delta"] == 0.0 and steps[-1]["delta"] != 0.0
    # r = 0 for every row before training, so sign(r - delta) calls every held-out row thumbs-down:
    # the accuracy to beat is the share of thumbs-down rows, counted here from the file.
    rows = [json.loads(line) for line in separable_file.read_text().splitlines()]
    assert len(evals) == 1 and evals[0]["eval_rows"] > 0
    assert evals[0]["eval_reward_accuracy"] >= 0.95
    assert sum(not r["label"] for r in rows) / len(rows) < 0.65
    for name in ("config.yaml", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/reward_shift.json"):
        assert (result.output / name).is_file(), name
    # written through a private temporary folder, but published with ordinary permissions (umask applied)
    umask = os.umask(0)
    os.umask(umask)
    assert (result.output / "adapter").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (result.output / "adapter/adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_accumulation_gives_the_same_update_as_one_big_batch(tmp_path, tiny_model_dir, separable_file):
    """Batch 8 x accumulation 1 and batch 2 x accumulation 4: same losses, deltas and adapter (docs/pitfalls.md, 1)."""
    common = dict(max_steps=3, epochs=1, load_in_4bit=False)
    a = run(tmp_path, "big", tiny_model_dir, separable_file, batch_size=8, grad_accum=1, **common)
    b = run(tmp_path, "accum", tiny_model_dir, separable_file, batch_size=2, grad_accum=4, **common)
    (sa, _), (sb, _) = read_metrics(a.output), read_metrics(b.output)
    assert [m["loss"] for m in sa] == pytest.approx([m["loss"] for m in sb], rel=1e-5)
    assert [m["delta"] for m in sa] == pytest.approx([m["delta"] for m in sb], rel=1e-5, abs=1e-6)
    assert [m["tokens"] for m in sa] == [m["tokens"] for m in sb]
    wa, wb = load_file(a.output / "adapter/adapter_model.safetensors"), load_file(b.output / "adapter/adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:  # float summation order differs; Adam's normalisation magnifies it where a gradient is ~0
        assert (wa[key] - wb[key]).norm() <= 1e-4 * wa[key].norm(), key


def test_bce_keeps_delta_at_zero(tmp_path, tiny_model_dir, separable_file):
    result = run(tmp_path, "bce", tiny_model_dir, separable_file, loss="bce", max_steps=4, load_in_4bit=False)
    steps, _ = read_metrics(result.output)
    assert all(m["delta"] == 0.0 for m in steps)
    assert json.loads((result.output / "adapter/reward_shift.json").read_text())["mu_up"] == 0.0


def test_reference_log_probs_are_cached_and_reused(tmp_path, tiny_model_dir, separable_file, monkeypatch):
    """A second run on the same base and data reads the reference log-probs from the disk cache (no
    reference pass at all) and trains exactly as the first; other data gets its own entry."""
    import qbco.train.loop as loop

    monkeypatch.setenv("QBCO_CACHE", str(tmp_path / "cache"))
    first = run(tmp_path, "first", tiny_model_dir, separable_file, max_steps=3, load_in_4bit=False)
    entries = sorted((tmp_path / "cache" / "reference").glob("*.safetensors"))
    assert len(entries) == 2  # the training rows and the held-out rows

    calls = []
    original = loop.dataset_logps
    monkeypatch.setattr(loop, "dataset_logps", lambda *a, **k: calls.append(1) or original(*a, **k))
    second = run(tmp_path, "second", tiny_model_dir, separable_file, max_steps=3, load_in_4bit=False)
    assert len(calls) == 1  # only the held-out policy pass; both reference passes came from the cache
    (sa, _), (sb, _) = read_metrics(first.output), read_metrics(second.output)
    assert [m["loss"] for m in sa] == [m["loss"] for m in sb]
    other = tmp_path / "other.jsonl"
    other.write_text("".join(line for line in separable_file.read_text().splitlines(keepends=True)[:-3]))
    run(tmp_path, "third", tiny_model_dir, other, max_steps=1, load_in_4bit=False)
    assert len(list((tmp_path / "cache" / "reference").glob("*.safetensors"))) > 2


def test_sft_weight_adds_the_thumbs_up_nll_and_keeps_accumulation_exact(tmp_path, tiny_model_dir, separable_file):
    """--sft-weight: the logged sft_nll is the window's per-token NLL of its thumbs-up rows, checked here from
    the step-1 loss (at step 1 the policy is the reference, so r = 0 and BCO's part is 2 log 2); batch 8 x 1
    and 2 x 4 give the same losses and adapter; a plain BCO run adds it at weight 3; --sft-weight 0 is the paper's
    loss alone."""
    import math

    from safetensors.torch import load_file

    common = dict(max_steps=3, epochs=1, load_in_4bit=False, sft_weight=0.5)
    a = run(tmp_path, "sft", tiny_model_dir, separable_file, batch_size=8, grad_accum=1, **common)
    b = run(tmp_path, "sft-accum", tiny_model_dir, separable_file, batch_size=2, grad_accum=4, **common)
    (sa, _), (sb, _) = read_metrics(a.output), read_metrics(b.output)
    assert all(m["sft_nll"] > 0 for m in sa)
    assert sa[0]["loss"] == pytest.approx(2 * math.log(2) + 0.5 * sa[0]["sft_nll"], rel=1e-5)
    assert [m["loss"] for m in sa] == pytest.approx([m["loss"] for m in sb], rel=1e-5)
    assert [m["sft_nll"] for m in sa] == pytest.approx([m["sft_nll"] for m in sb], rel=1e-5)
    wa, wb = load_file(a.output / "adapter/adapter_model.safetensors"), load_file(b.output / "adapter/adapter_model.safetensors")
    for key in wa:
        assert (wa[key] - wb[key]).norm() <= 1e-4 * wa[key].norm(), key
    default = run(tmp_path, "default", tiny_model_dir, separable_file, max_steps=3, epochs=1, load_in_4bit=False)
    zero = run(tmp_path, "zero", tiny_model_dir, separable_file, max_steps=3, epochs=1, load_in_4bit=False, sft_weight=0.0)
    (sd, _), (sz, _) = read_metrics(default.output), read_metrics(zero.output)
    assert sd[0]["loss"] == pytest.approx(2 * math.log(2) + 3.0 * sd[0]["sft_nll"], rel=1e-5)  # BCO's default weight: 3
    assert sz[0]["loss"] == pytest.approx(2 * math.log(2), rel=1e-6) and "sft_nll" not in sz[0]  # the paper's loss


def test_sft_weight_lifts_the_thumbs_up_likelihood(tmp_path, tiny_model_dir, separable_file):
    """docs/pitfalls.md, 18: the same run with --sft-weight 1 ends with the thumbs-up rows' rewards (their
    log-likelihood gained over the reference) higher than without, and their per-token NLL lower than at the
    start; both runs still classify the held-out rows."""
    common = dict(load_in_4bit=False, lr=3e-3)
    plain = run(tmp_path, "plain", tiny_model_dir, separable_file, sft_weight=0.0, **common)
    lifted = run(tmp_path, "lifted", tiny_model_dir, separable_file, sft_weight=1.0, **common)
    (sp, _), (sl, _) = read_metrics(plain.output), read_metrics(lifted.output)

    def late(steps, key):
        values = [m[key] for m in steps[-5:] if m[key] is not None]
        return sum(values) / len(values)

    assert late(sl, "reward_up") > late(sp, "reward_up") + 0.1
    assert late(sl, "sft_nll") < 0.8 * sl[0]["sft_nll"]
    assert plain.eval["eval_reward_accuracy"] >= 0.95 and lifted.eval["eval_reward_accuracy"] >= 0.95
