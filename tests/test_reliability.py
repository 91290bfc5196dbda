"""Reliability: every bad input is one line, exit code 2 and nothing written (docs/errors.md, row by row);
an interrupted run resumes to exactly the run it would have been; a non-finite loss stops with the last
good state kept; checkpoints are written whole or not at all."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import separable_rows
from safetensors.torch import load_file
from typer.testing import CliRunner

from qbco.cli.main import app
from qbco.common.errors import TrainingStopped
from qbco.run.config import build_config
from qbco.run.folder import RunFolder
from qbco.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def bad_inputs(tmp: Path, model_dir: Path) -> dict:
    """Each docs/errors.md row: (extra CLI args, expected fragment of the one-line message)."""
    good = separable_rows(6)
    ok = write_jsonl(tmp / "ok.jsonl", good)
    (tmp / "truncated.json").write_text('[{"prompt": "a", "completion": "b", "label": tr', encoding="utf-8")
    (tmp / "badline.jsonl").write_text(json.dumps(good[0]) + "\n{\"prompt\": \"x\",\n", encoding="utf-8")
    (tmp / "latin1.csv").write_bytes("prompt,completion,label\ncaf\xe9,ok,1\n".encode("latin-1"))
    (tmp / "fields.csv").write_text("prompt,completion,label\nq,ok,1\nhello, world,ok,0\n", encoding="utf-8")
    (tmp / "truncated.parquet").write_bytes(b"PAR1\x00\x00garbage")
    write_jsonl(tmp / "columns.jsonl", [{"question": "q", "answer": "a", "label": 1}])
    write_jsonl(tmp / "labels.jsonl", good[:2] + [{"prompt": "p", "completion": "c", "label": "maybe"}])
    (tmp / "empty.jsonl").write_text("\n", encoding="utf-8")
    write_jsonl(tmp / "oneclass.jsonl", [r for r in good if r["label"]])
    write_jsonl(tmp / "emptyprompt.jsonl", good[:2] + [{"prompt": " ", "completion": "c", "label": True}])
    write_jsonl(tmp / "emptycompletion.jsonl", good[:2] + [{"prompt": "p", "completion": "", "label": False}])
    write_jsonl(tmp / "oneprompt.jsonl", [{"prompt": "p", "completion": "a", "label": True}, {"prompt": "p", "completion": "b", "label": False}])
    (tmp / "bad.yaml").write_text("beta: [0.1\n", encoding="utf-8")
    (tmp / "unknown.yaml").write_text("lora_rank: 8\n", encoding="utf-8")
    held = tmp / "held"
    held.mkdir()
    (held / "config.yaml").write_text("model: x\n")
    other = tmp / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    m = ["--model", str(model_dir)]
    return {
        "missing file": (m + ["--data", str(tmp / "nope.jsonl")], "data file not found"),
        "truncated json": (m + ["--data", str(tmp / "truncated.json")], "not valid JSON at line 1"),
        "bad jsonl line": (m + ["--data", str(tmp / "badline.jsonl")], "line 2: not valid JSON"),
        "not utf-8": (m + ["--data", str(tmp / "latin1.csv")], "not UTF-8 text"),
        "bad csv row": (m + ["--data", str(tmp / "fields.csv")], "row 2 (ending on line 3) has 4 fields, the header 3"),
        "truncated parquet": (m + ["--data", str(tmp / "truncated.parquet")], "unreadable parquet file"),
        "unknown columns": (m + ["--data", str(tmp / "columns.jsonl")], "missing column(s) prompt, completion (found: question, answer, label)"),
        "bad label": (m + ["--data", str(tmp / "labels.jsonl")], "row 3, column label: 'maybe' is not a thumbs-up/down label"),
        "empty dataset": (m + ["--data", str(tmp / "empty.jsonl")], "no rows"),
        "empty after split": (m + ["--data", str(tmp / "oneprompt.jsonl"), "--eval-fraction", "0.5"], "no training rows left"),
        "one class": (m + ["--data", str(tmp / "oneclass.jsonl")], "every training row is thumbs-up"),
        "empty prompt": (m + ["--data", str(tmp / "emptyprompt.jsonl")], "row 3, column prompt: empty"),
        "empty completion": (m + ["--data", str(tmp / "emptycompletion.jsonl")], "row 3, column completion: empty"),
        "invalid yaml": (["--recipe", str(tmp / "bad.yaml")], "not valid YAML at line"),
        "unknown recipe key": (["--recipe", str(tmp / "unknown.yaml")], "unknown key 'lora_rank'; did you mean 'lora_r'?"),
        "beta": (m + ["--data", str(ok), "--beta", "-1"], "beta must be > 0"),
        "sft weight": (m + ["--data", str(ok), "--sft-weight", "-1"], "sft_weight must be >= 0"),
        "lr": (m + ["--data", str(ok), "--lr", "0"], "lr must be > 0"),
        "lora r": (m + ["--data", str(ok), "--lora-r", "0"], "lora_r must be >= 1"),
        "length": (m + ["--data", str(ok), "--max-completion-length", "0"], "max_completion_length must be >= 1"),
        "eval fraction": (m + ["--data", str(ok), "--eval-fraction", "1.5"], "eval_fraction must be in [0, 1)"),
        "unknown model": (["--model", "lama-3.2-3b", "--data", str(ok)], "unknown model 'lama-3.2-3b'; did you mean llama-3.2-3b"),
        "output holds a run": (m + ["--data", str(ok), "--output", str(held)], "already holds a run; continue it with --resume"),
        "output holds other files": (m + ["--data", str(ok), "--output", str(other), "--overwrite"], "holds no qbco run"),
        "resume without a run": (["--resume", str(other)], "no qbco run there"),
        "resume with flags": (["--resume", str(held), "--beta", "1"],
                              "--beta cannot change (flags allowed with --resume: --lr, --max-steps, --epochs, --save-every, "
                              "--keep, --memory-budget, --gradient-checkpointing, --report-to, --quiet)"),
        "resume with overwrite": (["--resume", str(held), "--overwrite"], "--overwrite has no effect with --resume"),
        "ema decay without bco": (m + ["--data", str(ok), "--loss", "bce", "--ema-decay", "0.5"],
                                  "--ema-decay has no effect with --loss bce (only bco uses it)"),
        "one class outside bco": (m + ["--data", str(ok), "--loss", "kto", "--allow-one-class"],
                                  "--allow-one-class has no effect with --loss kto (only bco uses it)"),
        "balance with dpo": (m + ["--data", str(ok), "--loss", "dpo", "--balance", "weight"],
                             "--balance has no effect with --loss dpo (only bco, bce and kto use it)"),
    }


CASES = [
    "missing file", "truncated json", "bad jsonl line", "bad csv row", "not utf-8", "truncated parquet", "unknown columns", "bad label",
    "empty dataset", "empty after split", "one class", "empty prompt", "empty completion", "invalid yaml",
    "unknown recipe key", "beta", "sft weight", "lr", "lora r", "length", "eval fraction", "unknown model", "output holds a run",
    "output holds other files", "resume without a run", "resume with flags", "resume with overwrite",
    "ema decay without bco", "one class outside bco", "balance with dpo",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, tiny_model_dir, case):
    args, message = bad_inputs(tmp_path, tiny_model_dir)[case]
    out = tmp_path / "run"
    if "--output" not in args and "--resume" not in args:
        args = args + ["--output", str(out)]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = runner.invoke(app, ["train", "--quiet", *args], env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert message in text, text
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_every_case_is_in_docs_errors_md():
    doc = (ROOT / "docs" / "errors.md").read_text()
    for case in CASES:
        assert f"| {case} |" in doc, case


def test_one_class_trains_when_allowed(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "up.jsonl", [r for r in separable_rows(8) if r["label"]])
    result = train(build_config(model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "run"), max_steps=2,
                                batch_size=2, allow_one_class=True, eval_fraction=0.25), log=lambda m: None)
    assert result.steps == 2


def test_not_enough_disk_for_the_model_cache(tmp_path, monkeypatch):
    import shutil

    import qbco.model.names as names

    monkeypatch.setenv("QBCO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(names.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    result = runner.invoke(app, ["train", "--quiet", "--output", str(tmp_path / "run")])
    assert result.exit_code == 2 and "not enough disk for the model cache" in result.output
    assert not (tmp_path / "run").exists() and not list((tmp_path / "cache").glob("*"))


# ------------------------------------------------------------------ interruptions


class SignalAt:
    """A progress sink that sends the process a real SIGINT after step `at` (the loop's handler takes it)."""

    def __init__(self, at):
        self.at, self.done = at, 0

    def add_task(self, *a, completed=0, **k):
        self.done = completed
        return 0

    def update(self, task, advance=0, **k):
        self.done += advance
        if self.done == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def settings(tmp_path, data, name, **extra):
    values = dict(model=None, data=str(data), output=str(tmp_path / name), eval_fraction=0.25, lr=1e-2, beta=0.5,
                  epochs=3, batch_size=4, save_every=4, max_prompt_length=32, max_completion_length=16, load_in_4bit=True)
    values.update(extra)
    return values


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_sigint_then_resume_equals_a_straight_run(tmp_path, tiny_model_dir, separable_file):
    common = settings(tmp_path, separable_file, "x", model=str(tiny_model_dir))
    straight = train(build_config(**{**common, "output": str(tmp_path / "straight")}), log=lambda m: None)
    cut = build_config(**{**common, "output": str(tmp_path / "cut")})
    with pytest.raises(TrainingStopped) as stop:
        train(cut, progress=SignalAt(6), log=lambda m: None)
    assert stop.value.exit_code == 130 and f"--resume {tmp_path / 'cut'}" in str(stop.value)
    assert [c.name for c in RunFolder(tmp_path / "cut").checkpoints()] == ["step-00000004", "step-00000006"]
    assert len(metrics(tmp_path / "cut")) == 6 and not (tmp_path / "cut" / "adapter").exists()
    resumed = train(cut, resume=tmp_path / "cut", log=lambda m: None)
    a, b = metrics(straight.output), metrics(resumed.output)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in ("loss", "delta", "reward_up", "reward_down", "lr", "grad_norm", "eval_loss", "eval_reward_accuracy"):
            if x.get(key) is None:
                assert y.get(key) is None, (x["step"], key)
            else:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    wa, wb = load_file(straight.output / "adapter/adapter_model.safetensors"), load_file(resumed.output / "adapter/adapter_model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert len(RunFolder(resumed.output).checkpoints()) == 2  # --keep 2


def test_cli_sigint_prints_the_resume_command_that_finishes_the_run(tmp_path, tiny_model_dir, separable_file):
    """The issue's check, as a user does it: Ctrl-C a running `qbco train`, run the command it prints."""
    args = ["train", "--quiet", "--model", str(tiny_model_dir), "--data", str(separable_file), "--eval-fraction", "0.25",
            "--epochs", "3", "--batch-size", "4", "--lr", "1e-2", "--save-every", "1000", "--no-4bit"]
    cmd = [sys.executable, "-c", "from qbco.cli.main import app; app()"]
    out = tmp_path / "cli"
    proc = subprocess.Popen(cmd + args + ["--output", str(out)], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and (not (out / "metrics.jsonl").exists() or len(metrics(out)) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    command = re.search(r"qbco train --resume (\S+)", " ".join(err.split()))
    assert command and Path(command.group(1)) == out
    stopped_at = len(metrics(out))
    assert 3 <= stopped_at
    done = subprocess.run(cmd + ["train", "--quiet", "--resume", command.group(1)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    final = metrics(out)
    assert final[-1]["split"] == "eval" and [m["step"] for m in final[:-1]] == list(range(1, len(final)))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_non_finite_loss_stops_and_keeps_the_last_good_state(tmp_path, tiny_model_dir, separable_file):
    config = build_config(**settings(tmp_path, separable_file, "nan", model=str(tiny_model_dir), lr=1e30, load_in_4bit=False))
    with pytest.raises(TrainingStopped) as stop:
        train(config, log=lambda m: None)
    message = str(stop.value)
    assert stop.value.exit_code == 3 and "is not finite" in message and "--lr" in message
    step = int(re.search(r"step (\d+):", message).group(1))
    assert re.search(r"separable\.jsonl:\d+", message)  # the rows of the batch, by source row
    (kept,) = RunFolder(tmp_path / "nan").checkpoints()
    assert json.loads((kept / "state.json").read_text())["step"] == step - 1
    weights = load_file(kept / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_torch_load_is_always_weights_only():
    for path in (ROOT / "qbco").rglob("*.py"):
        for line in path.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"


# ------------------------------------------------------------------ non-finite held-out rewards (issue 25)


def strict_json(line):
    """json.loads that refuses NaN and Infinity, as every JSON reader but Python's does."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_non_finite_held_out_rewards_are_counted_not_folded_into_a_class(tmp_path, tiny_model_dir, separable_file, monkeypatch):
    """Two held-out rows whose reward overflowed (NaN, inf): the run still finishes; its held-out line counts
    them apart and figures on the others (a NaN used to count as a thumbs-down and make eval_loss NaN, written
    as NaN, which is not JSON), and the calibration leaves them out with a count instead of a traceback."""
    from qbco.train import loop

    real = loop.implicit_rewards

    def overflowing(policy, reference, beta):
        rewards = real(policy, reference, beta).clone()
        rewards[0], rewards[1] = float("nan"), float("inf")
        return rewards

    monkeypatch.setattr(loop, "implicit_rewards", overflowing)
    config = build_config(**settings(tmp_path, separable_file, "nan-eval", model=str(tiny_model_dir), load_in_4bit=False,
                                     epochs=1))
    result = train(config, log=lambda m: None)
    lines = (result.output / "metrics.jsonl").read_text().splitlines()
    held = [strict_json(line) for line in lines][-1]
    assert held["split"] == "eval" and held["eval_non_finite"] == 2 and held["eval_loss"] is not None
    n = held["eval_rows"] - 2
    assert held["eval_reward_accuracy"] * n == pytest.approx(round(held["eval_reward_accuracy"] * n))  # of the finite rows
    calibration = json.loads((result.output / "calibration.json").read_text())
    assert calibration["dropped"] == 2


def test_the_metrics_log_writes_no_nan(tmp_path):
    from qbco.run.metrics_log import MetricsWriter

    with MetricsWriter(tmp_path / "m.jsonl") as log:
        log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "delta": 0.5})
    assert strict_json((tmp_path / "m.jsonl").read_text()) == {"step": 1, "loss": None, "grad_norm": None, "delta": 0.5}


# ------------------------------------------------------------------ SIGTERM in every phase (issue 25)

# `qbco train` in a process of its own that sends itself a real SIGTERM at a chosen point: the `at`-th batch of
# the reference pass, or the start of the `at`-th optimizer step (as `kill PID` or a scheduler would).
SIGTERM_DRIVER = """
import os, signal, sys
import qbco.model.logprobs as logprobs
import qbco.train.loop as loop
where, at = sys.argv[1], int(sys.argv[2])
del sys.argv[1:3]
calls, steps = [0], [0]
real_logps, real_step = logprobs.completion_logps, loop.optimizer_step
def counted(*a, **k):
    if where == "reference" and not steps[0]:
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGTERM)
    return real_logps(*a, **k)
def step(*a, **k):
    steps[0] += 1
    if where == "step" and steps[0] == at:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_step(*a, **k)
logprobs.completion_logps, loop.optimizer_step = counted, step
from qbco.cli.main import app
app()
"""


@pytest.mark.parametrize("where, at", [("reference", 3), ("step", 5)])
def test_sigterm_then_resume_equals_a_straight_run(tmp_path, tiny_model_dir, separable_file, monkeypatch, where, at):
    """SIGTERM to `qbco train` in the reference pass (before: the process ended at once, exit -15, with no word)
    and in a step: exit 130 with the command that continues; that command finishes the run, equal to a straight
    one step for step and in its adapter."""
    from test_resume import assert_same_run, cli_args
    from test_resume import settings as resume_settings

    monkeypatch.setenv("QBCO_CACHE", str(tmp_path / "cache"))  # the reference pass really runs
    env = {**os.environ, "COLUMNS": "400"}
    values = resume_settings(tmp_path, separable_file, tiny_model_dir, "cut", max_steps=8, save_every=4)
    cut = tmp_path / "cut"
    stopped = subprocess.run([sys.executable, "-c", SIGTERM_DRIVER, where, str(at), "train", "--quiet", *cli_args(values)],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    said = " ".join(stopped.stderr.split())
    assert stopped.returncode == 130, (stopped.returncode, stopped.stderr[-2000:])
    assert "Traceback" not in stopped.stderr
    if where == "reference":
        assert "interrupted in the reference pass" in said and "no checkpoint yet" in said, said
        assert not RunFolder(cut).checkpoints() and list((tmp_path / "cache" / "reference").glob("*.parts/part-*"))
    else:
        assert f"SIGTERM at step {at} of 8: checkpoint written to" in said, said
        assert [c.name for c in RunFolder(cut).checkpoints()] == ["step-00000004", f"step-{at:08d}"]
    command = re.search(r"qbco train --resume ([^\s,]+)", said)
    assert command and Path(command.group(1)) == cut
    done = subprocess.run([sys.executable, "-c", "from qbco.cli.main import app; app()", "train", "--quiet", "--resume", str(cut)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    straight = train(build_config(**{**values, "output": str(tmp_path / "straight")}), log=lambda m: None).output
    assert_same_run(straight, cut)


def test_sigterm_stops_merge_with_nothing_under_the_output_name(tiny_run, tmp_path):
    """merge under SIGTERM while saving: exit 130, one line, no OUT and no temporary folder beside it (before: the
    process ended at once and left its .merged.partial-* folder behind)."""
    driver = """
import os, signal, sys
import qbco.export.merge as merging
real = merging.save_merged
def save_then_term(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), signal.SIGTERM)
merging.save_merged = save_then_term
from qbco.cli.main import app
app()
"""
    out = tmp_path / "out"
    out.mkdir()
    merged = subprocess.run([sys.executable, "-c", driver, "merge", str(tiny_run), "-o", str(out / "merged"), "--device", "cpu"],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"}, timeout=300)
    assert merged.returncode == 130, merged.stderr[-2000:]
    assert "interrupted: SIGTERM" in merged.stderr and "Traceback" not in merged.stderr
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------ a full disk at every write of a run (issue 25)


def no_space(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


class FullFile:
    """A file on a full disk: every write fails with ENOSPC."""

    def __init__(self, *a, **k):
        pass

    def write(self, data):
        no_space()

    def flush(self):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_full_disk_appending_the_metrics_log_is_one_line(tmp_path):
    from qbco.common.errors import QbcoError
    from qbco.run.metrics_log import MetricsWriter

    log = tmp_path / "metrics.jsonl"
    with MetricsWriter(log) as writer:
        writer.write({"step": 1})
        writer.file = FullFile()
        with pytest.raises(QbcoError) as full:
            writer.write({"step": 2})
    message = str(full.value)
    assert message.startswith(f"the disk is full: appending to {log} failed") and "keeps the lines before" in message
    assert f"qbco train --resume {tmp_path}" in message and "\n" not in message
    assert log.read_text() == '{"step": 1}\n'


@pytest.mark.parametrize("what", ["config.yaml", "keep_steps", "calibration.json"])
def test_a_full_disk_writing_a_run_file_names_it_and_keeps_the_old_one(tmp_path, monkeypatch, what):
    """Every other file of a run is written beside and renamed (common.files.write_text): on a full disk the write
    is one line naming the file, and the file as it was stays."""
    import qbco.common.files as files
    from qbco.common.files import DiskFull
    from qbco.reward.calibration import identity

    folder = RunFolder(tmp_path)
    config = build_config(data="demo", output=str(tmp_path))
    folder.save_config(config)
    folder.metrics_file.write_text('{"step": 1}\n{"step": 2}\n')
    folder.save_calibration(identity("before"))
    target = {"config.yaml": folder.config_file, "keep_steps": folder.metrics_file, "calibration.json": folder.calibration_file}[what]
    before = target.read_bytes()
    monkeypatch.setattr(files.os, "fdopen", FullFile)
    with pytest.raises(DiskFull) as full:
        {"config.yaml": lambda: folder.save_config(config, ["resumed"]), "keep_steps": lambda: folder.keep_steps(1),
         "calibration.json": lambda: folder.save_calibration(identity("after"))}[what]()
    assert str(target) in str(full.value) and "what was there before is intact" in str(full.value)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.json", "config.yaml", "metrics.jsonl"]  # no temp left
