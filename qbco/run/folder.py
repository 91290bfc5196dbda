"""The run folder: where a run goes, what refuses to be overwritten, and the files written at its end."""

from __future__ import annotations

import errno
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
    """runs/MODEL-DATA-TIMESTAMP, with -2, -3, ... when a run started in the same second holds that name."""
    data = Path(config.data).stem if Path(config.data).suffix else config.data
    model = Path(config.model).name if Path(config.model).expanduser().is_dir() else config.model.replace("/", "_")
    out = first = Path("runs") / f"{model}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while out.exists():
        n += 1
        out = first.with_name(f"{first.name}-{n}")
    return out


def check_run_folder(out: Path, overwrite: bool, config: TrainConfig | None = None) -> None:
    """A new run goes into a missing or empty folder; one that holds a run needs --overwrite (or --resume),
    unless it is this very run, stopped before its first step (in the reference pass): the same command
    starts it again, and the reference log-probs cached so far are reused."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise QbcoError(f"--output {out} is a file; choose a folder")
    if not (out / "config.yaml").is_file():
        raise QbcoError(f"--output {out} is not empty and holds no qbco run; choose another folder")
    if not overwrite and not (config is not None and never_started(out, config)):
        raise QbcoError(f"--output {out} already holds a run; continue it with --resume {out} or replace it with --overwrite")


def never_started(out: Path, config: TrainConfig) -> bool:
    """`out` holds the run `config` describes, and it took no step: no checkpoint, no step in its log."""
    from qbco.config import changed_settings, load_run_config

    metrics = out / "metrics.jsonl"
    if any((out / "checkpoints").glob("step-*")) or (metrics.is_file() and metrics.read_text(encoding="utf-8").strip()):
        return False
    try:
        return not changed_settings(load_run_config(out / "config.yaml"), config)
    except QbcoError:  # a config.yaml that no longer reads is not this run
        return False


def save_adapter(model, tokenizer, folder: Path, shift: RewardShift, state_dict: dict | None = None) -> None:
    """adapter/: peft weights and config, the tokenizer, and the reward-shift state, published whole.
    `state_dict`: the LoRA tensors when the model holds only shards of them (FSDP)."""
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / "reward_shift.json").write_text(json.dumps(shift.state_dict()), encoding="utf-8")


class DiskFull(QbcoError):
    """A write into an atomic folder failed because its disk (or quota) is full; nothing was published."""

    def __init__(self, target: Path, free: int):
        super().__init__(f"the disk is full: writing {target} failed with {free >> 20} MiB free there; nothing was "
                         f"written under that name and what was there before is intact. Free some space and run again")
        self.target, self.free = target, free


# Below this much free space, a write that failed is taken for a full disk: torch.save reports ENOSPC as a
# RuntimeError that carries no errno ("PytorchStreamWriter failed writing file ..." / "unexpected pos").
FULL_MARGIN = 16 << 20
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_MESSAGES = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")


def disk_full(err: BaseException, folder: Path) -> bool:
    """Whether `err`, raised while writing into `folder`, means the disk (or the user's quota) is full: an
    OSError with ENOSPC / EDQUOT anywhere in its chain, a library's message that says so (safetensors:
    "No space left on device (os error 28)"), or any write error with less than FULL_MARGIN left there."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FULL_ERRNOS:
            return True
        if any(m in str(seen).lower() for m in FULL_MESSAGES):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < FULL_MARGIN
    except OSError:
        return False


@contextmanager
def atomic_folder(target: Path):
    """A temporary folder beside `target` that becomes `target` when the block ends without error, with
    ordinary permissions; on an error it is removed and an existing `target` is left as it was. There is
    never half a folder at `target`: an old one is moved aside before the rename and removed after it.
    A write that fails on a full disk is a DiskFull (one line: the disk is full, nothing was published)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        try:
            yield tmp
        except Exception as err:
            if not isinstance(err, QbcoError) and disk_full(err, target.parent):
                free = shutil.disk_usage(target.parent).free
                raise DiskFull(target, free) from err
            raise
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
