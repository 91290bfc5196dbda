"""Feedback rows as token ids: the prompt through the chat template (shortened from its earliest turns), the
completion ended by EOS; batches right-padded, with the mask of the completion tokens the reward sums over."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from qbco.common.errors import QbcoError
from qbco.data.feedback import Example


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
