"""The one reader of feedback files: .jsonl, .json (a list of rows, or {"data": [...]}), .csv, .tsv and
.parquet, the text ones also gzipped (.jsonl.gz is how HelpSteer2 is stored on the hub). `qbco train`,
`binarize`, `eval` and `generate` all read through `iter_rows`, so a file is read the same way, with the
same checks and the same one-line errors, whichever command reads it.

Rows stream one at a time: memory is one row (one read chunk for JSON, one record batch for parquet), not
the file, which `qbco binarize` relies on for files larger than memory.
"""

from __future__ import annotations

import csv
import gzip
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from qbco.common.errors import QbcoError

FORMATS = ("jsonl", "json", "csv", "tsv", "parquet")
MAX_JSON_ELEMENT_CHARS = 64 << 20  # one row of a .json file may be at most this long (a broken row must not eat RAM)


def detect_format(path: Path, fmt: str | None = None) -> str:
    """The file's format: `fmt` when given (binarize's --format), else the extension."""
    if fmt:
        fmt = fmt.lower().lstrip(".")
        if fmt not in FORMATS:
            raise QbcoError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
        return fmt
    suffixes = [s.lower() for s in Path(path).suffixes]
    suffix = (suffixes[-2] if suffixes[-1:] == [".gz"] and len(suffixes) > 1 else suffixes[-1] if suffixes else "").lstrip(".")
    if suffix in FORMATS and not (suffix == "parquet" and suffixes[-1] == ".gz"):
        return suffix
    raise QbcoError(f"{path}: cannot tell the format from '{Path(path).suffix}'; use a .jsonl, .json, .csv, .tsv "
                    "or .parquet file, the text ones also as .gz (qbco binarize also takes --format)")


def _open_text(path: Path, **kwargs):
    """The file as text; a .gz file decompressed as it is read."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", **kwargs)
    return open(path, **kwargs)


def iter_rows(path: str | Path, fmt: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, row) pairs, one at a time. Row numbers count from 1: data records for csv/tsv (the
    header is not a row), lines for jsonl, list elements for json, table rows for parquet."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    if not path.is_file():
        raise QbcoError(f"data file not found: {path}")
    try:
        if fmt in ("csv", "tsv"):
            yield from _read_delimited(path, "," if fmt == "csv" else "\t")
        else:
            yield from {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet}[fmt](path)
    except UnicodeDecodeError as err:
        raise QbcoError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8 and run again") from None
    except (OSError, EOFError) as err:  # EOFError: a truncated .gz
        raise QbcoError(f"{path}: cannot read ({err or type(err).__name__})") from None


def read_rows(path: str | Path, fmt: str | None = None) -> list[dict[str, Any]]:
    """Every row of a file, as dicts (for callers that need them all at once)."""
    return [row for _, row in iter_rows(path, fmt)]


def _read_delimited(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    # One long response can pass the csv module's 128 KiB field limit; raise it (process-wide, harmless).
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # utf-8-sig drops a BOM; newline="" lets csv handle CRLF and newlines inside quoted fields.
    with _open_text(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise QbcoError(f"{path}: the header repeats column(s) {', '.join(repeated)}")
        n = 0
        for record in reader:
            if not record:  # a blank line between records
                continue
            n += 1
            if len(record) != len(header):
                raise QbcoError(
                    f"{path}: row {n} (ending on line {reader.line_num}) has {len(record)} fields, the header "
                    f"{len(header)}; a field holding the delimiter, a quote or a newline must be in double quotes"
                )
            yield n, dict(zip(header, record))


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with _open_text(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise QbcoError(f"{path}: line {n}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise QbcoError(f"{path}: line {n}: a JSON {type(row).__name__}, expected an object with prompt, completion, label")
            yield n, row


class _JsonStream:
    """A JSON text decoded piece by piece from a sliding buffer, so memory is one read chunk plus the largest
    value, not the file. `line` counts the lines already dropped from the buffer, for error messages."""

    def __init__(self, f, path: Path, chunk_chars: int):
        self.f, self.path, self.chunk = f, path, chunk_chars
        self.buf, self.pos, self.eof, self.dropped_lines = "", 0, False, 0
        self.decoder = json.JSONDecoder()

    def fill(self, need_more: bool = False) -> bool:
        if self.eof:
            return False
        # Grow the read when one value does not fit, so a huge value costs O(n), not O(n^2).
        chunk = self.f.read(max(self.chunk, len(self.buf) - self.pos) if need_more else self.chunk)
        self.dropped_lines += self.buf.count("\n", 0, self.pos)
        self.buf, self.pos = self.buf[self.pos :] + chunk, 0
        self.eof = not chunk
        return bool(chunk)

    def peek(self) -> str:
        """The next character that is not white space ('' at the end of the text)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self.fill():
                return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def expect(self, char: str, what: str) -> None:
        if self.peek() != char:
            raise self.error(f"expected {what}")
        self.pos += 1

    def value(self) -> Any:
        """The next complete JSON value."""
        self.peek()
        while True:
            try:
                value, self.pos = self.decoder.raw_decode(self.buf, self.pos)
                return value
            except json.JSONDecodeError as err:
                if len(self.buf) - self.pos > MAX_JSON_ELEMENT_CHARS or not self.fill(True):
                    line = self.dropped_lines + err.lineno
                    raise QbcoError(f"{self.path}: not valid JSON at line {line} ({err.msg})") from None

    def error(self, message: str) -> QbcoError:
        line = self.dropped_lines + self.buf.count("\n", 0, self.pos) + 1
        end = " (file truncated?)" if not self.peek() else ""
        return QbcoError(f"{self.path}: not valid JSON at line {line} ({message}{end})")


def _read_json(path: Path, chunk_chars: int = 1 << 20) -> Iterator[tuple[int, dict[str, Any]]]:
    """Elements of a JSON list of rows, or of the "data" list of a top-level object (the shape some hub
    exports use), decoded one at a time."""
    with _open_text(path, encoding="utf-8-sig") as f:
        s = _JsonStream(f, path, chunk_chars)
        first = s.peek()
        if first == "{":
            s.pos += 1
            while True:
                if s.peek() == "}":
                    raise QbcoError(f'{path}: a JSON object without a "data" list; expected a list of rows or {{"data": [...]}}')
                key = s.value()
                s.expect(":", "':' after a key")
                if key == "data" and s.peek() == "[":
                    break
                s.value()  # another key's value: read past it
                if s.peek() == ",":
                    s.pos += 1
                elif s.peek() != "}":
                    raise s.error("expected ',' or '}' after a value")
        elif first != "[":
            raise QbcoError(f'{path}: expected a JSON list of rows ([{{...}}, ...]) or {{"data": [...]}}')
        s.expect("[", "'['")
        n = 0
        while True:
            if s.peek() == "]":
                return
            if n > 0:
                s.expect(",", f"',' or ']' after row {n}")
            n += 1
            row = s.value()
            if not isinstance(row, dict):
                raise QbcoError(f"{path}: row {n} is a JSON {type(row).__name__}, expected an object")
            yield n, row


def _read_parquet(path: Path, batch_rows: int = 1024) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        batches = parquet.iter_batches(batch_size=batch_rows)
        n = 0
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                yield n, row
    except Exception as err:  # pyarrow has its own error types for truncated or corrupt files
        raise QbcoError(f"{path}: unreadable parquet file ({type(err).__name__})") from None
