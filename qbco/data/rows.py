"""Row-level conversion every layout shares: why a candidate row is dropped, scores as numbers, prompts and chat
messages (HelpSteer2's turn markers included), and the small digests that stand for rows."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from typing import Any

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
MISSING_PARENT = "missing parent message"  # a conversation tree whose earlier message is not in the file
NOT_IN_SNAPSHOT = "rated message not in snapshot"  # a front-end export whose chat lacks the rated message
DEFECTS = (EMPTY_PROMPT, EMPTY_RESPONSE, MISSING_SCORE, NON_NUMERIC_SCORE, DUPLICATE, MALFORMED, SAME_PAIR,
           MISSING_PARENT, NOT_IN_SNAPSHOT)
# ...the second group are drops by design of a layout or a mode; --strict lets them pass.
TIE = "tied scores"
NO_PAIR = "prompt without a pair"
NOT_IN_PAIR = "not in pair"
PROMPTS_DIFFER = "prompts differ"  # a chosen/rejected pair whose conversations differ before the last turn
NO_VOTES = "no votes"
TIED_VOTES = "tied votes"
DELETED = "deleted message"
NO_RATING = "no thumbs rating"


class Drop(Exception):
    """A candidate row that is not written, and why (one of the reasons above)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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


def message(m: Any) -> dict[str, str]:
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
        messages = [message(m) for m in value]
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
        messages = [message(m) for m in value]
        if not messages:
            raise Drop(EMPTY_RESPONSE)
        if messages[-1]["role"] != "assistant":
            raise Drop(MALFORMED)
        completion, prefix = messages[-1]["content"], messages[:-1]
    else:
        raise Drop(MALFORMED)
    if prefix:
        given = as_messages(prompt) if present(prompt) else []
        # The earlier turns either repeat the prompt (full conversation) or continue it.
        prompt = prefix if prefix[: len(given)] == given else given + prefix
    prompt = normalize_prompt(prompt)
    if not completion.strip():
        raise Drop(EMPTY_RESPONSE)
    return prompt, completion


def present(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def as_messages(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return split_nemo_turns(prompt) or [{"role": "user", "content": prompt}]
    return [message(m) for m in prompt] if isinstance(prompt, (list, tuple)) else []


def digest(*parts: Any) -> bytes:
    """16 bytes that stand for the parts; kept instead of the text so duplicate detection stays small."""
    text = json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()

