"""Checks on the bundled demo dataset ``qbco/resources/demo.jsonl``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO = REPO_ROOT / "qbco" / "resources" / "demo.jsonl"
SCRIPT = REPO_ROOT / "scripts" / "make_demo.py"

KEYS = {"prompt": str, "completion": str, "label": bool, "task": str, "split": str}
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
