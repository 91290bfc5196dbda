"""The run folder: where a run goes, what refuses to be overwritten, and the files written at its end."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from qbco.config import TrainConfig
from qbco.errors import QbcoError
from qbco.shift import RewardShift


def default_output(config: TrainConfig) -> Path:
    data = Path(config.data).stem if Path(config.data).suffix else config.data
    model = Path(config.model).name if Path(config.model).expanduser().is_dir() else config.model.replace("/", "_")
    return Path("runs") / f"{model}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_output(out: Path, overwrite: bool) -> None:
    """A new run goes into a missing or empty folder; one that holds a run needs --overwrite (or --resume)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise QbcoError(f"--output {out} is a file; choose a folder")
    if not (out / "config.yaml").is_file():
        raise QbcoError(f"--output {out} is not empty and holds no qbco run; choose another folder")
    if not overwrite:
        raise QbcoError(f"--output {out} already holds a run; continue it with --resume {out} or replace it with --overwrite")


def keep_metrics(path: Path, step: int) -> None:
    """On resume: keep the per-step lines up to the checkpoint's step; later lines are redone."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("split") is None and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def save_adapter(model, tokenizer, folder: Path, shift: RewardShift) -> None:
    """adapter/ written into a temporary folder and renamed: never half a folder that looks finished."""
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "reward_shift.json").write_text(json.dumps(shift.state_dict()), encoding="utf-8")
        readable(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def readable(folder: Path) -> None:
    """Ordinary permissions (umask applied): mkdtemp makes the folder 0700 and safetensors writes 0600,
    which would keep a model meant for sharing private to its writer."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
