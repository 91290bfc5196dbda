"""docs/pitfalls.md is the list the code refers to: every entry names tests that exist, every reference in
the code names an entry; and the guards of the entries that no other test file holds."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from qbco.data.encoding import epoch_order
from qbco.run.config import build_config
from qbco.train.prepare import step_windows

ROOT = Path(__file__).resolve().parents[1]


def entries() -> dict[int, str]:
    text = (ROOT / "docs" / "pitfalls.md").read_text(encoding="utf-8")
    parts = re.split(r"^## (\d+)\. ", text, flags=re.M)[1:]
    return {int(n): body for n, body in zip(parts[::2], parts[1::2])}


def test_every_entry_names_tests_that_exist_or_the_issue_that_will():
    found = entries()
    assert sorted(found) == list(range(1, len(found) + 1)) and len(found) >= 18
    for n, body in found.items():
        guards = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", body)
        if "Not yet guarded: issue" in body:
            assert not guards, n
            continue
        assert "Guarded by:" in body and guards, f"entry {n} names no test"
        for path, name in guards:
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(encoding="utf-8"), flags=re.M), f"entry {n}: {path}::{name}"


def test_code_refers_to_entries_that_exist():
    numbers = set(entries())
    refs = 0
    for folder in ("qbco", "tests", "scripts", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"PITFALLS \d", text), f"{path}: refer to an entry as docs/pitfalls.md, N"
            for n in re.findall(r"docs/pitfalls\.md, (\d+)", text):
                assert int(n) in numbers, f"{path}: docs/pitfalls.md, {n}"
                refs += 1
    assert refs >= 10


def test_every_epoch_is_shuffled_reproducibly():
    """docs/pitfalls.md, 4: each epoch is a new permutation of the rows (not the file order), the same for the
    same (seed, epoch), and the training windows are cut from it."""
    n, batch = 40, 8
    first, again, second = epoch_order(n, batch, 3, 0), epoch_order(n, batch, 3, 0), epoch_order(n, batch, 3, 1)
    flat = [i for b in first for i in b]
    assert sorted(flat) == list(range(n)) and flat != list(range(n))
    assert first == again and first != second and first != epoch_order(n, batch, 4, 0)
    config = build_config(batch_size=4, grad_accum=2, seed=3)
    windows = step_windows([(i,) for i in range(n)], config)
    for epoch in range(2):
        expected = epoch_order(n, 8, 3, epoch)
        got = [next(windows) for _ in expected]
        assert got == [[w[:4], w[4:]] for w in expected]


def test_only_the_lora_weights_train_and_the_base_keeps_its_dtype(tiny_model_dir):
    """docs/pitfalls.md, 9: nothing of the base is upcast or made trainable; the adapters train in float32."""
    from qbco.model.loading import load_policy

    config = build_config(model=str(tiny_model_dir), dtype="bf16", lora_r=4)
    torch.manual_seed(0)
    _, model, _ = load_policy(config, torch.device("cpu"))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name and p.dtype == torch.float32 for name, p in trainable.items())
    frozen = [p for name, p in model.named_parameters() if "lora_" not in name]
    assert all(not p.requires_grad for p in frozen)
    assert {p.dtype for p in frozen} == {torch.bfloat16, torch.uint8}  # norms and embeddings; the 4-bit weights
