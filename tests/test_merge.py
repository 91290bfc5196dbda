"""qbco merge on a tiny random llama trained a few steps on a 4-bit base: the merged folder loads without
peft and answers like the trained model, the dequantized base is measured closer to the trained model than
the original one (docs/pitfalls.md, 7), and an interrupted or failed merge leaves nothing that looks finished."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from qbco import merge as merging
from qbco.cli import app
from qbco.data import collate
from qbco.errors import QbcoError
from qbco.logprobs import completion_logps
from qbco.models import load_run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


def quiet(message):
    pass


def test_merged_folder_loads_without_peft_and_answers_like_the_trained_model(run_dir, tmp_path, tiny_model_dir):
    out = tmp_path / "merged"
    result = merging.merge(run_dir, out, base="dequantized", dtype="fp32", device=CPU, log=quiet)
    check = result.verification
    assert check.ok and check.max_abs < 1e-4
    assert check.adapter_effect > 100 * check.max_abs  # a dropped adapter would fail the check by far

    names = {p.name for p in out.iterdir()}
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "README.md", merging.MERGE_INFO):
        assert name in names, name
    assert "chat_template.jinja" in names or "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())  # no temporary folder left
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    weights = load_file(out / "model.safetensors")
    assert not any("lora" in key or "base_layer" in key for key in weights)

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(plain).__name__ == "LlamaForCausalLM"
    # The tied head is still the embedding matrix (LoRA never touches either: docs/pitfalls.md, 12).
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight

    # Against the trained model itself, 4-bit base + adapter as load_run gives it: same logits.
    config, tokenizer, trained = load_run(run_dir, CPU)
    rows, _ = merging.held_out_rows(config, tokenizer, 6)
    gap_max, gap_mean, _ = merging.logit_gap(merging.row_logits(plain, rows, CPU), merging.row_logits(trained, rows, CPU))
    assert gap_max < 1e-4, (gap_max, gap_mean)

    card = (out / "README.md").read_text()
    eval_line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert eval_line["split"] == "eval"
    assert str(tiny_model_dir) in card and "data.jsonl" in card and "lora_r: 16" in card
    assert f"| eval_reward_accuracy | {eval_line['eval_reward_accuracy']:.4g} |" in card
    assert "merged into | dequantized weights, fp32" in card


def test_per_token_logps_are_completion_logps_without_the_sum(run_dir):
    """The merge figures use the same decoder, head and gather - logsumexp as training's log-probs."""
    config, tokenizer, trained = load_run(run_dir, CPU)
    rows, _ = merging.held_out_rows(config, tokenizer, 5)
    per_token = merging.per_token_logps(trained, rows, CPU)
    batch = collate(rows, list(range(len(rows))), tokenizer.pad_token_id)
    with torch.no_grad():
        sums = completion_logps(trained, batch.input_ids, batch.attention_mask, batch.completion_mask)
    assert [t.numel() for t in per_token] == [len(r.completion_ids) for r in rows]
    assert torch.stack([t.sum() for t in per_token]) == pytest.approx(sums, abs=1e-4)


def test_dequantized_base_is_closer_to_the_trained_model_than_the_original(run_dir):
    """Measured, per completion token: the adapter merged into the dequantized NF4 weights reproduces the
    4-bit + adapter model up to float rounding; merged into the original weights it inherits the NF4 gap."""
    m = merging.measure_bases(run_dir, dtype="fp32", device=CPU)
    deq, orig = m["dequantized"], m["original"]
    assert m["rows"] > 0 and m["tokens"] > 0
    assert deq["base_vs_4bit_base_mean"] < 1e-5  # the dequantized base *is* the 4-bit base
    assert deq["merged_vs_trained_mean"] < 1e-5
    assert orig["base_vs_4bit_base_mean"] > 1e-3
    assert orig["merged_vs_trained_mean"] > 100 * deq["merged_vs_trained_mean"]
    assert merging.DEFAULT_BASE == "dequantized"


def test_cli_merge_bf16_verifies_and_refuses_to_overwrite(run_dir, tmp_path):
    out = tmp_path / "merged"
    runner = CliRunner()
    first = runner.invoke(app, ["merge", str(run_dir), "-o", str(out)])
    assert first.exit_code == 0, first.output
    assert "passed" in first.output and "dequantized" in first.output
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = runner.invoke(app, ["merge", str(run_dir), "-o", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    replaced = runner.invoke(app, ["merge", str(run_dir), "-o", str(out), "--overwrite", "--no-verify", "--base", "original"])
    assert replaced.exit_code == 0, replaced.output
    assert "skipped" in replaced.output
    assert json.loads((out / merging.MERGE_INFO).read_text())["base"] == "original"


def test_interrupted_merge_leaves_no_output(run_dir, tmp_path, monkeypatch):
    real_save = merging.save_merged

    def save_then_die(model, tokenizer, folder, **kwargs):
        model.save_pretrained(folder)  # halfway: weights written, tokenizer not
        raise KeyboardInterrupt

    monkeypatch.setattr(merging, "save_merged", save_then_die)
    out = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt):
        merging.merge(run_dir, out, dtype="fp32", device=CPU, log=quiet)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary folder

    # With --overwrite, the previous folder stays whole until the new one is complete.
    monkeypatch.setattr(merging, "save_merged", real_save)
    merging.merge(run_dir, out, dtype="fp32", device=CPU, verify_output=False, log=quiet)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(merging, "save_merged", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        merging.merge(run_dir, out, dtype="fp32", device=CPU, overwrite=True, log=quiet)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_failed_verification_writes_nothing(run_dir, tmp_path, monkeypatch):
    real_merge = merging.merge_adapter

    def broken_merge(peft_model):  # a merge that lost part of the update
        merged = real_merge(peft_model)
        with torch.no_grad():
            merged.model.layers[0].mlp.down_proj.weight.mul_(0.5)
        return merged

    monkeypatch.setattr(merging, "merge_adapter", broken_merge)
    out = tmp_path / "merged"
    with pytest.raises(QbcoError, match="verification failed"):
        merging.merge(run_dir, out, dtype="fp32", device=CPU, log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_refusals_name_the_fix(run_dir, tmp_path):
    with pytest.raises(QbcoError, match="--dtype bf16"):
        merging.merge(run_dir, tmp_path / "m", dtype="nf4", log=quiet)
    with pytest.raises(QbcoError, match="--base must be one of"):
        merging.merge(run_dir, tmp_path / "m", base="float", log=quiet)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(QbcoError, match="not a model folder"):
        merging.merge(run_dir, tmp_path / "notes", overwrite=True, log=quiet)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    with pytest.raises(QbcoError, match="the run itself"):
        merging.merge(run_dir, run_dir, overwrite=True, log=quiet)
    with pytest.raises(QbcoError, match="not a finished qbco run"):
        merging.merge(tmp_path, tmp_path / "m", log=quiet)


def test_adapter_on_a_tied_head_is_refused(tmp_path):
    """Merged into a tied lm_head, a LoRA update would change the input embeddings too (docs/pitfalls.md, 12)."""
    from types import SimpleNamespace

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"target_modules": ["q_proj", "lm_head"]}))
    with pytest.raises(QbcoError, match="lm_head"):
        merging.check_adapter(tmp_path, SimpleNamespace(tie_word_embeddings=True))
    merging.check_adapter(tmp_path, SimpleNamespace(tie_word_embeddings=False))  # untied: merging is sound
