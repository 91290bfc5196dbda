"""Task success: does a generated answer do what its prompt asked? A row can carry a `check` (a spec below;
every row of the bundled demo has one) or a `reference` answer; `qbco eval --generate` scores base and
tuned answers with it. Pure functions of the answer text and the spec, no model.

    {"kind": "number", "value": 60}                   the last number in the answer is 60 ("5,000" reads 5000;
                                                      number words up to ninety-nine count)
    {"kind": "mentions", "any": ["Canberra"]}          the answer names one of `any` (whole words, case and
                                                      accents ignored)
    {"kind": "choice", "right": "receive", "wrong": "recieve"}
                                                      the answer names `right`, and names it before `wrong`
    {"kind": "exact", "value": "OCEAN", "case": true}  the whole answer is `value`, once surrounding blanks,
                                                      quotes and one final period are stripped (case-blind
                                                      with "case": false)
    {"kind": "list", "count": 3, "separator": ", ", "exclude": ["dog", ...]}
                                                      the answer (final period stripped) is exactly `count`
                                                      items joined by `separator`, each of one to three words,
                                                      none of them in `exclude` (another category's items)
    reference column "Paris"                          the same as {"kind": "mentions", "any": ["Paris"]}
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from qbco.common.errors import QbcoError

KINDS = ("number", "mentions", "choice", "exact", "list")

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


def passes(answer: str, spec: dict[str, Any]) -> bool:
    """Whether `answer` satisfies `spec` (see the module docstring)."""
    kind = spec["kind"]
    if kind == "number":
        found = numbers(answer)
        return bool(found) and found[-1] == float(spec["value"])
    if kind == "mentions":
        return any(_position(answer, word) is not None for word in spec["any"])
    if kind == "choice":
        right, wrong = _position(answer, spec["right"]), _position(answer, spec["wrong"])
        return right is not None and (wrong is None or right < wrong)
    if kind == "exact":
        bare, value = _bare(answer), str(spec["value"])
        return bare == value if spec.get("case", True) else fold(bare) == fold(value)
    if kind == "list":
        items = [item.strip() for item in _bare(answer).split(spec["separator"])]
        excluded = {fold(x) for x in spec.get("exclude", [])}
        return (
            len(items) == int(spec["count"])
            and all(1 <= len(item.split()) <= 3 for item in items)
            and not any(fold(item) in excluded for item in items)
        )
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
              "list": ("count", "separator")}[spec["kind"]]
    missing = [k for k in needed if k not in spec]
    if missing:
        raise QbcoError(f"{origin}: a {spec['kind']} check needs {', '.join(missing)}")
    return spec
