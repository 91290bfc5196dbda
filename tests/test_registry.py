"""The dataset registry behind `qbco train --data NAME`: same conversion as `qbco binarize`, and one clear
line when the hub cannot be reached. No network: the hub is replaced by in-memory datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from conftest import HS2_CAT_MESSAGES, HS2_MULTI_TURN, HS2_TRIP_MESSAGES, write_hs2_jsonl_gz

from qbco.common.errors import QbcoError
from qbco.data import registry
from qbco.data.binarize import binarize

HS2_TRAIN = [
    # prompt, response, helpfulness, correctness, coherence, complexity, verbosity
    ("Explain gravity.", "Mass attracts mass.", 4, 4, 4, 2, 1),
    ("Explain gravity.", "It is magic.", 1, 0, 3, 1, 1),
    ("Write a limerick.", "", 2, 2, 2, 1, 1),  # empty response
    ("List three primes.", "2, 3, 5", 3, 4, 4, 1, 1),
    ("List three primes.", "2, 3, 5", 3, 4, 4, 1, 1),  # duplicate
    ("Say hello.", "Hello!", 4, 4, 4, 0, 0),
]
HS2_VALIDATION = [("Name a planet.", "Mars.", 4, 4, 4, 1, 1), ("Name a planet.", "The Moon.", 0, 0, 4, 1, 1)]
COLUMNS = ["prompt", "response", "helpfulness", "correctness", "coherence", "complexity", "verbosity"]


def as_dataset(rows) -> datasets.Dataset:
    return datasets.Dataset.from_list([dict(zip(COLUMNS, r)) for r in rows])


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answered from memory, recording what was asked for."""
    calls = []
    message = lambda role, text: {"role": role, "content": text}  # noqa: E731
    hub = {
        "nvidia/HelpSteer2": datasets.DatasetDict(train=as_dataset(HS2_TRAIN), validation=as_dataset(HS2_VALIDATION)),
        "trl-lib/ultrafeedback_binarized": datasets.DatasetDict(train=datasets.Dataset.from_list([
            {"chosen": [message("user", "Pick a fruit."), message("assistant", "An apple.")],
             "rejected": [message("user", "Pick a fruit."), message("assistant", "A brick.")],
             "score_chosen": 9.0, "score_rejected": 2.0},
            {"chosen": [message("user", "Be kind."), message("assistant", "Sure.")],
             "rejected": [message("user", "Be kind."), message("assistant", "No.")],
             "score_chosen": 7.0, "score_rejected": 1.0},
        ])),  # no test split here: held-out rows are then None
    }

    def load_dataset(path, *args, **kwargs):
        calls.append(path)
        return hub[path]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_names():
    assert list(registry.DATASETS) == ["helpsteer2", "ultrafeedback", "capybara", "hh-rlhf", "ultrafeedback-h4",
                                       "ultrafeedback-ratings", "shp", "oasst1", "oasst2"]
    assert {spec.layout for spec in registry.DATASETS.values()} == {"likert", "pairs", "hh-rlhf", "ultrafeedback",
                                                                    "shp", "oasst"}
    assert registry.DATASETS["helpsteer2"].hub_id == "nvidia/HelpSteer2"
    assert registry.DATASETS["ultrafeedback"].hub_id == "trl-lib/ultrafeedback_binarized"
    assert registry.DATASETS["capybara"].hub_id == "trl-lib/Capybara-Preferences"
    assert registry.is_registered("helpsteer2") and not registry.is_registered("demo")
    assert not registry.is_registered("rows.jsonl")
    assert registry.listing()[0][0] == "demo (bundled, offline)"
    with pytest.raises(QbcoError, match="unknown dataset"):
        registry.load_registered("nope")


def test_helpsteer2_uses_the_paper_mapping_and_the_validation_split(fake_hub):
    summaries = []
    train, held = registry.load_registered("helpsteer2", summaries=summaries)
    assert fake_hub == ["nvidia/HelpSteer2"]
    # Hand count: rows 1, 2, 4, 6 are written (3 empty, 5 a duplicate); helpfulness >= 4 is thumbs-up.
    assert [(r["completion"], r["label"]) for r in train] == [
        ("Mass attracts mass.", True), ("It is magic.", False), ("2, 3, 5", False), ("Hello!", True)]
    assert all(type(r["label"]) is bool for r in train)
    assert train[0]["source"] == "nvidia/HelpSteer2:train:1"
    assert [(r["completion"], r["label"]) for r in held] == [("Mars.", True), ("The Moon.", False)]
    assert summaries[0].dropped == {"empty response": 1, "duplicate": 1}
    assert summaries[0].scale == [0, 4] and summaries[0].scale_source == "given"


def test_registry_and_binarize_give_the_same_rows(fake_hub, tmp_path):
    """One code path: the registry's rows equal `qbco binarize` on a local copy, with its printed command."""
    train, _ = registry.load_registered("helpsteer2")
    local = tmp_path / "helpsteer2-train.parquet"
    as_dataset(HS2_TRAIN).to_parquet(str(local))
    spec = registry.DATASETS["helpsteer2"]
    assert spec.binarize_command().startswith(f"qbco binarize {local.name} -o helpsteer2.jsonl")
    binarize(local, tmp_path / "hs.jsonl", spec.options())
    rows = [json.loads(line) for line in (tmp_path / "hs.jsonl").read_text().splitlines()]
    strip = lambda rs: [(r["prompt"], r["completion"], r["label"], r["score"]) for r in rs]  # noqa: E731
    assert strip(rows) == strip(train)


def test_helpsteer2_multi_turn_prompts_are_chat_messages_from_the_hub_too(monkeypatch, tmp_path):
    """`--data helpsteer2` splits the earlier turns like `qbco binarize` does on the hub's own file."""
    hub = datasets.DatasetDict(train=as_dataset(HS2_MULTI_TURN), validation=as_dataset(HS2_VALIDATION))
    monkeypatch.setattr(datasets, "load_dataset", lambda path, *a, **k: hub)
    summaries = []
    train, _ = registry.load_registered("helpsteer2", summaries=summaries)
    assert [r["prompt"] for r in train] == [HS2_CAT_MESSAGES] * 2 + ["c#"] * 2 + [HS2_TRIP_MESSAGES] * 2
    assert (summaries[0].prompts, summaries[0].multi_turn_prompts) == (3, 2)
    assert summaries[0].dropped == {"malformed messages": 1}

    local = write_hs2_jsonl_gz(tmp_path / "train.jsonl.gz")
    binarize(local, tmp_path / "hs.jsonl", registry.DATASETS["helpsteer2"].options())
    rows = [json.loads(line) for line in (tmp_path / "hs.jsonl").read_text().splitlines()]
    strip = lambda rs: [(r["prompt"], r["completion"], r["label"], r["score"]) for r in rs]  # noqa: E731
    assert strip(rows) == strip(train)


def test_pairs_are_unpaired(fake_hub):
    train, held = registry.load_registered("ultrafeedback")
    assert held is None
    assert [(r["prompt"], r["completion"], r["label"], r["score"]) for r in train] == [
        ([{"role": "user", "content": "Pick a fruit."}], "An apple.", True, 9),
        ([{"role": "user", "content": "Pick a fruit."}], "A brick.", False, 2),
        ([{"role": "user", "content": "Be kind."}], "Sure.", True, 7),
        ([{"role": "user", "content": "Be kind."}], "No.", False, 1),
    ]


def test_unreachable_hub_is_one_line_with_the_binarize_command(monkeypatch):
    def offline(path, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)\nretry later")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(QbcoError) as err:
        registry.load_registered("capybara")
    text = str(err.value)
    assert "\n" not in text
    assert "'capybara' (trl-lib/Capybara-Preferences)" in text
    assert "qbco binarize capybara-train.parquet -o capybara.jsonl --pairs" in text


def test_offline_for_real(tmp_path):
    """datasets itself, with HF_HUB_OFFLINE=1 and an empty cache, in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    child = (
        "from qbco.common.errors import QbcoError\n"
        "from qbco.data.registry import load_registered\n"
        "try:\n"
        "    load_registered('helpsteer2')\n"
        "except QbcoError as err:\n"
        "    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=120,
                            cwd=Path(__file__).resolve().parent.parent)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 1, result.stdout + result.stderr
    assert "cannot load dataset 'helpsteer2' (nvidia/HelpSteer2)" in lines[0]
    assert "qbco binarize helpsteer2-train.parquet -o helpsteer2.jsonl --score helpfulness --threshold 4 --scale 0-4" in lines[0]


def test_cli_datasets_lists_demo_first():
    from typer.testing import CliRunner

    from qbco.cli.main import app

    result = CliRunner().invoke(app, ["datasets"])
    assert result.exit_code == 0, result.output
    names = [n for n in ("demo", "helpsteer2", "ultrafeedback", "capybara") if n in result.output]
    assert names == ["demo", "helpsteer2", "ultrafeedback", "capybara"]
    assert result.output.index("demo") < result.output.index("helpsteer2") < result.output.index("capybara")
