"""Feedback rows: labels normalised once, rows checked, the bundled demo, split by prompt, the registry and
local files behind one `load_feedback`."""

from __future__ import annotations

import difflib
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Hashable, Sequence

from qbco.common.errors import QbcoError
from qbco.data import layouts, registry
from qbco.data.reader import FORMATS, read_rows

# "1.0" / "0.0": pandas writes a label column as floats once any cell of it is missing, and so it goes to CSV.
TRUE_LABELS = {"true", "1", "1.0", "up", "thumbs_up", "thumbsup", "yes", "positive", "good"}
FALSE_LABELS = {"false", "0", "0.0", "down", "thumbs_down", "thumbsdown", "no", "negative", "bad"}


def normalize_label(value: Any) -> bool:
    """Every accepted spelling of a label as a bool (docs/pitfalls.md, 14: never compare labels by identity)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_LABELS | FALSE_LABELS:
        return value.strip().lower() in TRUE_LABELS
    raise ValueError(f"not a thumbs-up/down label: {value!r}")


@dataclass
class Example:
    """One feedback row. `prompt` is a string or a list of chat messages; `source` names file and row."""

    prompt: str | list[dict[str, str]]
    completion: str
    label: bool | None  # None only for an unlabelled row read by `qbco score`
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_key(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else json.dumps(self.prompt, sort_keys=True)


def _completion_text(value: Any) -> Any:
    """TRL's conversational rows store the completion as [{'role': 'assistant', 'content': ...}]."""
    if isinstance(value, list):
        return "".join(m.get("content", "") for m in value if isinstance(m, dict) and m.get("role") == "assistant")
    return value


def rows_to_examples(rows: list[dict[str, Any]], origin: str, labels: bool = True) -> list[Example]:
    """Check columns and values of raw rows; the error names origin, row and column. With labels=False
    (`qbco score`) a row may go without a label (missing, null or empty): its label is None."""
    if not rows:
        raise QbcoError(f"{origin}: no rows")
    examples = []
    for i, row in enumerate(rows, start=1):
        missing = [c for c in ("prompt", "completion", "label") if c not in row and (labels or c != "label")]
        if missing:
            found = ", ".join(map(str, row.keys())) or "none"
            published = layouts.detect(row)
            hint = (f"; these rows are in the {published} layout: qbco binarize {origin} -o thumbs.jsonl turns them "
                    "into thumbs" if published else "")
            raise QbcoError(f"{origin}: row {i}: missing column(s) {', '.join(missing)} (found: {found}){hint}")
        prompt, completion = row["prompt"], _completion_text(row["completion"])
        try:
            label = None if not labels and row.get("label") in (None, "") else normalize_label(row["label"])
        except ValueError:
            raise QbcoError(
                f"{origin}: row {i}, column label: {row['label']!r} is not a thumbs-up/down label "
                "(use true/false, 1/0, up/down or thumbs_up/thumbs_down)"
            ) from None
        if not isinstance(prompt, (str, list)) or not prompt or (isinstance(prompt, str) and not prompt.strip()):
            raise QbcoError(f"{origin}: row {i}, column prompt: empty or not text")
        if isinstance(prompt, list) and not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            raise QbcoError(f"{origin}: row {i}, column prompt: a list prompt must hold {{role, content}} messages")
        if not isinstance(completion, str) or not completion.strip():
            raise QbcoError(f"{origin}: row {i}, column completion: empty or not text")
        extra = {k: v for k, v in row.items() if k not in ("prompt", "completion", "label")}
        examples.append(Example(prompt, completion, label, f"{origin}:{i}", extra))
    return examples


def read_demo() -> tuple[list[Example], list[Example]]:
    """The bundled demo set, already split by prompt (scripts/make_demo.py writes it)."""
    text = resources.files("qbco.data").joinpath("demo.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    examples = rows_to_examples(rows, "demo")
    return [e for e in examples if e.extra["split"] == "train"], [e for e in examples if e.extra["split"] == "eval"]


def prompt_pairs(prompt_keys: Sequence[Hashable], labels: Sequence[bool]) -> list[tuple[int, int]]:
    """(chosen, rejected) row indices: every (thumbs-up, thumbs-down) combination of rows sharing a prompt,
    prompts in order of first appearance. DPO trains on these and `qbco eval` scores them."""
    groups: dict[Hashable, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for i, (key, label) in enumerate(zip(prompt_keys, labels)):
        groups[key][0 if label else 1].append(i)
    return [(w, l) for ups, downs in groups.values() for w in ups for l in downs]


def split_by_prompt(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out about `fraction` of the rows, whole prompts at a time, so no prompt is in both parts."""
    if fraction <= 0:
        return examples, []
    prompts = sorted({e.prompt_key for e in examples})
    random.Random(seed).shuffle(prompts)
    n_eval = max(1, round(fraction * len(prompts)))
    held = set(prompts[:n_eval])
    return [e for e in examples if e.prompt_key not in held], [e for e in examples if e.prompt_key in held]


def load_feedback(data: str, eval_fraction: float | None, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples from 'demo', a registered dataset name, or a local file.

    eval_fraction None keeps the data's own held-out part (the demo's, a registry's validation split, a file's
    `split` column: split_column) and otherwise holds out 10%; a number re-splits everything by prompt with that fraction.
    """
    check_data_source(data)
    own_eval: list[Example] | None = None
    if data == "demo":
        train, own_eval = read_demo()
        return _resplit(train, own_eval, eval_fraction, seed)
    if registry.is_registered(data):
        train_rows, eval_rows = registry.load_registered(data)
        train = rows_to_examples(train_rows, data)
        own_eval = rows_to_examples(eval_rows, f"{data}:eval") if eval_rows else None
    else:
        path = Path(data).expanduser()
        train, own_eval = split_column(rows_to_examples(read_rows(path), str(path)))
    return _resplit(train, own_eval, eval_fraction, seed)


SPLIT_NAMES = {"train": "train", "eval": "eval", "validation": "eval", "test": "eval", "heldout": "eval"}


def split_column(examples: list[Example]) -> tuple[list[Example], list[Example] | None]:
    """A file's own held-out part: when every row has a `split` of train or eval (validation, test) and some are
    eval, (the train rows, the eval rows); otherwise (all rows, None) and qbco holds out its share by prompt."""
    names = [SPLIT_NAMES.get(str(e.extra.get("split", "")).strip().lower()) for e in examples]
    if not examples or None in names or "eval" not in names or "train" not in names:
        return examples, None
    return [e for e, n in zip(examples, names) if n == "train"], [e for e, n in zip(examples, names) if n == "eval"]


def check_data_source(data: str) -> None:
    """The one-line error for a `--data` that is neither 'demo', a registered name nor a file, with the
    nearest name. It reads nothing, so a typo fails before a model is converted, loaded or downloaded."""
    path = Path(data).expanduser()
    if data == "demo" or registry.is_registered(data) or path.exists():
        return
    if path.name.lower().split(".")[-1] in (*FORMATS, "gz"):
        raise QbcoError(f"data file not found: {path}")
    names = ["demo", *registry.DATASETS]
    close = difflib.get_close_matches(data.lower(), names, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise QbcoError(f"--data {data!r} is neither a file nor a registered dataset ({', '.join(names)}){hint}")


def _resplit(train: list[Example], own_eval: list[Example] | None, eval_fraction: float | None, seed: int):
    if eval_fraction is None and own_eval is not None:
        return train, own_eval
    everything = train + (own_eval or [])
    fraction = 0.1 if eval_fraction is None else eval_fraction
    train, held = split_by_prompt(everything, fraction, seed)
    if not train:
        n = len({e.prompt_key for e in everything})
        raise QbcoError(f"no training rows left after holding out {fraction:g} of {n} prompt(s); lower --eval-fraction or add data")
    return train, held
