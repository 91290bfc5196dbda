"""Reference log-probs cached on disk: the reference is the frozen base, so its log-probs of a tokenized
dataset never change. Keyed by the base (a local folder's files, a hub model's revision), how it is loaded
(4-bit, dtype, device kind), the versions of the libraries that compute it and every token id of the data;
reused by later runs on the same data, by --resume and by `qbco eval`.

The pass is written in parts while it runs (QBCO_CACHE/reference/KEY.parts/, one file per stretch of
batches, and at once for the finished batches when it is interrupted), so a pass cut short by Ctrl-C or a
kill continues where it stopped; the whole tensor goes to KEY.safetensors when the last batch is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from qbco.common.files import DiskFull, disk_full
from qbco.model.names import cache_dir

LIBRARIES = ("torch", "transformers", "bitsandbytes")
PART_SECONDS = 30.0  # a part every this many seconds of the pass: what a kill -9 can cost


def hub_revision(name: str) -> str | None:
    """The commit of a hub model that loading it used (the snapshot its config.json is read from in the local
    hub cache); None for a local folder or a model not in the cache."""
    if Path(name).expanduser().is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id: no revision to key by
        return None
    match = re.search(r"snapshots/([0-9a-f]{40})/", Path(found).as_posix()) if isinstance(found, str) else None
    return match.group(1) if match else None


def base_identity(path: str) -> str:
    """A local base folder by its config and weight files (name, size, mtime); a hub id by its name and the
    revision (commit) it was loaded at."""
    folder = Path(path)
    if not folder.is_dir():
        return f"{path}@{hub_revision(path)}"
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    return json.dumps([str(folder.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])


def library_versions() -> dict[str, str | None]:
    """The versions of the libraries whose kernels compute the log-probs (another version may round differently)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cache_key(base: str, load_in_4bit: bool, dtype: torch.dtype, device: torch.device, encoded) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([base_identity(base), load_in_4bit, str(dtype), device.type, library_versions()]).encode())
    for e in encoded:
        h.update(json.dumps([e.prompt_ids, e.completion_ids]).encode())
    return h.hexdigest()[:32]


def entry(key: str) -> Path:
    """Where the reference log-probs cached under `key` lie, once whole."""
    return cache_dir() / "reference" / f"{key}.safetensors"


class ReferenceInterrupted(KeyboardInterrupt):
    """Ctrl-C during a reference pass, after the finished batches were written to the cache."""

    def __init__(self, done: int, total: int, folder: Path):
        super().__init__(f"{done} of {total} rows")
        self.done, self.total, self.folder = done, total, folder


def cached(key: str, n_rows: int, batches: list[list[int]], compute: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """The [n_rows] tensor cached under `key`, or computed batch by batch (compute(rows) -> their values) with
    the finished batches written as parts: a rerun computes only the batches no part holds, in the order a
    pass from the start would, so the result is the same tensor."""
    root, path = cache_dir() / "reference", entry(key)
    if path.is_file():
        return load_file(path)["logps"]
    parts = root / f"{key}.parts"
    value, known = torch.zeros(n_rows, dtype=torch.float32), torch.zeros(n_rows, dtype=torch.bool)
    for part in sorted(parts.glob("part-*.safetensors")) if parts.is_dir() else []:
        saved = load_file(part)
        value[saved["index"]], known[saved["index"]] = saved["logps"], True
    pending: list[int] = []
    last = time.perf_counter()
    try:
        for rows in batches:
            if known[rows].all():
                continue
            value[rows] = compute(rows).float().cpu()
            known[rows] = True
            pending += rows
            if time.perf_counter() - last > PART_SECONDS:
                write_part(parts, pending, value)
                pending, last = [], time.perf_counter()
    except KeyboardInterrupt:
        write_part(parts, pending, value)
        raise ReferenceInterrupted(int(known.sum()), n_rows, parts) from None
    write_atomic({"logps": value.contiguous()}, path)
    shutil.rmtree(parts, ignore_errors=True)
    return value


def write_part(parts: Path, rows: list[int], value: torch.Tensor) -> None:
    if not rows:
        return
    index = torch.tensor(rows, dtype=torch.long)
    write_atomic({"index": index, "logps": value[index].contiguous()}, parts / f"part-{time.time_ns()}.safetensors")


def write_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written beside and renamed: no reader ever sees half of one (a full disk is a
    qbco.common.files.DiskFull, one line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except Exception as err:
        if disk_full(err, path.parent):
            raise DiskFull(path, shutil.disk_usage(path.parent).free) from err
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
