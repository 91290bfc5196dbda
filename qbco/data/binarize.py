"""Turn feedback as it is published (Likert scores, preference pairs, transcripts, ratings per completion,
votes, thumbs from a chat front-end) into the thumbs-up / thumbs-down rows `qbco train` reads.

The layout of the input is told from its columns (qbco.data.layouts; --layout forces one); the layout turns
each input row into candidates, and the mode decides the labels the layout leaves open (a threshold, or the
pairing by score). Every candidate is written or counted under one reason.

Everything streams: rows are read one at a time and written as they come, so memory does not grow with
the size of the text. What does grow with the number of rows is small and said where it is kept: one
16-byte digest per distinct output row (duplicate detection), one per distinct prompt (the summary's
prompt counts) and, in the modes that group rows by prompt, one small record per distinct prompt. Those
modes read the input twice (a file can be re-read; a hub dataset can be re-iterated) instead of holding
rows in memory. A conversation tree (oasst) is read three times: two passes index the text of the messages
that others answer, which is held.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from qbco.common.errors import QbcoError
from qbco.common.files import write_temp
from qbco.data.layouts import LAYOUTS, Columns, RowSource, choose
from qbco.data.reader import detect_format, iter_rows
from qbco.data.rows import (  # noqa: F401  (split_nemo_turns, normalize_prompt: their home was here)
    DEFECTS,
    DUPLICATE,
    NO_PAIR,
    NOT_IN_PAIR,
    SAME_PAIR,
    TIE,
    Drop,
    digest,
    is_multi_turn,
    normalize_prompt,
    split_nemo_turns,
)

MODES = ("likert", "pairs", "pairs-from-scores", "votes", "ratings")
SCORED_MODES = ("likert", "pairs-from-scores")  # the modes that label by score; the others take the layout's label
DEFAULT_THRESHOLD = 4.0  # HelpSteer2 helpfulness 0-4: 4 is thumbs-up, 0-3 thumbs-down (the paper's mapping)
MOSTLY_DROPPED = 0.5  # a run that drops more than this share of its candidates says so first


@dataclass
class Options:
    """What `qbco binarize` does; the CLI flags map 1:1 onto these fields."""

    mode: str | None = None  # likert | pairs | pairs-from-scores (votes, ratings: the layout's); None: the layout's default
    layout: str | None = None  # one of qbco.data.layouts.LAYOUTS; None: told from the first row's columns
    score_column: str | None = None  # default: the first of SCORE_COLUMNS present
    threshold: float | None = None  # likert: score >= threshold is thumbs-up; default DEFAULT_THRESHOLD
    scale: tuple[float, float] | None = None  # given: a score outside it is an error; None: inferred, reported
    prompt_column: str | None = None  # default: prompt
    response_column: str | None = None  # default: response, then completion
    dpo_prompts_only: bool = False  # keep only prompts whose responses form a preference pair
    strict: bool = False  # the first defective row is an error instead of a counted drop


@dataclass
class Summary:
    """What happened to every row; written next to the output as OUTPUT.summary.json."""

    input: str
    output: str | None
    mode: str | None
    layout: str | None = None
    rule: str | None = None  # how the layout's rows become thumbs, in words
    rows_read: int = 0
    candidates: int = 0  # rows that could be written (one per scored row, two per pair, ...) = written + dropped
    rows_written: int = 0
    thumbs_up: int = 0
    thumbs_down: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    columns: dict[str, str | None] = field(default_factory=dict)
    threshold: float | None = None
    scale: list[float] | None = None
    scale_source: str | None = None  # "given", or "inferred": the lowest and highest usable score read
    passes: int = 1
    warnings: list[str] = field(default_factory=list)
    prompts: int = 0  # distinct prompts among the rows written
    multi_turn_prompts: int = 0  # of those, prompts holding earlier turns (an assistant message)

    @property
    def up_share(self) -> float | None:
        return self.thumbs_up / self.rows_written if self.rows_written else None

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def drops_text(self) -> str:
        """'empty prompt 6, duplicate 1', largest first."""
        return ", ".join(f"{reason} {n}" for reason, n in sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def mostly_dropped(self) -> str | None:
        """One line when more than half of the candidates were dropped (None otherwise)."""
        if not self.candidates or self.dropped_total <= MOSTLY_DROPPED * self.candidates:
            return None
        return (f"{self.dropped_total} of {self.candidates} candidate rows ({self.dropped_total / self.candidates:.0%}) "
                f"were dropped, read as layout {self.layout}: {self.drops_text()}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["up_share"] = self.up_share
        out["dropped_total"] = self.dropped_total
        return out


def parse_scale(text: str) -> tuple[float, float]:
    """'0-4' -> (0.0, 4.0); also '1-5', '0.5-4.5', '-2-2'."""
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*-\s*(-?\d+(?:\.\d+)?)\s*", text or "")
    if not m or float(m.group(1)) >= float(m.group(2)):
        raise QbcoError(f"--scale {text!r}: write MIN-MAX with MIN < MAX, e.g. 0-4")
    return float(m.group(1)), float(m.group(2))


# ---------------------------------------------------------------- the binarizer


def binarize_rows(open_rows: RowSource, origin: str, options: Options, summary: Summary) -> Iterator[dict[str, Any]]:
    """Output rows (prompt, completion, label, score, source) from input rows, counting into `summary`.

    `open_rows` returns a fresh iterator of (row number, row) each call; the modes that group by prompt
    and the layouts that index the input call it more than once. `origin` names the input in `source`
    ("file.csv:12") and in messages. Ending with no row written is a QbcoError with the drops by reason.
    """
    first = next(iter(open_rows()), None)
    if first is None:
        raise QbcoError(f"{origin}: no rows")
    if options.mode is not None and options.mode not in MODES:
        raise QbcoError(f"unknown mode {options.mode!r} (use {', '.join(MODES)})")
    layout, mode = choose(first[1], options.layout, options.mode, options.threshold is not None, origin)
    _check_options(options, mode)
    threshold = DEFAULT_THRESHOLD if options.threshold is None else float(options.threshold)
    summary.mode, summary.layout, summary.rule = mode, layout.name, layout.rule
    if mode == "likert":
        summary.threshold = threshold
    if options.scale is not None:
        summary.scale, summary.scale_source = list(options.scale), "given"
        if mode == "likert" and not options.scale[0] < threshold <= options.scale[1]:
            every = "up" if threshold <= options.scale[0] else "down"
            raise QbcoError(f"--threshold {threshold:g} with --scale {format_scale(options.scale)} makes every row "
                            f"thumbs-{every}; pick a threshold inside the scale")

    setup = layout.setup(list(first[1].keys()), options, origin)
    if isinstance(setup, Columns):  # the layouts whose columns may be chosen with flags
        summary.columns = {k: v for k, v in asdict(setup).items() if v is not None and k != "scale"}
    elif isinstance(setup, str):  # ultrafeedback: the completion's score
        summary.columns = {"score": setup}
    if layout.index is not None:
        setup = layout.index(open_rows, setup)
        summary.passes += 2

    def candidates(row: dict, where: str) -> list:
        return layout.read(row, setup, where)

    groups = None
    if mode == "pairs-from-scores" or (mode == "likert" and options.dpo_prompts_only):
        groups = _group_by_prompt(open_rows, candidates, origin)
        summary.passes += 1

    seen: set[bytes] = set()  # one 16-byte digest per distinct row: ~100 bytes each, never the text
    prompts: set[bytes] = set()  # and one per distinct prompt written
    lo = hi = None

    def reject(reason: str, where: str) -> None:
        if options.strict and reason in DEFECTS:
            raise QbcoError(f"{where}: {reason} (--strict; without it such rows are dropped and counted)")
        summary.drop(reason)

    for n, row in open_rows():
        summary.rows_read += 1
        where = f"{origin} row {n}"
        source = f"{origin}:{n}"
        for i, (label, fields) in enumerate(candidates(row, where)):
            summary.candidates += 1
            if isinstance(fields, Drop):
                reject(fields.reason, where)
                continue
            prompt, completion, score = fields
            if label is None:  # a scored candidate: its score enters the scale
                lo = score if lo is None else min(lo, score)
                hi = score if hi is None else max(hi, score)
            key = digest(prompt, completion, score) if label is None else digest(prompt, completion, label, score)
            if key in seen:
                reject(DUPLICATE, where)
                continue
            seen.add(key)
            if label is None and groups is None:  # a scored row: the threshold decides
                label = score >= threshold
            elif label is None:  # a scored row in a pairing mode: its prompt's pair decides
                label, reason = _group_label(groups[digest(prompt)], (n, i), score, threshold, mode)
                if reason:
                    reject(reason, where)
                    continue
            summary.rows_written += 1
            if digest(prompt) not in prompts:
                prompts.add(digest(prompt))
                summary.prompts += 1
                summary.multi_turn_prompts += is_multi_turn(prompt)
            summary.thumbs_up += bool(label)
            summary.thumbs_down += not label
            yield {"prompt": prompt, "completion": completion, "label": bool(label), "score": score, "source": source}

    if summary.scale is None and lo is not None:
        summary.scale, summary.scale_source = [lo, hi], "inferred"
    if summary.rows_written == 0:
        drops = summary.drops_text() or "none"
        raise QbcoError(f"{origin}: no row written, read as layout {layout.name} ({summary.rows_read} rows read, "
                        f"{summary.candidates} candidates; dropped: {drops}); nothing was written")
    if summary.mostly_dropped:
        summary.warnings.append(summary.mostly_dropped)
    if summary.thumbs_up == 0 or summary.thumbs_down == 0:
        only = "up" if summary.thumbs_down == 0 else "down"
        hint = f" (threshold {threshold:g}, scores {format_scale(summary.scale)})" if mode == "likert" else ""
        summary.warnings.append(f"every written row is thumbs-{only}{hint}; BCO needs both")


def _check_options(options: Options, mode: str) -> None:
    if mode not in SCORED_MODES:  # the label comes from the data: chosen/rejected, votes, a thumbs rating
        given = "chosen/rejected" if mode == "pairs" else f"the {mode}"
        for value, flag in ((options.threshold, "--threshold"), (options.scale, "--scale"),
                            (options.dpo_prompts_only or None, "--dpo-prompts-only")):
            if value is not None:
                raise QbcoError(f"{flag} is for scored rows; here the label comes from {given}")
    if mode == "pairs-from-scores" and options.threshold is not None:
        raise QbcoError("--threshold has no effect with --pairs-from-scores: the higher-scored response of a "
                        "prompt is thumbs-up, the lower thumbs-down")


def _group_by_prompt(open_rows: RowSource, candidates, origin: str) -> dict[bytes, list]:
    """First pass of the pairing modes: per distinct prompt (by digest) the number of usable responses and
    the places ((row, candidate) numbers), scores and response digests of its best and worst one (ties: the
    first in file order). Memory: a few hundred bytes per distinct prompt, whatever the length of the text.
    Candidates that the second pass will drop (defects, duplicates) are skipped here the same way, so both
    passes agree."""
    groups: dict[bytes, list] = {}
    seen: set[bytes] = set()
    for n, row in open_rows():
        for i, (label, fields) in enumerate(candidates(row, f"{origin} row {n}")):
            if isinstance(fields, Drop) or label is not None:
                continue
            prompt, completion, score = fields
            key = digest(prompt, completion, score)
            if key in seen:
                continue
            seen.add(key)
            response, place = digest(completion), (n, i)
            g = groups.get(digest(prompt))
            if g is None:  # [count, best score, best place, best response, worst score, worst place, worst response]
                groups[digest(prompt)] = [1, score, place, response, score, place, response]
                continue
            g[0] += 1
            if score > g[1]:
                g[1:4] = [score, place, response]
            if score < g[4]:
                g[4:7] = [score, place, response]
    return groups


def _group_label(g: list, place: tuple[int, int], score: float, threshold: float, mode: str) -> tuple[bool | None, str | None]:
    """(label, None) to write the row, (None, reason) to drop it."""
    count, best, best_place, best_response, worst, worst_place, worst_response = g
    if count == 1:
        return None, NO_PAIR
    if best == worst:
        return None, TIE
    if mode == "likert":  # --dpo-prompts-only: the prompt forms a pair; the label is still the threshold's
        return score >= threshold, None
    if best_response == worst_response:  # one response scored twice, differently: no real pair
        return None, SAME_PAIR
    if place == best_place:
        return True, None
    if place == worst_place:
        return False, None
    return None, NOT_IN_PAIR


def format_scale(scale) -> str:
    return "?" if not scale else f"{scale[0]:g}-{scale[1]:g}"


def layout_names() -> list[str]:
    return list(LAYOUTS)


# ---------------------------------------------------------------- files


def summary_path(output: Path) -> Path:
    """OUTPUT.jsonl -> OUTPUT.summary.json."""
    return output.with_name(output.stem + ".summary.json") if output.suffix else output.with_name(output.name + ".summary.json")


def binarize(input_path: Path | str, output_path: Path | str, options: Options | None = None, *,
             fmt: str | None = None, overwrite: bool = False) -> Summary:
    """Binarize INPUT into OUTPUT (jsonl) and OUTPUT.summary.json; both appear whole or not at all.

    Rows go to a temporary file in OUTPUT's folder that is renamed over OUTPUT only when everything
    succeeded, so an error (or Ctrl-C) leaves any earlier OUTPUT as it was and no half file.
    """
    options = options or Options()
    src, dst = Path(input_path), Path(output_path)
    fmt = detect_format(src, fmt)
    if not src.is_file():
        raise QbcoError(f"data file not found: {src}")
    if dst.exists() and dst.resolve() == src.resolve():
        raise QbcoError(f"{dst}: the output would replace the input; choose another -o")
    if dst.exists() and not overwrite:
        raise QbcoError(f"{dst} exists; pass --overwrite to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)

    summary = Summary(input=str(src), output=str(dst), mode=options.mode)
    rows = binarize_rows(lambda: iter_rows(src, fmt), src.name, options, summary)
    temps: list[Path] = []
    try:
        temps.append(write_temp(dst, (json.dumps(r, ensure_ascii=False) + "\n" for r in rows)))
        temps.append(write_temp(summary_path(dst), [json.dumps(summary.to_dict(), indent=2) + "\n"]))
        os.replace(temps[0], dst)
        os.replace(temps[1], summary_path(dst))
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return summary
