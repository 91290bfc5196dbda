"""The run folder: where a run goes, what refuses to be overwritten, and the files written at its end."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from qbco.config import TrainConfig
from qbco.errors import QbcoError
from qbco.shift import RewardShift


def default_output(config: TrainConfig) -> Path:
    data = Path(config.data).stem if Path(config.data).suffix else config.data
    model = Path(config.model).name if Path(config.model).expanduser().is_dir() else config.model.replace("/", "_")
    return Path("runs") / f"{model}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_folder(out: Path, overwrite: bool) -> None:
    """A new run goes into a missing or empty folder; one that holds a run needs --overwrite (or --resume)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise QbcoError(f"--output {out} is a file; choose a folder")
    if not (out / "config.yaml").is_file():
        raise QbcoError(f"--output {out} is not empty and holds no qbco run; choose another folder")
    if not overwrite:
        raise QbcoError(f"--output {out} already holds a run; continue it with --resume {out} or replace it with --overwrite")


def save_adapter(model, tokenizer, folder: Path, shift: RewardShift) -> None:
    """adapter/: peft weights and config, the tokenizer, and the reward-shift state, published whole."""
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "reward_shift.json").write_text(json.dumps(shift.state_dict()), encoding="utf-8")


@contextmanager
def atomic_folder(target: Path):
    """A temporary folder beside `target` that becomes `target` when the block ends without error, with
    ordinary permissions; on an error it is removed and an existing `target` is left as it was. There is
    never half a folder at `target`: an old one is moved aside before the rename and removed after it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        readable(tmp)
        old = target.with_name(f".{target.name}.old-{os.getpid()}") if target.exists() else None
        if old is not None:
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
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
