"""Files written whole or not at all: a folder published by one rename (`atomic_folder`), a file written
beside its target and renamed (`write_temp`, `write_text`), and the one-line error for a full disk
(`DiskFull`). Every writer of a run, a cache entry or an output file goes through these."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

from qbco.common.errors import QbcoError


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


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def readable(folder: Path) -> None:
    """Ordinary permissions (umask applied): mkdtemp makes the folder 0700 and safetensors writes 0600,
    which would keep a model meant for sharing private to its writer."""
    umask = _umask()
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_temp(dst: Path, chunks: Iterable, binary: bool = False) -> Path:
    """The chunks in a new hidden file next to dst (same file system, so os.replace is atomic); the caller
    renames it onto dst, or removes it. A full disk is a DiskFull naming dst (nothing replaced it)."""
    try:
        fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    except OSError as err:
        _full_or_raise(err, dst)
    try:
        os.chmod(name, 0o666 & ~_umask())  # mkstemp's 0600 would keep the file private to its writer
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": "\n"})) as f:
            for chunk in chunks:
                f.write(chunk)
    except BaseException as err:
        Path(name).unlink(missing_ok=True)
        if isinstance(err, OSError):
            _full_or_raise(err, dst)
        raise
    return Path(name)


def _full_or_raise(err: OSError, dst: Path):
    """A write beside `dst` that failed: DiskFull (one line) when the disk is full, else the error itself."""
    if disk_full(err, dst.parent):
        raise DiskFull(dst, shutil.disk_usage(dst.parent).free) from err
    raise err


def write_bytes(path: Path, data: bytes) -> Path:
    """write_text for bytes (a PNG): beside and renamed."""
    tmp = write_temp(path, [data], binary=True)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: Path, text: str | Iterable[str]) -> Path:
    """`path` holding `text` (a string, or its pieces), written beside and renamed: a reader never sees half
    a file, and a write cut short leaves the old file as it was."""
    tmp = write_temp(path, [text] if isinstance(text, str) else text)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def safetensors_damage(path: Path) -> str | None:
    """What is wrong with a .safetensors file, or None when its layout is whole: an 8-byte little-endian header
    length N, N bytes of a JSON header, then a data buffer that the tensors' data_offsets cover exactly to the
    file's end (safetensors' own rule). Reads the header only; a file cut short fails here in one line instead
    of deep inside safetensors or peft."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"cut short: its header says {n} bytes of metadata, the file holds {size - 8}"
            header = json.loads(f.read(n))
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    except (UnicodeDecodeError, ValueError):
        return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    buffer, need = size - 8 - n, max(ends, default=0)
    if need > buffer:
        return f"cut short: its tensors need {need} bytes of data, the file holds {buffer}"
    if need < buffer:
        return f"{buffer - need} bytes after its last tensor, which safetensors never writes"
    return None
