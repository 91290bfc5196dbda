"""Reference log-probs cached on disk: the reference is the frozen base, so its log-probs of a tokenized
dataset never change. Keyed by the base (its files), how it is loaded (4-bit, dtype, device kind) and every
token id of the data; reused by later runs on the same data, by --resume and by `qbco eval`."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qbco.models import cache_dir


def base_identity(path: str) -> str:
    """A local base folder by its config and weight files (name, size, mtime); a hub id by its name."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    return json.dumps([str(folder.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])


def cache_key(base: str, load_in_4bit: bool, dtype: torch.dtype, device: torch.device, encoded) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([base_identity(base), load_in_4bit, str(dtype), device.type]).encode())
    for e in encoded:
        h.update(json.dumps([e.prompt_ids, e.completion_ids]).encode())
    return h.hexdigest()[:32]


def cached(key: str, compute) -> torch.Tensor:
    """The cached tensor for `key`, or compute() written atomically under QBCO_CACHE/reference/."""
    path = cache_dir() / "reference" / f"{key}.safetensors"
    if path.is_file():
        return load_file(path)["logps"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file({"logps": value.contiguous()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return value
