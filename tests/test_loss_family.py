"""The loss family and --balance wired into training, on a tiny llama. At step 1 the adapters are fresh
(B = 0), so r = 0 for every row and each loss has a value known by hand:
    bco/bce: l(0) per class mean = ln 2 each, total 2 ln 2 = 1.386294
    kto:     v = sigmoid(beta * (0 - 0)) = 1/2, loss = mean of lambda * (1 - 1/2)
    dpo:     -log sigmoid(0 - 0) = ln 2 = 0.693147
"""

import json
import math

import pytest

from qbco.common.errors import QbcoError
from qbco.data.encoding import epoch_order
from qbco.data.feedback import load_feedback
from qbco.run.config import build_config
from qbco.train.loop import train

LN2 = math.log(2)


def run(tmp_path, name, model_dir, data, **extra):
    values = dict(model=str(model_dir), data=str(data), output=str(tmp_path / name), eval_fraction=0.25, lr=1e-2,
                  beta=0.5, epochs=3, batch_size=8, max_prompt_length=32, max_completion_length=16, load_in_4bit=False,
                  sft_weight=0.0)  # each loss alone (bco's default adds the NLL term), as the figures below are worked
    values.update(extra)
    config = build_config(**values)
    result = train(config, log=lambda m: None)
    lines = [json.loads(line) for line in (result.output / "metrics.jsonl").read_text().splitlines()]
    return config, [m for m in lines if "split" not in m], lines[-1]


def train_rows(config):
    return load_feedback(config.data, config.eval_fraction, config.seed)[0]


def falls(steps):
    k = max(1, len(steps) // 5)
    return sum(m["loss"] for m in steps[-k:]) / k < sum(m["loss"] for m in steps[:k]) / k


def test_kto_trains_and_logs_its_kl_estimate(tmp_path, tiny_model_dir, separable_file):
    config, steps, evaluation = run(tmp_path, "kto", tiny_model_dir, separable_file, loss="kto")
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert all("kl" in m and m["kl"] >= 0 for m in steps) and steps[0]["kl"] == 0.0
    assert falls(steps) and evaluation["eval_reward_accuracy"] >= 0.9


def test_dpo_trains_on_pairs_of_rows_sharing_a_prompt(tmp_path, tiny_model_dir, separable_file):
    config, steps, evaluation = run(tmp_path, "dpo", tiny_model_dir, separable_file, loss="dpo", epochs=1)
    rows = train_rows(config)
    by_prompt = {}
    for e in rows:
        by_prompt.setdefault(e.prompt_key, []).append(e.label)
    n_pairs = sum(labels.count(True) * labels.count(False) for labels in by_prompt.values())
    assert len(steps) == n_pairs // 8  # one epoch over the pairs, 8 pairs a step, a partial last step dropped
    assert steps[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert steps[0]["reward_up"] is not None and steps[0]["reward_down"] is not None  # every step holds both
    assert falls(steps) and evaluation["eval_reward_accuracy"] >= 0.9


def test_dpo_without_pairs_is_a_clear_error(tmp_path, tiny_model_dir):
    data = tmp_path / "unpaired.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question q{k} ?", "completion": "good answer .", "label": k % 2 == 0}) + "\n" for k in range(12)))
    with pytest.raises(QbcoError, match="--loss dpo needs pairs"):
        run(tmp_path, "nopairs", tiny_model_dir, data, loss="dpo")
    assert not (tmp_path / "nopairs").exists()


def test_oversample_repeats_the_minority_class(tmp_path, tiny_model_dir, separable_file):
    config, steps, _ = run(tmp_path, "over", tiny_model_dir, separable_file, balance="oversample", epochs=1, max_steps=None)
    rows = train_rows(config)
    n_up = sum(e.label for e in rows)
    assert n_up < len(rows) - n_up  # the fixture is 40% thumbs-up
    assert len(steps) == 2 * (len(rows) - n_up) // 8


def first_window_labels(config):
    rows = train_rows(config)
    return [rows[i].label for i in epoch_order(len(rows), config.batch_size, config.seed, 0)[0]]


def test_weight_divides_by_the_dataset_share(tmp_path, tiny_model_dir, separable_file):
    """bco at step 1 (batch 2): sum_up ln2 / (2 s) + sum_down ln2 / (2 (1 - s)), s = the training rows' thumbs-up share."""
    config, steps, _ = run(tmp_path, "weight", tiny_model_dir, separable_file, balance="weight", batch_size=2, max_steps=12)
    # batches of 2 often hold one class: its per-class figures are absent (None), never NaN
    assert any(m["reward_up"] is None or m["reward_down"] is None for m in steps)
    assert all(v is None or math.isfinite(v) for m in steps for v in (m["reward_up"], m["reward_down"], m["loss"]))
    rows = train_rows(config)
    s = sum(e.label for e in rows) / len(rows)
    window = first_window_labels(config)
    k = sum(window)
    assert steps[0]["loss"] == pytest.approx(k * LN2 / (2 * s) + (2 - k) * LN2 / (2 * (1 - s)), rel=1e-6)
    _, plain, _ = run(tmp_path, "plain", tiny_model_dir, separable_file, max_steps=1)
    assert plain[0]["loss"] == pytest.approx(2 * LN2, rel=1e-6)


def test_kto_weight_raises_the_minority_lambda(tmp_path, tiny_model_dir, separable_file):
    """lambda_D = n_U / n_D for the scarcer thumbs-up, lambda_U = 1: step-1 loss = mean of lambda * 1/2."""
    config, steps, _ = run(tmp_path, "ktow", tiny_model_dir, separable_file, loss="kto", balance="weight", max_steps=1)
    rows = train_rows(config)
    n_d = sum(e.label for e in rows)
    window = first_window_labels(config)
    expected = sum((len(rows) - n_d) / n_d * 0.5 if up else 0.5 for up in window) / len(window)
    assert steps[0]["loss"] == pytest.approx(expected, rel=1e-6)


def test_balance_with_dpo_is_refused():
    with pytest.raises(QbcoError, match="no effect with --loss dpo"):
        build_config(loss="dpo", balance="weight")
