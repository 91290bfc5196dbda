"""Outputs never overwrite each other (`qbco eval RUN --data X` has its own folder; `qbco train --recipe
RUN/config.yaml` makes a new run), and a full disk while a checkpoint or a merged model is written leaves the
previous one intact, says the disk is full and gives nothing half-written a final name."""

import errno
import json
import shutil

import pytest
import torch
from conftest import separable_rows
from safetensors import SafetensorError
from test_reliability import write_jsonl
from test_resume import snapshot
from typer.testing import CliRunner

from qbco.cli.main import app
from qbco.common.errors import QbcoError
from qbco.run import folder as run_folder
from qbco.run.folder import RunFolder

runner = CliRunner()
WIDE = {"COLUMNS": "400"}


@pytest.fixture
def run_copy(tmp_path, tiny_run):
    """A copy of the session's finished tiny run, free to be written into."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


def test_eval_on_other_data_writes_its_own_folder(run_copy, tmp_path):
    """The held-out evaluation stays in RUN/eval/; --data X goes to RUN/eval-X/; another file of the same name
    gets RUN/eval-X-2/; the same file again replaces only its own folder."""
    assert runner.invoke(app, ["eval", str(run_copy)]).exit_code == 0
    held_out = snapshot(run_copy / "eval")
    (tmp_path / "a").mkdir()
    first = write_jsonl(tmp_path / "a" / "extra.jsonl", separable_rows(6, seed=1))
    result = runner.invoke(app, ["eval", str(run_copy), "--data", str(first)])
    assert result.exit_code == 0, result.output
    assert snapshot(run_copy / "eval") == held_out
    report = json.loads((run_copy / "eval-extra" / "metrics.json").read_text())
    assert report["data"] == f"{first} (all rows)" and report["overall"]["binary"]["rows"] == len(separable_rows(6, seed=1))

    (tmp_path / "b").mkdir()
    second = write_jsonl(tmp_path / "b" / "extra.jsonl", separable_rows(4, seed=2))
    assert runner.invoke(app, ["eval", str(run_copy), "--data", str(second)]).exit_code == 0
    mine = snapshot(run_copy / "eval-extra")
    assert json.loads((run_copy / "eval-extra-2" / "metrics.json").read_text())["data"] == f"{second} (all rows)"
    assert runner.invoke(app, ["eval", str(run_copy), "--data", str(first)]).exit_code == 0
    assert snapshot(run_copy / "eval-extra").keys() == mine.keys() and not (run_copy / "eval-extra-3").exists()
    assert snapshot(run_copy / "eval") == held_out
    assert not list(run_copy.glob(".*"))  # no temporary folder left


def test_rerun_with_the_runs_own_config_makes_a_new_run(run_copy, tmp_path, monkeypatch):
    """README: rerun with `qbco train --recipe RUN/config.yaml`. It starts a new run folder and leaves RUN as
    it was, also for a config.yaml that names RUN as its output (as older runs wrote it)."""
    monkeypatch.chdir(tmp_path)
    config = run_copy / "config.yaml"
    before = snapshot(run_copy)
    first = runner.invoke(app, ["train", "--quiet", "--recipe", str(config)])
    assert first.exit_code == 0, first.output
    assert "output: null" in config.read_text()  # what a run writes now
    config.write_text(config.read_text().replace("output: null", f"output: {run_copy}"))
    before = snapshot(run_copy)
    result = runner.invoke(app, ["train", "--quiet", "--recipe", str(config)])  # at once: the same timestamp
    assert result.exit_code == 0, result.output
    new = sorted((tmp_path / "runs").iterdir())
    assert len(new) == 2 and snapshot(run_copy) == before
    for folder in new:
        assert RunFolder(folder).metrics().steps[-1]["step"] == RunFolder(run_copy).metrics().steps[-1]["step"]
        assert (folder / "adapter" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------ disk full


@pytest.mark.parametrize("failure", ["oserror", "safetensors", "torch"])
def test_a_full_disk_leaves_the_folder_as_it_was(tmp_path, monkeypatch, failure):
    """The helper every published folder goes through (checkpoints, the adapter, the merged model, the
    converted model): a write that fails on a full disk, in each form the libraries report it, is one line
    that says so, the folder under the final name is the previous one, and the half-written one is gone."""
    import shutil as sh

    target = tmp_path / "merged"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"the previous model")
    errors = {
        "oserror": OSError(errno.ENOSPC, "No space left on device"),
        "safetensors": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        # torch.save on ENOSPC: a RuntimeError without an errno; the disk's free space tells
        "torch": RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"),
    }
    if failure == "torch":
        monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(QbcoError) as full:
        with run_folder.atomic_folder(target) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half a mod")
            raise errors[failure]
    assert "the disk is full" in str(full.value) and str(target) in str(full.value) and "\n" not in str(full.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert (target / "model.safetensors").read_bytes() == b"the previous model"


def test_other_failures_are_not_called_a_full_disk(tmp_path):
    """A failure with room on the disk, and the product's own refusals (merge's failed verification), pass as they are."""
    for error in (RuntimeError("a bug"), QbcoError("verification failed: ...")):
        with pytest.raises(type(error)) as raised:
            with run_folder.atomic_folder(tmp_path / "out") as tmp:
                (tmp / "x").write_text("half")
                raise error
        assert raised.value is error and not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_disk_full_while_checkpointing(tmp_path, tiny_model_dir, separable_file, monkeypatch):
    """The second checkpoint's state.pt fails as torch.save fails on a full disk: `qbco train` says the disk
    is full, exits 2, keeps step-2 intact and leaves no half checkpoint; with space again, --resume finishes."""
    import shutil as sh

    import qbco.train.checkpoint as ckpt

    real_save, calls = ckpt.torch.save, []

    def failing_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half")
            monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(10 << 30, 10 << 30, 3 << 20))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    out = tmp_path / "run"
    args = ["train", "--quiet", "--model", str(tiny_model_dir), "--data", str(separable_file), "--output", str(out),
            "--eval-fraction", "0.25", "--batch-size", "4", "--max-steps", "6", "--save-every", "2", "--no-4bit",
            "--max-prompt-length", "32", "--max-completion-length", "16"]
    result = runner.invoke(app, args, env=WIDE)
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert ("the disk is full: writing checkpoint step-00000004 failed with 3 MiB free" in text
            and "the last complete checkpoint, step-00000002, is intact" in text and f"qbco train --resume {out}" in text), text
    assert [c.name for c in RunFolder(out).checkpoints()] == ["step-00000002"] and not list((out / "checkpoints").glob(".*"))
    assert torch.load(out / "checkpoints/step-00000002/state.pt", weights_only=True)["scheduler"]["last_epoch"] == 2

    monkeypatch.undo()  # space again
    done = runner.invoke(app, ["train", "--quiet", "--resume", str(out)])
    assert done.exit_code == 0, done.output
    assert [m["step"] for m in RunFolder(out).metrics().steps] == list(range(1, 7))
