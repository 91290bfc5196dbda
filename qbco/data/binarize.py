"""Turn Likert scores and preference pairs into the thumbs-up / thumbs-down rows `qbco train` reads.

Everything streams: rows are read one at a time and written as they come, so memory does not grow with
the size of the text. What does grow with the number of rows is small and said where it is kept: one
16-byte digest per distinct output row (duplicate detection), one per distinct prompt (the summary's
prompt counts) and, in the modes that group rows by prompt, one small record per distinct prompt. Those
modes read the input twice (a file can be re-read; a hub dataset can be re-iterated) instead of holding
rows in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from qbco.common.errors import QbcoError
from qbco.common.files import write_temp
from qbco.data.reader import detect_format, iter_rows

MODES = ("likert", "pairs", "pairs-from-scores")
DEFAULT_THRESHOLD = 4.0  # HelpSteer2 helpfulness 0-4: 4 is thumbs-up, 0-3 thumbs-down (the paper's mapping)
SCORE_COLUMNS = ("helpfulness", "score", "rating")
RESPONSE_COLUMNS = ("response", "completion")
PAIR_SCORE_COLUMNS = (("score_chosen", "score_rejected"), ("rating_chosen", "rating_rejected"))
# HelpSteer2 keeps the earlier turns of a multi-turn conversation (about 29% of its prompts) in the `prompt`
# string, each later turn opened by a line "<extra_id_1>Assistant" or "<extra_id_1>User" (NeMo's chat
# markers; its dataset card): "{user turn 1}\n<extra_id_1>Assistant\n{assistant turn 1}\n<extra_id_1>User\n
# {user turn 2}". Read as one user message, the model would train on the markers (docs/pitfalls.md, 16).
NEMO_TURN = re.compile(r"(?:^|\r?\n)<extra_id_1>(User|Assistant)[ \t]*(?:\r?\n|$)")

# Why a candidate row was not written. The first group are defects in the data: --strict stops on them.
EMPTY_PROMPT = "empty prompt"
EMPTY_RESPONSE = "empty response"
MISSING_SCORE = "missing score"
NON_NUMERIC_SCORE = "non-numeric score"
DUPLICATE = "duplicate"
MALFORMED = "malformed messages"
SAME_PAIR = "chosen equals rejected"
DEFECTS = (EMPTY_PROMPT, EMPTY_RESPONSE, MISSING_SCORE, NON_NUMERIC_SCORE, DUPLICATE, MALFORMED, SAME_PAIR)
# ...the second group are drops by design of the pairing modes; --strict lets them pass.
TIE = "tied scores"
NO_PAIR = "prompt without a pair"
NOT_IN_PAIR = "not in pair"


class Drop(Exception):
    """A candidate row that is not written, and why (one of the reasons above)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Options:
    """What `qbco binarize` does; the CLI flags map 1:1 onto these fields."""

    mode: str = "likert"  # likert | pairs | pairs-from-scores
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
    mode: str
    rows_read: int = 0
    candidates: int = 0  # rows that could be written: one per input row, two per pair; = written + dropped
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

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["up_share"] = self.up_share
        out["dropped_total"] = self.dropped_total
        return out


# ---------------------------------------------------------------- row-level conversion (shared with registry)


def parse_scale(text: str) -> tuple[float, float]:
    """'0-4' -> (0.0, 4.0); also '1-5', '0.5-4.5', '-2-2'."""
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*-\s*(-?\d+(?:\.\d+)?)\s*", text or "")
    if not m or float(m.group(1)) >= float(m.group(2)):
        raise QbcoError(f"--scale {text!r}: write MIN-MAX with MIN < MAX, e.g. 0-4")
    return float(m.group(1)), float(m.group(2))


def parse_score(value: Any) -> int | float:
    """A number from an int, a float or numeric text; integral values come back as int."""
    if value is None:
        raise Drop(MISSING_SCORE)
    if isinstance(value, bool):
        raise Drop(NON_NUMERIC_SCORE)
    if isinstance(value, numbers.Real):
        x = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            raise Drop(MISSING_SCORE)
        try:
            x = float(text)
        except ValueError:
            raise Drop(NON_NUMERIC_SCORE) from None
    else:
        raise Drop(NON_NUMERIC_SCORE)
    if math.isnan(x):  # pandas writes a missing number as NaN / "nan"
        raise Drop(MISSING_SCORE)
    if math.isinf(x):
        raise Drop(NON_NUMERIC_SCORE)
    return int(x) if x.is_integer() else x


def _message(m: Any) -> dict[str, str]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise Drop(MALFORMED)
    return {"role": m["role"], "content": m["content"]}


def split_nemo_turns(text: str) -> list[dict[str, str]] | None:
    """A HelpSteer2 prompt with earlier turns as chat messages: user and assistant alternating, ending with
    the user turn that the response answers. None when the text holds no turn marker; Drop(MALFORMED) when
    the turns do not alternate that way or one is empty."""
    parts = NEMO_TURN.split(text)
    if len(parts) == 1:
        return None
    first, rest = parts[0], parts[1:]
    messages = [{"role": "user", "content": first}] if first.strip() else []
    messages += [{"role": role.lower(), "content": content} for role, content in zip(rest[::2], rest[1::2])]
    expected = ["user", "assistant"] * len(messages)
    if (not messages or [m["role"] for m in messages] != expected[: len(messages)] or messages[-1]["role"] != "user"
            or not all(m["content"].strip() and "<extra_id_1>" not in m["content"] for m in messages)):
        raise Drop(MALFORMED)
    return messages


def is_multi_turn(prompt: Any) -> bool:
    return isinstance(prompt, list) and any(m["role"] == "assistant" for m in prompt)


def normalize_prompt(value: Any) -> str | list[dict[str, str]]:
    """A prompt as text, or as a list of {role, content} chat messages (kept as a list). Text with
    HelpSteer2's turn markers becomes the messages it holds (split_nemo_turns)."""
    if value is None:
        raise Drop(EMPTY_PROMPT)
    if isinstance(value, str):
        if not value.strip():
            raise Drop(EMPTY_PROMPT)
        return split_nemo_turns(value) or value
    if isinstance(value, (list, tuple)):
        messages = [_message(m) for m in value]
        if not any(m["content"].strip() for m in messages):
            raise Drop(EMPTY_PROMPT)
        return messages
    raise Drop(MALFORMED)


def split_conversation(value: Any, prompt: Any = None) -> tuple[Any, str]:
    """(prompt, completion text) from a response: text, or TRL's message list.

    A message list ends with the assistant turn that is the completion. The turns before it are the
    prompt (TRL's implicit-prompt format: the full conversation); when a separate prompt exists and the
    list holds only the answer (TRL's explicit-prompt format), that prompt is used. Empty or missing
    parts raise Drop with the reason.
    """
    if value is None:
        raise Drop(EMPTY_RESPONSE)
    if isinstance(value, str):
        completion = value
        prefix: list[dict[str, str]] = []
    elif isinstance(value, (list, tuple)):
        messages = [_message(m) for m in value]
        if not messages:
            raise Drop(EMPTY_RESPONSE)
        if messages[-1]["role"] != "assistant":
            raise Drop(MALFORMED)
        completion, prefix = messages[-1]["content"], messages[:-1]
    else:
        raise Drop(MALFORMED)
    if prefix:
        given = _as_messages(prompt) if _present(prompt) else []
        # The earlier turns either repeat the prompt (full conversation) or continue it.
        prompt = prefix if prefix[: len(given)] == given else given + prefix
    prompt = normalize_prompt(prompt)
    if not completion.strip():
        raise Drop(EMPTY_RESPONSE)
    return prompt, completion


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _as_messages(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return split_nemo_turns(prompt) or [{"role": "user", "content": prompt}]
    return [_message(m) for m in prompt] if isinstance(prompt, (list, tuple)) else []


def _digest(*parts: Any) -> bytes:
    """16 bytes that stand for the parts; kept instead of the text so duplicate detection stays small."""
    text = json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


@dataclass
class Columns:
    prompt: str | None
    response: str | None = None
    score: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    score_chosen: str | None = None
    score_rejected: str | None = None


def resolve_columns(keys: Iterable[str], options: Options, origin: str) -> Columns:
    """The columns to read, from the first row's keys and the options; a missing one is an error that lists
    the columns found."""
    keys = list(keys)
    found = ", ".join(map(str, keys)) or "none"

    def need(name: str, flag: str) -> str:
        if name not in keys:
            raise QbcoError(f"{origin}: no column '{name}' (found: {found}); pass {flag}")
        return name

    if options.mode == "pairs":
        prompt = options.prompt_column or "prompt"
        if options.prompt_column:
            need(prompt, "--prompt-column")
        scores = next(((c, r) for c, r in PAIR_SCORE_COLUMNS if c in keys and r in keys), (None, None))
        return Columns(
            prompt=prompt if prompt in keys else None,  # optional: TRL's implicit-prompt rows have none
            chosen=need("chosen", "rows with prompt, chosen, rejected"),
            rejected=need("rejected", "rows with prompt, chosen, rejected"),
            score_chosen=scores[0], score_rejected=scores[1],
        )
    prompt = need(options.prompt_column or "prompt", "--prompt-column")
    if options.response_column:
        response = need(options.response_column, "--response-column")
    else:
        response = next((c for c in RESPONSE_COLUMNS if c in keys), None)
        if response is None:
            raise QbcoError(f"{origin}: no response column ({' or '.join(RESPONSE_COLUMNS)}; found: {found}); "
                            "pass --response-column")
    if options.score_column:
        score = need(options.score_column, "--score")
    else:
        score = next((c for c in SCORE_COLUMNS if c in keys), None)
        if score is None:
            hint = " (for chosen/rejected rows use --pairs)" if "chosen" in keys else ""
            raise QbcoError(f"{origin}: no score column ({', '.join(SCORE_COLUMNS)}; found: {found}); "
                            f"pass --score{hint}")
    return Columns(prompt=prompt, response=response, score=score)


def likert_fields(row: dict[str, Any], cols: Columns, scale: tuple[float, float] | None, where: str):
    """(prompt, completion, score) of a scored row; Drop when it is defective, QbcoError when its score is
    outside a given scale."""
    prompt, completion = split_conversation(row.get(cols.response), row.get(cols.prompt))
    score = parse_score(row.get(cols.score))
    if scale is not None and not scale[0] <= score <= scale[1]:
        raise QbcoError(f"{where}: {cols.score} = {score} is outside the scale {format_scale(scale)}; "
                        "fix the row or pass the right --scale")
    return prompt, completion, score


def pair_candidates(row: dict[str, Any], cols: Columns) -> list[tuple[bool, Any]]:
    """[(True, fields or Drop), (False, fields or Drop)] for a chosen/rejected row, fields being
    (prompt, completion, score)."""
    prompt = row.get(cols.prompt) if cols.prompt else None
    out: list[tuple[bool, Any]] = []
    for label, column, score_column in ((True, cols.chosen, cols.score_chosen),
                                        (False, cols.rejected, cols.score_rejected)):
        try:
            p, c = split_conversation(row.get(column), prompt)
            score = None
            if score_column:
                try:
                    score = parse_score(row.get(score_column))
                except Drop:  # a pair's scores are informative only; the label comes from the pair
                    score = None
            out.append((label, (p, c, score)))
        except Drop as drop:
            out.append((label, drop))
    if not isinstance(out[0][1], Drop) and not isinstance(out[1][1], Drop):
        if _digest(out[0][1][0], out[0][1][1]) == _digest(out[1][1][0], out[1][1][1]):
            out = [(True, Drop(SAME_PAIR)), (False, Drop(SAME_PAIR))]
    return out


# ---------------------------------------------------------------- the binarizer


RowSource = Callable[[], Iterable[tuple[int, dict[str, Any]]]]


def binarize_rows(open_rows: RowSource, origin: str, options: Options, summary: Summary) -> Iterator[dict[str, Any]]:
    """Output rows (prompt, completion, label, score, source) from input rows, counting into `summary`.

    `open_rows` returns a fresh iterator of (row number, row) each call; the modes that group by prompt
    call it twice. `origin` names the input in `source` ("file.csv:12") and in messages.
    """
    _check_options(options)
    threshold = DEFAULT_THRESHOLD if options.threshold is None else float(options.threshold)
    summary.mode = options.mode
    if options.mode == "likert":
        summary.threshold = threshold
    if options.scale is not None:
        summary.scale, summary.scale_source = list(options.scale), "given"
        if options.mode == "likert" and not options.scale[0] < threshold <= options.scale[1]:
            every = "up" if threshold <= options.scale[0] else "down"
            raise QbcoError(f"--threshold {threshold:g} with --scale {format_scale(options.scale)} makes every row "
                            f"thumbs-{every}; pick a threshold inside the scale")

    first = next(iter(open_rows()), None)
    if first is None:
        raise QbcoError(f"{origin}: no rows")
    cols = resolve_columns(first[1].keys(), options, origin)
    summary.columns = {k: v for k, v in asdict(cols).items() if v is not None}

    groups = None
    if options.mode == "pairs-from-scores" or (options.mode == "likert" and options.dpo_prompts_only):
        groups = _group_by_prompt(open_rows, cols, options, origin)
        summary.passes = 2

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
        if options.mode == "pairs":
            candidates = pair_candidates(row, cols)
        else:
            try:
                prompt, completion, score = likert_fields(row, cols, options.scale, where)
                candidates = [(None, (prompt, completion, score))]
                lo = score if lo is None else min(lo, score)
                hi = score if hi is None else max(hi, score)
            except Drop as drop:
                candidates = [(None, drop)]
        for label, fields in candidates:
            summary.candidates += 1
            if isinstance(fields, Drop):
                reject(fields.reason, where)
                continue
            prompt, completion, score = fields
            key = _digest(prompt, completion, score) if label is None else _digest(prompt, completion, label, score)
            if key in seen:
                reject(DUPLICATE, where)
                continue
            seen.add(key)
            if label is None and groups is None:  # a scored row: the threshold decides
                label = score >= threshold
            elif label is None:  # a scored row in a pairing mode: its prompt's pair decides
                label, reason = _group_label(groups[_digest(prompt)], n, score, threshold, options.mode)
                if reason:
                    reject(reason, where)
                    continue
            summary.rows_written += 1
            if _digest(prompt) not in prompts:
                prompts.add(_digest(prompt))
                summary.prompts += 1
                summary.multi_turn_prompts += is_multi_turn(prompt)
            summary.thumbs_up += bool(label)
            summary.thumbs_down += not label
            yield {"prompt": prompt, "completion": completion, "label": bool(label), "score": score, "source": source}

    if summary.scale is None and lo is not None:
        summary.scale, summary.scale_source = [lo, hi], "inferred"
    if summary.rows_written == 0:
        summary.warnings.append("no row was written; see the drops by reason")
    elif summary.thumbs_up == 0 or summary.thumbs_down == 0:
        only = "up" if summary.thumbs_down == 0 else "down"
        hint = f" (threshold {threshold:g}, scores {format_scale(summary.scale)})" if options.mode == "likert" else ""
        summary.warnings.append(f"every written row is thumbs-{only}{hint}; BCO needs both")


def _check_options(options: Options) -> None:
    if options.mode not in MODES:
        raise QbcoError(f"unknown mode {options.mode!r} (use {', '.join(MODES)})")
    if options.mode == "pairs":
        for value, flag in ((options.score_column, "--score"), (options.response_column, "--response-column"),
                            (options.threshold, "--threshold"), (options.scale, "--scale")):
            if value is not None:
                raise QbcoError(f"{flag} is for scored rows; with --pairs the label comes from chosen/rejected")
        if options.dpo_prompts_only:
            raise QbcoError("--dpo-prompts-only is for scored rows; with --pairs every prompt already has a pair")
    if options.mode == "pairs-from-scores" and options.threshold is not None:
        raise QbcoError("--threshold has no effect with --pairs-from-scores: the higher-scored response of a "
                        "prompt is thumbs-up, the lower thumbs-down")


def _group_by_prompt(open_rows: RowSource, cols: Columns, options: Options, origin: str) -> dict[bytes, list]:
    """First pass of the pairing modes: per distinct prompt (by digest) the number of usable responses and
    the row numbers, scores and response digests of its best and worst one. Memory: a few hundred bytes
    per distinct prompt, whatever the length of the text. Rows that the second pass will drop (defects,
    duplicates) are skipped here the same way, so both passes agree."""
    groups: dict[bytes, list] = {}
    seen: set[bytes] = set()
    for n, row in open_rows():
        try:
            prompt, completion, score = likert_fields(row, cols, options.scale, f"{origin} row {n}")
        except Drop:
            continue
        key = _digest(prompt, completion, score)
        if key in seen:
            continue
        seen.add(key)
        response = _digest(completion)
        g = groups.get(_digest(prompt))
        if g is None:  # [count, best score, best row, best response, worst score, worst row, worst response]
            groups[_digest(prompt)] = [1, score, n, response, score, n, response]
            continue
        g[0] += 1
        if score > g[1]:
            g[1:4] = [score, n, response]
        if score < g[4]:
            g[4:7] = [score, n, response]
    return groups


def _group_label(g: list, n: int, score: float, threshold: float, mode: str) -> tuple[bool | None, str | None]:
    """(label, None) to write the row, (None, reason) to drop it."""
    count, best, best_row, best_response, worst, worst_row, worst_response = g
    if count == 1:
        return None, NO_PAIR
    if best == worst:
        return None, TIE
    if mode == "likert":  # --dpo-prompts-only: the prompt forms a pair; the label is still the threshold's
        return score >= threshold, None
    if best_response == worst_response:  # one response scored twice, differently: no real pair
        return None, SAME_PAIR
    if n == best_row:
        return True, None
    if n == worst_row:
        return False, None
    return None, NOT_IN_PAIR


def format_scale(scale) -> str:
    return "?" if not scale else f"{scale[0]:g}-{scale[1]:g}"


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
