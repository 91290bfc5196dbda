"""Checks on the bundled demo dataset ``qbco/data/demo.jsonl``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO = REPO_ROOT / "qbco" / "data" / "demo.jsonl"
SCRIPT = REPO_ROOT / "scripts" / "make_demo.py"

KEYS = {"prompt": str, "completion": str, "label": bool, "task": str, "split": str, "check": dict}
PRE_CHECK_SHA256 = "59f2a3635e02461f37799d8fa00ad2f33cee925c3912a0d0c023be1ca1370c68"  # demo.jsonl before checks
ARITH_RE = re.compile(r"(\d+)\s*(\+|-|\*|plus|minus|times)\s*(\d+)")


@pytest.fixture(scope="module")
def rows():
    with open(DEMO, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_regenerates_byte_for_byte(tmp_path):
    out = tmp_path / "demo.jsonl"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        check=True, capture_output=True, cwd=str(tmp_path),
    )
    assert out.read_bytes() == DEMO.read_bytes()


def test_schema(rows):
    assert rows
    for r in rows:
        assert set(r) == set(KEYS), r
        for key, typ in KEYS.items():
            assert type(r[key]) is typ, (key, r)
        assert r["prompt"] and r["completion"] and r["task"]
        assert r["split"] in ("train", "eval")


def test_label_share(rows):
    share = sum(r["label"] for r in rows) / len(rows)
    assert 0.35 <= share <= 0.45, share


def test_split_by_prompt_and_stratified(rows):
    splits = defaultdict(set)
    for r in rows:
        splits[r["prompt"]].add(r["split"])
    assert all(len(s) == 1 for s in splits.values()), "a prompt appears in both splits"
    tasks_by_split = defaultdict(set)
    for r in rows:
        tasks_by_split[r["split"]].add(r["task"])
    assert tasks_by_split["train"] == tasks_by_split["eval"] == {r["task"] for r in rows}


def test_no_duplicates_and_prompt_structure(rows):
    pairs = [(r["prompt"], r["completion"]) for r in rows]
    assert len(pairs) == len(set(pairs))
    by_prompt = defaultdict(list)
    for r in rows:
        by_prompt[r["prompt"]].append(r["label"])
    for prompt, labels in by_prompt.items():
        assert 2 <= len(labels) <= 3, prompt
        assert not all(labels), f"no thumbs-down for {prompt!r}"
        assert sum(labels) <= 1, prompt


def _expected(prompt: str) -> int:
    m = ARITH_RE.search(prompt)
    assert m, prompt
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    if op in ("+", "plus"):
        return a + b
    if op in ("-", "minus"):
        return a - b
    return a * b


def test_arithmetic_answers(rows):
    n_up = n_wrong = 0
    for r in rows:
        if r["task"] != "arithmetic":
            continue
        expected = _expected(r["prompt"])
        numbers = re.findall(r"-?\d+", r["completion"].replace(" - ", " "))
        if r["label"]:
            assert numbers, r
            assert int(numbers[-1]) == expected, r
            n_up += 1
        elif numbers:  # a "wrong" thumbs-down (evasive/rude ones hold no number)
            assert int(numbers[-1]) != expected, r
            n_wrong += 1
    assert n_up > 0 and n_wrong > 0


def test_every_row_carries_a_check_that_its_label_agrees_with(rows):
    """A thumbs-up completion is a right answer and a thumbs-down one (wrong, evasive or rude) is not: the
    check of every row agrees with its label, and all rows of a prompt carry the same check."""
    from qbco.eval.tasks import passes, row_check

    by_prompt = defaultdict(list)
    for r in rows:
        spec = row_check(r)
        assert passes(r["completion"], spec, r["prompt"]) == r["label"], r
        by_prompt[r["prompt"]].append(json.dumps(spec, sort_keys=True))
    assert all(len(set(specs)) == 1 for specs in by_prompt.values())
    kinds = {(r["task"], r["check"]["kind"]) for r in rows}
    assert {t for t, _ in kinds} == {"arithmetic", "units", "capitals", "format", "spelling", "opposites"}


def test_arithmetic_checks_hold_the_computed_result(rows):
    for r in rows:
        if r["task"] == "arithmetic":
            assert r["check"] == {"kind": "number", "value": _expected(r["prompt"])}, r


def test_checks_were_added_without_touching_the_other_fields(rows):
    """Adding `check` drew no random numbers: the other fields hash as they did before checks existed
    (the file at commit e1a86d6), so training on the demo sees exactly the same rows."""
    import hashlib

    text = "".join(json.dumps({k: r[k] for k in ("prompt", "completion", "label", "task", "split")}, ensure_ascii=False) + "\n" for r in rows)
    assert hashlib.sha256(text.encode()).hexdigest() == PRE_CHECK_SHA256
