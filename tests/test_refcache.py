"""The reference cache is never stale: its key changes with the base (a local folder's files, a hub model's
revision), 4-bit loading, the dtype and the versions of torch, transformers and bitsandbytes; and a pass
written in parts continues where it stopped, giving the tensor a pass from the start gives."""

import json
import shutil

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer, separable_rows, words_of

from qbco.data.encoding import Encoded
from qbco.model import refcache
from qbco.model.logprobs import reference_logps
from qbco.run.config import build_config
from qbco.train.prepare import prepare_run

CPU = torch.device("cpu")
ROWS = [Encoded([3, 4, 5], [6, 7], True, False, False), Encoded([3, 8], [9, 10, 11], False, False, False)]


def key(base, load_in_4bit=True, dtype=torch.float32):
    return refcache.cache_key(str(base), load_in_4bit, dtype, CPU, ROWS)


def test_another_base_is_another_key(tmp_path, tiny_model_dir):
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    assert key(tiny_model_dir) == key(tiny_model_dir)  # stable: the cache is reused when nothing changed
    assert key(other) != key(tiny_model_dir)
    before = key(other)
    make_tiny_llama(int(json.loads((other / "config.json").read_text())["vocab_size"]), seed=7).save_pretrained(other)
    assert key(other) != before  # the same folder with other weights
    assert key("Org/model-a") != key("Org/model-b")


def test_4bit_on_and_off_are_other_keys(tiny_model_dir):
    assert key(tiny_model_dir, load_in_4bit=True) != key(tiny_model_dir, load_in_4bit=False)


def test_the_dtype_is_in_the_key(tiny_model_dir):
    keys = {key(tiny_model_dir, dtype=d) for d in (torch.float32, torch.bfloat16, torch.float16)}
    assert len(keys) == 3


def test_a_library_version_is_in_the_key(tiny_model_dir, monkeypatch):
    from importlib import metadata

    before = key(tiny_model_dir)
    real = metadata.version
    for library in ("torch", "transformers", "bitsandbytes"):
        monkeypatch.setattr(metadata, "version", lambda name, lib=library: "0.0-other" if name == lib else real(name))
        assert key(tiny_model_dir) != before, library
    monkeypatch.setattr(metadata, "version", real)
    assert key(tiny_model_dir) == before


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A hub cache holding one model at two commits, read offline the way transformers reads a real one
    (models--ORG--NAME/snapshots/COMMIT/, refs/main naming the commit a plain load uses)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    repo = cache / "models--qbco-test--tiny"
    rows = separable_rows(12)
    tok = make_tokenizer(words_of(rows) + [f"q{k}" for k in range(12)] + [f"a{k}" for k in range(8)])
    commits = ["1" * 40, "2" * 40]
    for seed, commit in enumerate(commits):
        make_tiny_llama(len(tok), seed=seed + 1).save_pretrained(repo / "snapshots" / commit)
        tok.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()

    def point_main_at(commit):
        (repo / "refs" / "main").write_text(commit)

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return commits, point_main_at, data


def test_a_hub_models_revision_is_in_the_key(tmp_path, hub_cache):
    """The hub model moves to a new commit: the next run computes its reference afresh, not the old commit's."""
    commits, point_main_at, data = hub_cache
    point_main_at(commits[0])
    old_key = key("qbco-test/tiny")
    settings = dict(model="qbco-test/tiny", data=str(data), eval_fraction=0.25, max_steps=1, batch_size=4,
                    max_prompt_length=32, max_completion_length=16, load_in_4bit=False)
    first = prepare_run(build_config(**settings, output=str(tmp_path / "a")), log=lambda m: None)
    point_main_at(commits[1])
    second = prepare_run(build_config(**settings, output=str(tmp_path / "b")), log=lambda m: None)
    fresh = reference_logps(second.model, second.train_rows, 4, second.tokenizer.pad_token_id, CPU, None)
    assert torch.equal(second.ref_train, fresh)  # the new commit's log-probs, computed without the cache
    assert not torch.allclose(second.ref_train, first.ref_train)  # and they are not the old commit's
    assert key("qbco-test/tiny") != old_key and refcache.hub_revision("qbco-test/tiny") == commits[1]


def test_an_interrupted_pass_continues_from_its_parts(monkeypatch, tmp_path):
    """Ctrl-C after three batches: those are written as a part; the rerun computes only the other batches,
    and the tensor equals one computed in one go."""
    monkeypatch.setenv("QBCO_CACHE", str(tmp_path / "cache"))
    batches = [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    truth = torch.arange(9, dtype=torch.float32) * -1.5
    calls = []

    def compute(rows, stop_at=None):
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        calls.append(rows)
        return truth[rows]

    with pytest.raises(refcache.ReferenceInterrupted) as cut:
        refcache.cached("k", 9, batches, lambda rows: compute(rows, stop_at=3))
    assert (cut.value.done, cut.value.total) == (6, 9)
    (part,) = (tmp_path / "cache" / "reference" / "k.parts").glob("part-*.safetensors")
    calls.clear()
    value = refcache.cached("k", 9, batches, compute)
    assert calls == [[6, 7], [8]] and torch.equal(value, truth)
    assert not part.parent.exists() and (tmp_path / "cache" / "reference" / "k.safetensors").is_file()
    calls.clear()
    assert torch.equal(refcache.cached("k", 9, batches, compute), truth) and calls == []  # the whole tensor is cached now
