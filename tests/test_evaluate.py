"""`qbco eval` and `qbco plot` end to end on a tiny llama trained on the separable fixture: the figures in
RUN/eval/metrics.json agree with the run's own log and with each other, and the PNGs are PNGs."""

import json
import math

import pytest
from conftest import separable_rows
from typer.testing import CliRunner

from qbco.cli.main import app
from qbco.data.feedback import load_feedback
from qbco.reward import calibration as calib
from qbco.reward import metrics
from qbco.run.config import build_config
from qbco.train.loop import train

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def with_task(rows):
    """The fixture's rows with a task column, as the demo data has: odd or even question number."""
    return [{**r, "task": "odd" if int(r["prompt"].split()[1][1:]) % 2 else "even"} for r in rows]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def train_tiny(folder, model_dir, data, **overrides):
    settings = dict(model=str(model_dir), data=str(data), output=str(folder), eval_fraction=0.25, lr=1e-2, beta=0.5,
                    epochs=4, batch_size=8, max_prompt_length=32, max_completion_length=16)
    settings.update(overrides)
    return train(build_config(**settings), log=lambda message: None).output


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "separable.jsonl", with_task(separable_rows(40)))


@pytest.fixture(scope="module")
def bco_run(tmp_path_factory, tiny_model_dir, data_file):
    """A 4-bit BCO run, trained once for the module."""
    return train_tiny(tmp_path_factory.mktemp("runs") / "bco", tiny_model_dir, data_file)


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def logged_eval(run):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m.get("split") == "eval"][0]


def assert_png(path):
    import matplotlib.image

    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE, path
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100


def test_eval_of_the_held_out_part_agrees_with_the_training_log(bco_run, data_file):
    """p > 0.5 <=> r - delta > 0, so accuracy at 0.5 is the logged eval_reward_accuracy, exactly (same rows,
    same adapter, same batches); bco_loss is the logged eval_loss; delta is the saved reward shift."""
    result = invoke("eval", bco_run)
    assert "ROC-AUC" in result.stdout and "ECE" in result.stdout
    report = json.loads((bco_run / "eval" / "metrics.json").read_text())
    logged = logged_eval(bco_run)
    shift = json.loads((bco_run / "adapter" / "reward_shift.json").read_text())
    overall = report["overall"]
    binary, pairs, drift = overall["binary"], overall["pairs"], overall["drift"]

    assert report["delta"] == pytest.approx((shift["mu_up"] + shift["mu_down"]) / 2) == pytest.approx(logged["delta"])
    assert report["loss"] == "bco" and report["beta"] == 0.5 and report["slices"] is None
    assert binary["rows"] == logged["eval_rows"]
    assert binary["at_0.5"]["accuracy"] == logged["eval_reward_accuracy"]
    assert binary["bco_loss"] == pytest.approx(logged["eval_loss"], rel=1e-5, abs=1e-6)
    assert binary["at_0.5"]["accuracy"] >= 0.95 and binary["roc_auc"] >= 0.95
    for key in ("roc_auc", "pr_auc", "at_best_f1", "log_loss", "brier", "ece", "reliability"):
        assert binary[key] is not None, key
    assert 0 < binary["at_best_f1"]["threshold"] < 1 and binary["at_best_f1"]["f1"] >= binary["at_0.5"]["f1"]

    # The held-out rows, split here as training split them: every (up, down) combination within a prompt is a pair.
    _, held = load_feedback(str(data_file), 0.25, 0)
    per_prompt: dict = {}
    for e in held:
        ups, downs = per_prompt.get(e.prompt_key, (0, 0))
        per_prompt[e.prompt_key] = (ups + e.label, downs + (not e.label))
    expected_pairs = sum(ups * downs for ups, downs in per_prompt.values())
    assert len(held) == binary["rows"] and pairs["pairs"] == expected_pairs > 0
    assert pairs["bce_loss"] >= pairs["dpo_loss"] and pairs["bce_minus_dpo"] >= 0  # Theorem 1
    assert pairs["reward_accuracy"] >= 0.9

    # scores.jsonl holds the per-row numbers the figures come from.
    scores = [json.loads(line) for line in (bco_run / "eval" / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == binary["rows"]
    ratios = [s["policy_logp"] - s["reference_logp"] for s in scores]
    tokens = sum(s["completion_tokens"] for s in scores)
    assert drift["log_ratio_per_sequence"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)
    assert drift["log_ratio_per_token"] == pytest.approx(sum(ratios) / tokens, rel=1e-5)
    assert drift["mean_reward"] == pytest.approx(0.5 * drift["log_ratio_per_sequence"])
    assert drift["completion_tokens"] == tokens
    labels = [s["label"] for s in scores]
    assert binary["ece"] == pytest.approx(metrics.ece([s["p_up_uncalibrated"] for s in scores], labels))
    assert sum((s["p_up_uncalibrated"] > 0.5) == s["label"] for s in scores) / len(scores) == binary["at_0.5"]["accuracy"]
    assert_png(bco_run / "eval" / "reliability.png")

    # The Platt scale, fit again on these rows and stored: p_up in scores.jsonl is sigmoid(a (r - delta) + b).
    stored = json.loads((bco_run / "calibration.json").read_text())
    assert report["calibration"]["fit_on_these_rows"] and stored["method"] == report["calibration"]["method"] == "platt"
    a, b = stored["a"], stored["b"]
    for s in scores:
        assert s["p_up"] == pytest.approx(1 / (1 + math.exp(-(a * (s["reward"] - report["delta"]) + b))), rel=1e-5)
    assert binary["calibrated"]["ece"] == pytest.approx(metrics.ece([s["p_up"] for s in scores], labels))
    assert binary["ece"] == pytest.approx(stored["ece_before"])
    # ece_after is out of fold (each row by the fit that did not see it), never the optimistic in-sample figure.
    held = calib.out_of_fold([s["reward"] - report["delta"] for s in scores], labels)
    assert stored["ece_after"] == pytest.approx(metrics.ece(held, labels)) and stored["checked_on"].startswith("out of fold")


def test_eval_on_a_file_with_slices(bco_run, data_file):
    """--data FILE scores every row of it; --slice-by task gives every figure per task, and the slices add up."""
    result = invoke("eval", bco_run, "--data", data_file, "--slice-by", "task")
    assert "task=odd" in result.stdout
    report = json.loads((bco_run / f"eval-{data_file.stem}" / "metrics.json").read_text())  # RUN/eval/ is the held-out part's
    rows = data_file.read_text().splitlines()
    overall, slices = report["overall"], report["slices"]
    assert overall["binary"]["rows"] == len(rows)
    assert slices["column"] == "task" and sorted(slices["values"]) == ["even", "odd"]
    parts = slices["values"].values()
    assert sum(p["binary"]["rows"] for p in parts) == len(rows)
    assert sum(p["binary"]["thumbs_up"] for p in parts) == overall["binary"]["thumbs_up"]
    assert sum(p["pairs"]["pairs"] for p in parts) == overall["pairs"]["pairs"]  # a prompt lies in one slice
    assert sum(p["drift"]["completion_tokens"] for p in parts) == overall["drift"]["completion_tokens"]
    for part in parts:
        assert set(part) == {"binary", "pairs", "drift"} and part["pairs"]["bce_minus_dpo"] >= 0


def test_eval_on_chosen_rejected_pairs(bco_run, tmp_path):
    """A prompt/chosen/rejected file: each pair is two rows (chosen up, rejected down) and one pair."""
    by_prompt = {}
    for r in separable_rows(40):
        by_prompt.setdefault(r["prompt"], {})["chosen" if r["label"] else "rejected"] = r["completion"]
    pairs = [{"prompt": p, **c} for p, c in by_prompt.items()]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    invoke("eval", bco_run, "--data", path)
    report = json.loads((bco_run / "eval-pairs" / "metrics.json").read_text())
    assert report["overall"]["pairs"]["pairs"] == len(pairs)
    assert report["overall"]["binary"]["rows"] == 2 * len(pairs)
    assert report["overall"]["binary"]["thumbs_up_share"] == 0.5
    assert report["overall"]["pairs"]["reward_accuracy"] >= 0.9


def test_eval_of_a_bce_run_uses_delta_zero(tmp_path, tiny_model_dir, data_file):
    """BCE keeps delta at 0, so p(up) = sigmoid(r); the accuracy still equals the logged one."""
    run = train_tiny(tmp_path / "bce", tiny_model_dir, data_file, loss="bce", max_steps=4, load_in_4bit=False)
    invoke("eval", run)
    report = json.loads((run / "eval" / "metrics.json").read_text())
    assert report["delta"] == 0.0 and report["loss"] == "bce"
    assert report["overall"]["binary"]["at_0.5"]["accuracy"] == logged_eval(run)["eval_reward_accuracy"]


def test_eval_mistakes_are_one_line_errors(bco_run, tmp_path):
    for args, needle in (
        (["eval", bco_run, "--slice-by", "nope"], "no row has that column"),
        (["eval", tmp_path], "not a finished qbco run"),
        (["plot", tmp_path], "metrics.jsonl not found"),
    ):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 2 and needle in result.output, result.output
        assert "Traceback" not in result.output


def test_plot_draws_the_training_curves(bco_run, tmp_path):
    invoke("plot", bco_run)
    assert_png(bco_run / "metrics.png")
    invoke("plot", bco_run, "-o", tmp_path / "curves" / "run.png")
    assert_png(tmp_path / "curves" / "run.png")
