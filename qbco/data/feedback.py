"""Binary feedback data: read rows, normalise labels once, split by prompt, tokenize, batch."""

from __future__ import annotations

import difflib
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Hashable, Iterator, Sequence

import torch

from qbco.errors import QbcoError

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
            raise QbcoError(f"{origin}: row {i}: missing column(s) {', '.join(missing)} (found: {found})")
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
    text = resources.files("qbco").joinpath("resources/demo.jsonl").read_text(encoding="utf-8")
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

    eval_fraction None keeps the data's own held-out part (the demo's, a registry's validation split)
    and otherwise holds out 10%; a number re-splits everything by prompt with that fraction.
    """
    check_data_source(data)
    own_eval: list[Example] | None = None
    if data == "demo":
        train, own_eval = read_demo()
        return _resplit(train, own_eval, eval_fraction, seed)
    from qbco import registry
    from qbco.reader import read_rows

    if registry.is_registered(data):
        train_rows, eval_rows = registry.load_registered(data)
        train = rows_to_examples(train_rows, data)
        own_eval = rows_to_examples(eval_rows, f"{data}:eval") if eval_rows else None
    else:
        path = Path(data).expanduser()
        train = rows_to_examples(read_rows(path), str(path))
    return _resplit(train, own_eval, eval_fraction, seed)


def check_data_source(data: str) -> None:
    """The one-line error for a `--data` that is neither 'demo', a registered name nor a file, with the
    nearest name. It reads nothing, so a typo fails before a model is converted, loaded or downloaded."""
    from qbco import registry
    from qbco.reader import FORMATS

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


# ---------------------------------------------------------------- tokenization


@dataclass
class Encoded:
    """Token ids of one example: prompt then completion; `truncated` says which side was cut."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    prompt_cut: bool
    completion_cut: bool
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def prompt_text(prompt: str | list[dict[str, str]], tokenizer) -> tuple[str, bool]:
    """The prompt as the model sees it; (text, True) when it went through the chat template."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
    return "\n\n".join(m["content"] for m in messages) + "\n\n", False


def prompt_token_ids(prompt: str | list[dict[str, str]], tokenizer, limit: int) -> tuple[list[int], bool]:
    """(token ids of the prompt as the model sees it, at most `limit`; whether it was shortened).

    A long prompt is shortened in its messages, never in what the chat template writes around them: BOS, a
    default system prompt, the role headers and the generation prompt all stay (cutting the token ids from
    the left would drop exactly those: Llama 3 and Qwen 2.5 templates open with them). The earliest turns go
    first: a turn whose tokens are all over the limit is dropped whole and the next one is cut from its start
    (an assistant turn may then open the conversation; where the template refuses that, it is dropped too);
    only then the final turn, the one the completion answers, is cut from its start. System messages stay.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    ids = _render(messages, tokenizer)
    cut = False
    while len(ids) > limit:
        cut, excess = True, len(ids) - limit
        first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
        rest = _without_first_tokens(messages[first]["content"], excess, tokenizer) if first is not None else ""
        final = first is None or first == len(messages) - 1
        if final and not rest.strip():
            fixed = len(_render([m if m["role"] == "system" else {**m, "content": ""} for m in messages], tokenizer))
            raise QbcoError(f"what the chat template adds and the system message take {fixed} tokens, more than "
                            f"--max-prompt-length {limit}; raise it")
        if not rest.strip():
            del messages[first]
            if messages[first]["role"] == "assistant" and first < len(messages) - 1 and _render(messages, tokenizer, None) is None:
                del messages[first]  # the template wants a user turn first (Gemma's and Mistral's do)
        else:
            messages[first]["content"] = rest
        ids = _render(messages, tokenizer)
    return ids, cut


def _render(messages: list[dict[str, str]], tokenizer, refused: Any = "raise") -> list[int] | None:
    """The messages' token ids; `refused` instead of the template's own error, when it is not "raise"."""
    from jinja2.exceptions import TemplateError

    try:
        text, templated = prompt_text(messages, tokenizer)
    except TemplateError:
        if refused == "raise":
            raise
        return refused
    # A chat template writes its own BOS where the model wants one; a raw prompt gets the tokenizer's default.
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


def _without_first_tokens(text: str, k: int, tokenizer) -> str:
    """`text` less its first k tokens, the rest exactly as written ('' when nothing is left)."""
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[k:]) if k < len(ids) else ""
    # Several byte-level tokens can start inside one character: cut at the first start past the text's own.
    at = next((start for start, _ in offsets[k:] if start > 0), len(text))
    return text[at:]


def encode(example: Example, tokenizer, max_prompt_length: int, max_completion_length: int) -> Encoded:
    """Prompt shortened from its earliest turns (prompt_token_ids), completion (ended by EOS) cut from the right."""
    try:
        prompt_ids, prompt_cut = prompt_token_ids(example.prompt, tokenizer, max_prompt_length)
    except QbcoError as err:
        raise QbcoError(f"{example.source}: {err}") from None
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    completion_cut = len(completion_ids) > max_completion_length
    return Encoded(
        prompt_ids=prompt_ids,
        completion_ids=completion_ids[:max_completion_length],
        label=example.label,
        prompt_cut=prompt_cut,
        completion_cut=completion_cut,
        source=example.source,
    )


def encode_all(examples: list[Example], tokenizer, max_prompt_length: int, max_completion_length: int) -> list[Encoded]:
    return [encode(e, tokenizer, max_prompt_length, max_completion_length) for e in examples]


@dataclass
class Batch:
    """Right-padded ids; completion_mask marks the tokens whose log-probs make up the reward."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B] bool
    index: torch.Tensor  # [B] position of each row in the encoded dataset

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.completion_mask, self.labels, self.index)))


def collate(encoded: list[Encoded], index: list[int], pad_id: int) -> Batch:
    rows = [encoded[i] for i in index]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        input_ids[b, : p + c] = torch.tensor(r.prompt_ids + r.completion_ids)
        attention_mask[b, : p + c] = 1
        completion_mask[b, p : p + c] = 1
    labels = torch.tensor([r.label for r in rows], dtype=torch.bool)
    return Batch(input_ids, attention_mask, completion_mask, labels, torch.tensor(index, dtype=torch.long))


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of row indices for one epoch, shuffled with (seed, epoch): a pure function of both, so a
    resumed run sees the same order. Not grouped by length: on feedback data length tracks the label
    (refusals are short, rude replies long) and length-sorted batches become one-class batches.
    A last partial batch is dropped (its per-class means would rest on a row or two); the shuffle differs
    every epoch, so no row is left out for good. Fewer rows than one batch make one batch."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    full = max(1, n // batch_size) * batch_size
    return [order[i : i + batch_size] for i in range(0, min(n, full), batch_size)]


def batch_order(encoded: list[Encoded], batch_size: int) -> list[list[int]]:
    """The rows of each batch of an evaluation or reference pass: longest first, to cut padding."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def iter_batches(encoded: list[Encoded], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """The batches of batch_order, collated."""
    for rows in batch_order(encoded, batch_size):
        yield collate(encoded, rows, pad_id)
