"""qbco train --report-to: each tracker, offline, holds the step values metrics.jsonl holds, read back with the
tracker's own reader (TensorBoard's event accumulator, MLflow's client, W&B's offline run file, Trackio's store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import separable_rows

from qbco.common.errors import QbcoError
from qbco.run.config import build_config, report_targets
from qbco.train.report import check_trackers, scalars


def test_report_to_names_trackers_and_refuses_others():
    assert report_targets("none") == [] and report_targets("") == []
    assert report_targets("tensorboard, mlflow,tensorboard") == ["tensorboard", "mlflow"]
    assert build_config(report_to="wandb,trackio").report_to == "wandb,trackio"
    with pytest.raises(QbcoError, match="report_to must be none or any of tensorboard"):
        build_config(report_to="tensorbord")


def test_a_missing_tracker_is_one_line_with_its_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(QbcoError, match=r"the wandb package is not installed; pip install 'qbco\[wandb\]'"):
        check_trackers("tensorboard,wandb")


def test_scalars_keep_the_numbers():
    assert scalars({"step": 3, "loss": 0.5, "skipped": False, "grad_norm": None, "split": "eval"}) == {"loss": 0.5, "skipped": 0.0}


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory, tiny_model_dir):
    """One tiny run through the real command line, reporting to all four trackers, each in its offline mode."""
    tmp = tmp_path_factory.mktemp("reported")
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in separable_rows(20)), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_"))}
    env |= {"TRACKIO_DIR": str(tmp / "trackio"), "WANDB_DISABLE_CODE": "true", "WANDB_DISABLE_GIT": "true",
            "PYTHONPATH": os.pathsep.join([str(os.path.dirname(os.path.dirname(__file__))), env.get("PYTHONPATH", "")])}
    run = tmp / "run"
    done = subprocess.run([sys.executable, "-c", "from qbco.cli.main import app; app()", "train", "--model",
                           str(tiny_model_dir), "--data", str(data), "--output", str(run), "--max-steps", "3",
                           "--batch-size", "8", "--eval-fraction", "0.25", "--max-prompt-length", "32",
                           "--max-completion-length", "16", "--report-to", "tensorboard,mlflow,wandb,trackio", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps, held_out = [], None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("split") == "eval":
            held_out = record
        else:
            steps.append(record)
    return run, tmp, steps, held_out, done


def test_quiet_stdout_is_the_run_folder_alone(reported_run):
    run, _, _, _, done = reported_run
    assert done.stdout.strip() == str(run)


def test_tensorboard_event_files_hold_the_metrics_log(reported_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, steps, held_out, _ = reported_run
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in ("loss", "delta", "lr", "grad_norm", "tokens_per_s"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in steps]
    assert [(e.step, e.value) for e in events.Scalars("eval_loss")] == [(held_out["step"], pytest.approx(held_out["eval_loss"], rel=1e-6))]
    assert any(tag.startswith("config") for tag in events.Tags()["tensors"])  # the resolved config, as text


def test_mlflow_store_holds_the_metrics_log_and_the_config(reported_run):
    from mlflow.tracking import MlflowClient

    run, _, steps, held_out, _ = reported_run
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("qbco").experiment_id])
    assert found.info.run_name == run.name and found.info.status == "FINISHED"
    for key in ("loss", "delta", "reward_up", "lr"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, key))
        assert history == [(r["step"], pytest.approx(r[key], rel=1e-9)) for r in steps]
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "eval_reward_accuracy")] == [
        (held_out["step"], pytest.approx(held_out["eval_reward_accuracy"]))]
    assert found.data.params["beta"] == "0.1" and found.data.params["report_to"] == "tensorboard,mlflow,wandb,trackio"


def wandb_records(path):
    """The protobuf records of a W&B run file: a 7-byte W&B header, then LevelDB's log format (32 KiB blocks of
    records, each with a 7-byte header: checksum, length, type FULL 1 / FIRST 2 / MIDDLE 3 / LAST 4)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, parts, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def test_wandb_offline_run_holds_the_metrics_log(reported_run):
    run, _, steps, held_out, _ = reported_run
    (offline,) = (run / "wandb").glob("offline-run-*")
    (file,) = offline.glob("run-*.wandb")
    history = {}
    for record in wandb_records(file):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
    assert [history[r["step"]]["loss"] for r in steps] == [pytest.approx(r["loss"], rel=1e-6) for r in steps]
    assert history[held_out["step"]]["eval_loss"] == pytest.approx(held_out["eval_loss"], rel=1e-6)


def test_trackio_local_store_holds_the_metrics_log(reported_run):
    import sqlite3

    run, tmp, steps, _, _ = reported_run
    with sqlite3.connect(tmp / "trackio" / "qbco.db") as db:
        rows = db.execute("SELECT step, metrics FROM metrics WHERE run_name = ? ORDER BY step", (run.name,)).fetchall()
    losses = {step: json.loads(m)["loss"] for step, m in rows if "loss" in json.loads(m)}
    assert losses == {r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in steps}
