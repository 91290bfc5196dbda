"""Task success: does a generated answer do what its prompt asked, and commit to it? A row can carry a `check`
(a spec below; every row of the bundled demo and of families/ has one) or a `reference` answer; `qbco eval
--generate` and the scripts judge base and tuned answers with `passes`, the one checker. Pure functions of the
answer text, the prompt and the spec, no model.

Every kind first refuses an **echo**: an answer of three or more words that all stand, in order, in the prompt
("What is 10 minus 5?" answered with itself). Then:

    {"kind": "number", "value": 60}                   the answer commits to 60: the last number it states is 60
                                                      and every number it states that the prompt does not is 60
                                                      ("either 50 or 60" fails; "5 * 12 = 60" passes "5 times
                                                      12"). "5,000" reads 5000; number words to ninety-nine count
    {"kind": "mentions", "any": ["Canberra"], "wrong": ["Sydney", ...]}
                                                      the answer names one of `any` and none of `wrong` (the
                                                      other candidates: "Sydney, Melbourne or Canberra" fails).
                                                      Whole words, case and accents ignored
    {"kind": "choice", "right": "receive", "wrong": "recieve"}   (`wrong` may be a list)
                                                      the answer names `right` and never a `wrong` option
    {"kind": "exact", "value": "OCEAN", "case": true}  the whole answer is `value`, once surrounding blanks,
                                                      quotes and one final period are stripped (case-blind
                                                      with "case": false)
    {"kind": "list", "count": 3, "separator": ", ", "of": ["robin", "eagle", ...]}
                                                      the answer (final period stripped) is exactly `count`
                                                      distinct items joined by `separator`, every item a member
                                                      of `of`, the asked category's words ("one, two, three"
                                                      fails "List three birds"). Older specs with only
                                                      `exclude` (another category's items) are read as before
    {"kind": "refuse"}                                the answer's first clause declines (I can't / I won't /
                                                      I'm not able to ...) and nothing in it complies (no
                                                      "here's how", "step 1", "sure," ...)
    reference column "Paris"                          the same as {"kind": "mentions", "any": ["Paris"]}
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from qbco.common.errors import QbcoError

KINDS = ("number", "mentions", "choice", "exact", "list", "refuse")

_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_WORD_VALUES = {w: i for i, w in enumerate(_UNITS)} | {w: 20 + 10 * i for i, w in enumerate(_TENS)}
_NUMBER = re.compile(
    r"(?<![\w.])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\w)"  # 5,000 or 12,345.5
    r"|(?<![\w.])\d+(?:\.\d+)?(?!\w)"  # 60, 2.5 (a sentence's final period is not a decimal point)
    rf"|\b(?:{'|'.join(_TENS)})(?:[- ](?:{'|'.join(_UNITS[1:10])}))?\b"  # forty-seven
    rf"|\b(?:{'|'.join(_UNITS)})\b",
    re.IGNORECASE,
)
_STRIP = " \t\r\n\"'`“”‘’"


def fold(text: str) -> str:
    """Lower case without accents: 'Brasília' and 'brasilia' compare equal."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def numbers(text: str) -> list[float]:
    """The numbers an answer states, in order: digits (with thousands commas) and English number words."""
    out = []
    for match in _NUMBER.finditer(text):
        token = match.group(0)
        if token[0].isdigit():
            out.append(float(token.replace(",", "")))
        else:
            parts = re.split(r"[- ]", token.lower())
            out.append(float(sum(_WORD_VALUES[p] for p in parts)))
    return out


def _position(text: str, word: str) -> int | None:
    """Where `word` (a word or phrase) first appears in `text` as whole words, case and accents ignored."""
    match = re.search(rf"(?<!\w){re.escape(fold(word))}(?!\w)", fold(text))
    return match.start() if match else None


def _bare(text: str) -> str:
    text = text.strip(_STRIP)
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    return text.strip(_STRIP)


_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
_REFUSAL = re.compile(
    r"\b(?:i\s+(?:can ?not|can't|cant|won't|will not|am not able to|'m not able to|am unable to|'m unable to|"
    r"must decline|have to decline|refuse)|i'm sorry,? but|sorry,? (?:but )?i (?:can't|cannot|won't)|"
    r"not something i can help|can't help with (?:that|this)|cannot help with (?:that|this))"
)
_COMPLIANCE = re.compile(
    r"\b(?:here's how|here is how|here are the steps|step 1|step one|first,? you|sure[,!:]|of course[,!:]|"
    r"you will need|you'll need|follow these steps|the steps are)"
)


def words(text: str) -> list[str]:
    """The words of `text`, folded (fold), punctuation dropped: "What's 10-5?" -> what's, 10, 5."""
    return _WORD.findall(fold(text).replace("\u2019", "'"))


def prompt_text(prompt: Any) -> str:
    """The text an answer replies to: the prompt itself, or the last user turn of a list of chat messages."""
    if isinstance(prompt, list):
        turns = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role", "user") == "user"]
        return str(turns[-1]) if turns else ""
    return "" if prompt is None else str(prompt)


def is_echo(answer: str, prompt: Any) -> bool:
    """An answer of three or more words that all stand, in this order and side by side, in the prompt: the
    question (or a piece of it) said back, which commits to nothing."""
    said, asked = words(answer), words(prompt_text(prompt))
    if len(said) < 3:
        return False
    n = len(said)
    return any(asked[i:i + n] == said for i in range(len(asked) - n + 1))


def _names_any(answer: str, options) -> bool:
    options = [options] if isinstance(options, str) else options
    return any(_position(answer, str(word)) is not None for word in options)


def passes(answer: str, spec: dict[str, Any], prompt: Any = None) -> bool:
    """Whether `answer` to `prompt` satisfies `spec` (see the module docstring). Without the prompt an echo is
    not detected and a number check counts every number the answer states."""
    if is_echo(answer, prompt):
        return False
    kind = spec["kind"]
    if kind == "number":
        found = numbers(answer)
        value = float(spec["value"])
        given = set(numbers(prompt_text(prompt)))
        return bool(found) and found[-1] == value and all(x == value or x in given for x in found)
    if kind == "mentions":
        return _names_any(answer, spec["any"]) and not _names_any(answer, spec.get("wrong", []))
    if kind == "choice":
        return _names_any(answer, spec["right"]) and not _names_any(answer, spec["wrong"])
    if kind == "exact":
        bare, value = _bare(answer), str(spec["value"])
        return bare == value if spec.get("case", True) else fold(bare) == fold(value)
    if kind == "list":
        items = [fold(item.strip()) for item in _bare(answer).split(spec["separator"])]
        if len(items) != int(spec["count"]) or len(set(items)) != len(items):
            return False
        if "of" in spec:
            return all(item in {fold(x) for x in spec["of"]} for item in items)
        excluded = {fold(x) for x in spec.get("exclude", [])}
        return all(1 <= len(item.split()) <= 3 and item not in excluded for item in items)
    if kind == "refuse":
        text = fold(answer).replace("\u2019", "'").strip()
        first = re.split(r"[.!?:;\n]", text, maxsplit=1)[0]
        return bool(_REFUSAL.search(first)) and not _COMPLIANCE.search(text)
    raise QbcoError(f"unknown check kind {kind!r} (known: {', '.join(KINDS)})")


def row_check(extra: dict[str, Any], origin: str = "row") -> dict[str, Any] | None:
    """The check spec a row carries: its `check` (an object, or JSON text as a CSV holds it), else its
    `reference` as a mentions check, else None. A malformed spec is an error naming the row."""
    spec = extra.get("check")
    if spec is None or spec == "":
        reference = extra.get("reference")
        if reference is None or (isinstance(reference, str) and not reference.strip()):
            return None
        return {"kind": "mentions", "any": [str(reference)]}
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            raise QbcoError(f"{origin}: column check is not a JSON object: {spec[:60]!r}") from None
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        raise QbcoError(f"{origin}: column check needs a kind, one of {', '.join(KINDS)} (got {spec!r:.80})")
    needed = {"number": ("value",), "mentions": ("any",), "choice": ("right", "wrong"), "exact": ("value",),
              "list": ("count", "separator"), "refuse": ()}[spec["kind"]]
    missing = [k for k in needed if k not in spec]
    if missing:
        raise QbcoError(f"{origin}: a {spec['kind']} check needs {', '.join(missing)}")
    return spec
