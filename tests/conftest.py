"""Shared fixtures: tiny randomly initialised llamas built from a config, with a word-level tokenizer.
Nothing here touches the network or needs a GPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _test_cache() -> None:
    """Tests write their caches (reference log-probs) into a fresh folder, not the user's; the converted
    SmolLM2 is linked in from the user's cache when it is there, to convert it only once per machine."""
    import tempfile

    converted = Path(os.environ.get("QBCO_CACHE", Path.home() / ".cache" / "qbco")).expanduser() / "smollm2-135m-instruct"
    test_cache = Path(tempfile.mkdtemp(prefix="qbco-test-cache-"))
    if (converted / "config.json").is_file() and (converted / "model.safetensors").is_file():
        (test_cache / converted.name).symlink_to(converted, target_is_directory=True)
    os.environ["QBCO_CACHE"] = str(test_cache)


_test_cache()
# The tests' models are tiny and overhead-bound: one thread is as fast, and on a 2-core machine shared with
# anything else a second OpenMP thread busy-waits (measured: the suite took 8.5 min with 2 threads under
# load, 1.2 min with 1).
torch.set_num_threads(1)

SPECIALS = ["<pad>", "<unk>", "<eos>"]
BASE_WORDS = ["user", "assistant", "system", ":", "?", ".", ","]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"


def make_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIALS + BASE_WORDS + words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config).float()


def separable_rows(n_prompts: int = 40, seed: int = 0) -> list[dict]:
    """A trivially separable feedback set: thumbs-up completions are 'good answer ...', down 'bad answer ...'."""
    import random

    rng = random.Random(seed)
    rows = []
    for k in range(n_prompts):
        prompt = f"question q{k} ?"
        rows.append({"prompt": prompt, "completion": f"good answer a{rng.randrange(8)} .", "label": True})
        rows.append({"prompt": prompt, "completion": f"bad answer a{rng.randrange(8)} .", "label": False})
        if k % 2:  # imbalanced, as real feedback is: 40% up
            rows.append({"prompt": prompt, "completion": f"bad answer a{rng.randrange(8)} , sorry", "label": False})
    return rows


def words_of(rows: list[dict]) -> list[str]:
    words = []
    for r in rows:
        words += r["prompt"].split() + r["completion"].split()
    return sorted(set(words)) + ["good", "bad", "answer", "sorry"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny llama + tokenizer folder that qbco loads like any local model."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    rows = separable_rows(60)
    tok = make_tokenizer(words_of(rows) + [f"q{k}" for k in range(200)] + [f"a{k}" for k in range(8)])
    model = make_tiny_llama(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def separable_file(tmp_path) -> Path:
    path = tmp_path / "separable.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in separable_rows(40)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished run folder: 4 steps of BCO on the 4-bit tiny llama (for merge and generate tests, which
    only read it)."""
    from qbco.run.config import build_config
    from qbco.train.loop import train

    folder = tmp_path_factory.mktemp("tiny-run")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in separable_rows(40)), encoding="utf-8")
    config = build_config(model=str(tiny_model_dir), data=str(data), output=str(folder / "run"), eval_fraction=0.25,
                          lr=1e-2, beta=0.5, max_steps=4, batch_size=8, max_prompt_length=32, max_completion_length=16)
    return train(config, log=lambda message: None).output



# HelpSteer2 rows as nvidia/HelpSteer2 stores them (train.jsonl.gz; its dataset card): a multi-turn prompt holds
# the earlier turns, each later one opened by a "<extra_id_1>Assistant" or "<extra_id_1>User" line, and the
# response answers the last user turn; the two responses of a prompt are consecutive rows.
HS2_CAT = ("What is a good name for a cat?\n<extra_id_1>Assistant\nWhiskers is a classic choice.\n"
           "<extra_id_1>User\nSomething less common, please.")
HS2_TRIP = ("Plan a day in Lisbon.\n<extra_id_1>Assistant\nMorning: Belem. Afternoon: Alfama.\n<extra_id_1>User\n"
            "Add lunch.\n<extra_id_1>Assistant\nLunch at Time Out Market.\n<extra_id_1>User\nAnd a rainy-day plan?")
HS2_MULTI_TURN = [
    # prompt, response, helpfulness, correctness, coherence, complexity, verbosity
    (HS2_CAT, "How about Marzipan?", 4, 4, 4, 1, 1),
    (HS2_CAT, "Cat.", 1, 1, 3, 0, 0),
    ("c#", "C# is a high-level, object-oriented programming language developed by Microsoft.", 3, 4, 4, 2, 1),
    ("c#", "A musical note.", 3, 2, 4, 1, 0),
    (HS2_TRIP, "Visit the Gulbenkian museum.", 2, 3, 3, 1, 1),
    (HS2_TRIP, "The Oceanarium and the Gulbenkian, then fado in the evening.", 3, 4, 4, 2, 2),
    ("Hi\n<extra_id_1>Assistant\n", "Hello!", 2, 2, 2, 0, 0),  # ends on an assistant marker: no user turn answered
]
HS2_COLUMNS = ["prompt", "response", "helpfulness", "correctness", "coherence", "complexity", "verbosity"]
# The same prompts as chat messages, written out by hand.
HS2_CAT_MESSAGES = [{"role": "user", "content": "What is a good name for a cat?"},
                    {"role": "assistant", "content": "Whiskers is a classic choice."},
                    {"role": "user", "content": "Something less common, please."}]
HS2_TRIP_MESSAGES = [{"role": "user", "content": "Plan a day in Lisbon."},
                     {"role": "assistant", "content": "Morning: Belem. Afternoon: Alfama."},
                     {"role": "user", "content": "Add lunch."},
                     {"role": "assistant", "content": "Lunch at Time Out Market."},
                     {"role": "user", "content": "And a rainy-day plan?"}]


def write_hs2_jsonl_gz(path: Path, rows=HS2_MULTI_TURN) -> Path:
    """The rows as the hub's train.jsonl.gz: one JSON object a line, gzipped."""
    import gzip

    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(dict(zip(HS2_COLUMNS, row))) + "\n")
    return path
