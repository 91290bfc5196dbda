"""The run's metrics log (qbco.run.folder names the file): one JSON line per optimizer step, then one
`"split": "eval"` line with the held-out figures. Every reader (`qbco plot`, `qbco merge`'s model card, resume,
the tests) goes through `read_metrics` (RunFolder.metrics), and there is one rule for a damaged file: a
half-written last line, what a run killed while writing leaves, is skipped when reading and cut off by
`keep_steps` before a resumed run appends; an unreadable line anywhere else is an error that names it.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from qbco.common.errors import QbcoError
from qbco.common.files import disk_full, write_text


@dataclass
class Metrics:
    steps: list[dict] = field(default_factory=list)  # one record per optimizer step, in order
    eval: dict | None = None  # the last held-out record

    @property
    def last_step(self) -> dict | None:
        return self.steps[-1] if self.steps else None


def read_metrics(path: str | Path) -> Metrics:
    """The records of a metrics log."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    metrics = Metrics()
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            record = json.loads(line)
        except UnicodeDecodeError:
            if n == len(lines):  # a write cut short inside a character
                continue
            raise QbcoError(f"{path}: line {n} is not UTF-8 text (a damaged file)") from None
        except json.JSONDecodeError:
            if n == len(lines):  # the last line has no newline after it: a write that never finished
                continue
            raise QbcoError(f"{path}: line {n} is not JSON (a damaged file)") from None
        if not isinstance(record, dict):
            raise QbcoError(f"{path}: line {n} is not a JSON object (a damaged file)")
        if record.get("split") == "eval":
            metrics.eval = record
        else:
            metrics.steps.append(record)
    return metrics


def keep_steps(path: Path, step: int) -> None:
    """Before a resumed run appends: keep the step records up to `step` (the checkpoint's); later steps, the
    held-out line and a half-written last line go. Written beside and renamed, so a crash here loses nothing."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path).steps if r["step"] <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class MetricsWriter:
    """Appends one record per line, flushed at once, so a reader (or a kill) sees whole lines but the last."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        """One line; a NaN or infinite figure is written as null (no figure), never as NaN (which is not JSON).
        A full disk is one line naming the log and what is kept (a half line at its end is cut off on --resume)."""
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        try:
            self.file.write(json.dumps(record, allow_nan=False) + "\n")
            self.file.flush()
        except OSError as err:
            if not disk_full(err, self.path.parent):
                raise
            free = shutil.disk_usage(self.path.parent).free
            raise QbcoError(f"the disk is full: appending to {self.path} failed with {free >> 20} MiB free there; the log "
                            "keeps the lines before this one and the last checkpoint is intact. Free some space, then: "
                            f"qbco train --resume {self.path.parent}") from None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.file.close()
        except OSError:  # the flush of a line a full disk refused: already said, and --resume cuts it off
            pass
