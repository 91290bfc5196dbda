"""Runs that survive what happens to real runs: kill -9, inputs edited under a run, a NaN stop whose advice
(--lr) is followed, Ctrl-C in the reference pass; and a resumed run is the run it would have been with
dropout, gradient accumulation, kto, dpo and --balance oversample (the RNG restored, also at a NaN stop)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file
from test_reliability import SignalAt, write_jsonl
from typer.testing import CliRunner

from qbco.cli.main import app
from qbco.common.errors import TrainingStopped
from qbco.data.feedback import load_feedback
from qbco.reward import objectives
from qbco.run.config import build_config, load_run_config
from qbco.run.folder import RunFolder
from qbco.train.loop import train

runner = CliRunner()
QUIET = dict(log=lambda m: None)
COMPARED = ("loss", "delta", "reward_up", "reward_down", "lr", "grad_norm", "kl", "eval_loss", "eval_reward_accuracy")


def settings(tmp_path, data, model, name, **extra):
    values = dict(model=str(model), data=str(data), output=str(tmp_path / name), eval_fraction=0.25, lr=1e-2, beta=0.5,
                  batch_size=4, max_steps=8, save_every=4, max_prompt_length=32, max_completion_length=16, load_in_4bit=False)
    values.update(extra)
    return values


def cli_args(values: dict) -> list[str]:
    args = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        if k == "load_in_4bit":
            args.append("--4bit" if v else "--no-4bit")
        elif v is not None:
            args += [flag, str(v)]
    return args


def assert_same_run(a, b):
    """Every per-step figure and the held-out line equal, and the final adapters equal."""
    ma, mb = RunFolder(a).metrics(), RunFolder(b).metrics()
    assert [m["step"] for m in ma.steps] == [m["step"] for m in mb.steps]
    for x, y in zip(ma.steps + [ma.eval], mb.steps + [mb.eval]):
        for key in COMPARED:
            if x.get(key) is None:
                assert y.get(key) is None, (x["step"], key)
            else:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    wa, wb = load_file(a / "adapter/adapter_model.safetensors"), load_file(b / "adapter/adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ kill -9


def test_kill_9_mid_run_then_resume_equals_a_straight_run(tmp_path, tiny_model_dir, separable_file):
    """A real SIGKILL of `qbco train` once a checkpoint exists and later steps are logged; the log then ends in
    a half-written line (what a kill in the middle of a write leaves) and a half-written checkpoint folder lies
    beside the complete ones. `qbco train --resume RUN` continues and gives the straight run."""
    values = settings(tmp_path, separable_file, tiny_model_dir, "killed", max_steps=24, epochs=3)
    straight = train(build_config(**{**values, "output": str(tmp_path / "straight")}), **QUIET).output
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", "from qbco.cli.main import app; app()", "train", "--quiet", *cli_args(values)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the tests' own process (conftest): a tiny model, one thread
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    deadline, started = time.time() + 300, time.time()
    while time.time() < deadline and proc.poll() is None:
        if RunFolder(out).checkpoints() and (out / "metrics.jsonl").is_file() and len(RunFolder(out).metrics().steps) >= 6:
            break
        time.sleep(0.02)
    print(f"killed after {time.time() - started:.1f}s")
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    logged = len(RunFolder(out).metrics().steps)
    assert 6 <= logged < 24 and not (out / "adapter").exists()
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": %d, "loss": 0.69' % (logged + 1))
    last = RunFolder(out).checkpoints()[-1]
    partial = last.with_name(f".step-{logged + 1:08d}.partial-killed")
    shutil.copytree(last, partial)
    (partial / "state.json").unlink()

    result = runner.invoke(app, ["train", "--quiet", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert_same_run(straight, out)
    assert not list((out / "checkpoints").glob(".*"))  # the half-written checkpoint folder is gone


# ------------------------------------------------------------------ inputs changed under a run


def test_resume_refuses_when_the_inputs_changed(tmp_path, tiny_model_dir, separable_file):
    """A checkpoint records what the row order and the reference depend on; --resume names what changed and
    writes nothing. Unchanged inputs resume (the other tests)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    values = settings(tmp_path, separable_file, model, "run", max_steps=2)
    train(build_config(**values), **QUIET)
    out = tmp_path / "run"
    before = snapshot(out)
    original = separable_file.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in original.splitlines()]
    train_rows, _ = load_feedback(str(separable_file), 0.25, 0)
    first = next(i for i, r in enumerate(rows) if r["prompt"] == train_rows[0].prompt and r["completion"] == train_rows[0].completion)

    def refused(expected):
        result = runner.invoke(app, ["train", "--quiet", "--resume", str(out)], env={"COLUMNS": "400"})
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and "the inputs changed since step-00000002 was written" in text, text
        assert expected in text, text
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
        assert snapshot(out) == before  # nothing written

    flipped = [dict(r, label=not r["label"]) if i == first else r for i, r in enumerate(rows)]
    write_jsonl(separable_file, flipped)
    refused("the labels")
    edited = [dict(r, completion=r["completion"] + " indeed") if i == first else r for i, r in enumerate(rows)]
    write_jsonl(separable_file, edited)
    refused("the training rows (edited)")
    write_jsonl(separable_file, rows + [dict(rows[first], completion="good answer a1 , again")])
    refused(f"the training rows ({len(train_rows)} rows then, {len(train_rows) + 1} rows now)")

    separable_file.write_text(original, encoding="utf-8")
    for path in model.iterdir():  # the same base with new dates (copied, converted again): still the same run
        os.utime(path, (time.time() + 60, time.time() + 60))
    again = runner.invoke(app, ["train", "--quiet", "--resume", str(out)])
    assert again.exit_code == 0, again.output
    before = snapshot(out)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    make_tiny_llama(vocab, seed=5).save_pretrained(model)  # the base re-saved with other weights
    refused("the base model")


# ------------------------------------------------------------------ the NaN stop's advice, followed


class PoisonStep:
    """The loss of optimizer step `step` becomes NaN after every micro-batch of it ran its forward (and drew
    its dropout masks), as a real divergence does."""

    def __init__(self, monkeypatch, objective, step, grad_accum=1):
        self.calls, self.active = 0, True
        real = objective.loss

        def loss(obj, batch, window):
            out = real(obj, batch, window)
            self.calls += 1
            if self.active and self.calls == step * grad_accum:
                out.loss = out.loss * float("nan")
            return out

        monkeypatch.setattr(objective, "loss", loss)


def test_the_nan_advice_can_be_followed(tmp_path, tiny_model_dir, separable_file, monkeypatch):
    """`stopped: ... Try a lower --lr`; `qbco train --resume RUN --lr X` continues with X from the checkpoint
    (recorded in config.yaml); --max-steps extends the run. The schedule is linear decay without warm-up here:
    step k runs at lr * (total - k + 1) / total."""
    values = settings(tmp_path, separable_file, tiny_model_dir, "nan", save_every=100, warmup_ratio=0.0)
    out = tmp_path / "nan"
    poison = PoisonStep(monkeypatch, objectives.BCO, step=3)
    stopped = runner.invoke(app, ["train", "--quiet", *cli_args(values)], env={"COLUMNS": "400"})
    assert stopped.exit_code == 3 and "Try a lower --lr (now 0.01)" in " ".join(stopped.output.split()), stopped.output
    poison.active = False

    resumed = runner.invoke(app, ["train", "--quiet", "--resume", str(out), "--lr", "0.005"])
    assert resumed.exit_code == 0, resumed.output
    steps = RunFolder(out).metrics().steps
    assert [m["step"] for m in steps] == list(range(1, 9))
    expected = [0.01 * (9 - k) / 8 for k in (1, 2)] + [0.005 * (9 - k) / 8 for k in range(3, 9)]
    assert [m["lr"] for m in steps] == pytest.approx(expected, rel=1e-9)
    assert load_run_config(out / "config.yaml").lr == 0.005  # a further --resume continues with it
    assert (out / "config.yaml").read_text().startswith("# --resume at step 2: lr 0.005 (was 0.01)\n")

    longer = runner.invoke(app, ["train", "--quiet", "--resume", str(out), "--max-steps", "10"])
    assert longer.exit_code == 0, longer.output
    steps = RunFolder(out).metrics().steps
    assert [m["step"] for m in steps] == list(range(1, 11))
    assert [m["lr"] for m in steps[8:]] == pytest.approx([0.005 * (11 - k) / 10 for k in (9, 10)], rel=1e-9)
    assert config_lines(out)[:2] == ["# --resume at step 2: lr 0.005 (was 0.01)", "# --resume at step 8: max_steps 10 (was 8)"]

    short = runner.invoke(app, ["train", "--quiet", "--resume", str(out), "--max-steps", "4"], env={"COLUMNS": "400"})
    assert short.exit_code == 2 and "the run is at step 10, past the 4 steps" in " ".join(short.output.split())
    beta = runner.invoke(app, ["train", "--quiet", "--resume", str(out), "--beta", "1"], env={"COLUMNS": "400"})
    assert beta.exit_code == 2 and "--beta cannot change" in beta.output


def config_lines(out):
    return (out / "config.yaml").read_text().splitlines()


# ------------------------------------------------------------------ the RNG, restored


def test_nan_checkpoint_keeps_the_rng_from_before_the_failed_step(tmp_path, tiny_model_dir, separable_file, monkeypatch):
    """With lora_dropout and accumulation the failed step drew dropout masks; the NaN checkpoint holds the RNG
    from before them, so the resumed run draws them again and equals a run that never failed."""
    values = settings(tmp_path, separable_file, tiny_model_dir, "x", lora_dropout=0.2, batch_size=2, grad_accum=2,
                      max_steps=6, save_every=100)
    straight = train(build_config(**{**values, "output": str(tmp_path / "straight")}), **QUIET).output
    config = build_config(**{**values, "output": str(tmp_path / "failed")})
    poison = PoisonStep(monkeypatch, objectives.BCO, step=4, grad_accum=2)
    with pytest.raises(TrainingStopped) as stop:
        train(config, **QUIET)
    assert stop.value.exit_code == 3 and [c.name for c in RunFolder(config_out(config)).checkpoints()] == ["step-00000003"]
    poison.active = False
    train(config, resume=config_out(config), **QUIET)
    assert_same_run(straight, config_out(config))


def config_out(config):
    from pathlib import Path

    return Path(config.output)


EQUIVALENCE = {
    "kto": dict(loss="kto"),
    "dpo": dict(loss="dpo"),
    "oversample": dict(balance="oversample"),
}


@pytest.mark.parametrize("case", list(EQUIVALENCE))
def test_resume_equals_a_straight_run(tmp_path, tiny_model_dir, separable_file, case):
    """Ctrl-C after step 3 and --resume, with lora_dropout 0.2 and 2 micro-batches a step: the same run."""
    values = settings(tmp_path, separable_file, tiny_model_dir, "x", lora_dropout=0.2, batch_size=2, grad_accum=2,
                      max_steps=6, save_every=100, **EQUIVALENCE[case])
    straight = train(build_config(**{**values, "output": str(tmp_path / "straight")}), **QUIET).output
    config = build_config(**{**values, "output": str(tmp_path / "cut")})
    with pytest.raises(TrainingStopped):
        train(config, progress=SignalAt(3), **QUIET)
    assert [c.name for c in RunFolder(tmp_path / "cut").checkpoints()] == ["step-00000003"]
    train(config, resume=tmp_path / "cut", **QUIET)
    assert_same_run(straight, tmp_path / "cut")


# ------------------------------------------------------------------ Ctrl-C in the reference pass


@pytest.fixture
def default_sigint():
    """Ctrl-C as a fresh `qbco` process gets it (KeyboardInterrupt), whatever handler an earlier test left."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_in_the_reference_pass_keeps_the_finished_part(tmp_path, tiny_model_dir, separable_file, monkeypatch, default_sigint):
    """A real SIGINT after 3 batches of the reference pass: the message says how many rows are kept and that
    there is no checkpoint; the same command, interrupted again, adds to them; --resume then computes only the
    batches no one computed, and the run equals one whose reference pass was never interrupted."""
    import qbco.model.logprobs as logprobs
    import qbco.train.loop as qtrain

    monkeypatch.setenv("QBCO_CACHE", str(tmp_path / "cache"))  # nothing of this data cached yet
    values = settings(tmp_path, separable_file, tiny_model_dir, "run", max_steps=3)
    out = tmp_path / "run"
    calls, started = [], []
    interrupt_at = {"call": None}
    real_logps, real_step = logprobs.completion_logps, qtrain.optimizer_step

    def counted_logps(*a, **k):  # the reference pass, until the first optimizer step
        if not started:
            calls.append(1)
            if len(calls) == interrupt_at["call"]:
                os.kill(os.getpid(), signal.SIGINT)
        return real_logps(*a, **k)

    def first_step(*a, **k):
        started.append(1)
        return real_step(*a, **k)

    monkeypatch.setattr(logprobs, "completion_logps", counted_logps)
    monkeypatch.setattr(qtrain, "optimizer_step", first_step)
    train_rows, eval_rows = load_feedback(str(separable_file), 0.25, 0)
    total = len(train_rows) + len(eval_rows)
    batches = -(-len(train_rows) // 4) + -(-len(eval_rows) // 4)
    command = ["train", "--quiet", *cli_args(values)]

    interrupt_at["call"] = 4
    first = runner.invoke(app, command, env={"COLUMNS": "400"})
    text = " ".join(first.output.split())
    assert first.exit_code == 130, first.output
    assert f"the reference log-probs of 12 of {total} rows are kept" in text and "no checkpoint yet" in text, text
    assert f"qbco train --resume {out}" in text

    calls.clear()
    interrupt_at["call"] = 3
    again = runner.invoke(app, command, env={"COLUMNS": "400"})  # the same command: no --overwrite needed
    assert again.exit_code == 130 and f"of 20 of {total} rows are kept" in " ".join(again.output.split()), again.output

    calls.clear()
    interrupt_at["call"] = None
    done = runner.invoke(app, ["train", "--quiet", "--resume", str(out)])
    assert done.exit_code == 0, done.output
    assert len(calls) == batches - 5  # the 5 batches kept were not computed again

    monkeypatch.setenv("QBCO_CACHE", str(tmp_path / "fresh-cache"))
    straight = train(build_config(**{**values, "output": str(tmp_path / "straight")}), **QUIET).output
    assert_same_run(straight, out)


def test_leftovers_of_a_killed_checkpoint_write(tmp_path):
    """Killed between atomic_folder's two renames, a checkpoint being replaced lies under .NAME.old-PID: it is
    put back; a half-written .NAME.partial-* folder is removed; complete checkpoints stay."""

    folder = tmp_path / "checkpoints"
    for name in ("step-00000002", ".step-00000004.old-123", ".step-00000006.partial-abc", ".step-00000002.old-9"):
        (folder / name).mkdir(parents=True)
        (folder / name / "state.json").write_text("{}")
    RunFolder(tmp_path).remove_leftovers()
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000002", "step-00000004"]
    assert [p.name for p in RunFolder(tmp_path).checkpoints()] == ["step-00000002", "step-00000004"]


# ------------------------------------------------------------------ library versions and the weights (issue 25)


def test_a_library_upgraded_under_a_run_is_named_on_resume(tmp_path, tiny_model_dir, separable_file):
    """Every checkpoint records the versions of torch, transformers, peft and bitsandbytes; a resume under other
    ones goes on, with a warning naming each library that changed and from which version to which."""
    from qbco.train.checkpoint import LIBRARIES, library_versions

    values = settings(tmp_path, separable_file, tiny_model_dir, "run", max_steps=2, save_every=2)
    out = train(build_config(**values), **QUIET).output
    (checkpoint,) = RunFolder(out).checkpoints()
    record = json.loads((checkpoint / "state.json").read_text())
    now = record["inputs"]["library versions"]
    assert now == library_versions() and all(f"{name} " in now for name in LIBRARIES)
    record["inputs"]["library versions"] = now.replace("transformers ", "transformers 0.0.1-was-").replace(
        "bitsandbytes ", "bitsandbytes 0.0.2-was-")
    then = dict(item.split(" ", 1) for item in record["inputs"]["library versions"].split(", "))
    (checkpoint / "state.json").write_text(json.dumps(record))
    shutil.rmtree(out / "adapter")
    lines = []
    train(build_config(**{**values, "max_steps": 4}), resume=out, log=lines.append)
    (warning,) = [line for line in lines if line.startswith("warning:")]
    assert f"transformers {then['transformers']} -> {then['transformers'].split('-was-')[1]}" in warning
    assert "bitsandbytes 0.0.2-was-" in warning and "torch" not in warning and "peft" not in warning
    assert f"since {checkpoint.name} was written" in warning


def test_the_weights_sample_sees_an_edit_in_the_middle_of_a_file(tmp_path):
    """base_fingerprint reads a weight file's first and last MiB only; weights_sample reads 64 blocks spread over
    it, so an edit in the middle of a large file changes the fingerprint a resume checks."""
    from qbco.train.checkpoint import base_fingerprint, weights_sample

    path = tmp_path / "model.safetensors"
    data = bytearray(os.urandom(8 << 20))
    path.write_bytes(bytes(data))
    (tmp_path / "config.json").write_text("{}")
    before = base_fingerprint(str(tmp_path)), weights_sample(str(tmp_path))
    middle = (len(data) - (1 << 16)) * 32 // 63 + 100  # inside the 33rd of the 64 blocks
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))
    after = base_fingerprint(str(tmp_path)), weights_sample(str(tmp_path))
    assert after[0] == before[0] and after[1] != before[1]
