"""qbco merge: the merged folder loads without peft and answers like the trained model, per completion token.

A tiny llama with sharp (large) weights, its adapter trained on the 4-bit base until bf16 rounding loses part of
the update: --dtype auto picks a wider dtype, a forced bf16 fails naming the one that passes, and the gap merge
reports equals one computed here from full logits (plain transformers on OUT against peft + bitsandbytes on the
run). A merge that lost part of the update, or an interrupted one, leaves nothing that looks finished.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer, separable_rows, words_of
from safetensors.torch import load_file
from typer.testing import CliRunner

from qbco.cli.main import app
from qbco.common.errors import QbcoError
from qbco.data.encoding import collate
from qbco.export import merge as merging
from qbco.model.loading import load_base, load_tokenizer
from qbco.model.logprobs import completion_logps
from qbco.run.folder import MERGE_INFO, RunFolder, load_run

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def quiet(message):
    pass


@pytest.fixture(scope="module")
def sharp_run(tmp_path_factory):
    """(run, base folder): weights 40x the usual init make a sharp model, as trained ones are, so rounding moves
    its log-probs; 40 BCO steps at lr 2e-3 on the 4-bit base give an update small against those weights."""
    from qbco.run.config import build_config
    from qbco.train.loop import train

    folder = tmp_path_factory.mktemp("sharp")
    rows = separable_rows(60)
    tokenizer = make_tokenizer(words_of(rows) + [f"q{k}" for k in range(200)] + [f"a{k}" for k in range(8)])
    model = make_tiny_llama(len(tokenizer))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(40)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in separable_rows(40)), encoding="utf-8")
    config = build_config(model=str(folder / "model"), data=str(data), output=str(folder / "run"), eval_fraction=0.25,
                          lr=2e-3, beta=0.5, max_steps=40, epochs=100, batch_size=8, max_prompt_length=32,
                          max_completion_length=16, sft_weight=0.0)  # the paper's BCO: the update this test sized
    return train(config, log=quiet).output, folder / "model"


# ---------------------------------------------------------------- the independent reference


def trained_by_hand(run, base_dir):
    """The run's model built here: bitsandbytes NF4 as qbco trains it, fp32 compute, peft adapter on top."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8)
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=torch.float32,
                                                device_map={"": "cpu"})
    for module in base.modules():  # the CPU repack trap (docs/pitfalls.md, 13)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return PeftModel.from_pretrained(base, run / "adapter").eval()


@torch.no_grad()
def full_logits_logps(model, rows):
    """log p of each completion token from the full [T, vocab] logits, log_softmax in float32."""
    out = []
    for row in rows:
        ids = torch.tensor([row.prompt_ids + row.completion_ids])
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
        p = len(row.prompt_ids)
        out.append(logp[torch.arange(p - 1, ids.shape[1] - 1), ids[0, p:]])
    return out


def independent_gap(out, run, base_dir):
    """Mean |log p(OUT) - log p(trained)| per completion token of the rows merge checks on."""
    from transformers import AutoModelForCausalLM

    config = RunFolder(run).finished_config()
    rows, _ = merging.held_out_rows(config, load_tokenizer(str(run / "adapter")), merging.CHECK_ROWS)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # as a user loads it: the saved dtype
    a, b = full_logits_logps(plain, rows), full_logits_logps(trained_by_hand(run, base_dir), rows)
    return float(torch.cat([(x - y).abs() for x, y in zip(a, b)]).mean())


def update_lost(run, base_dir, dtype):
    """||dtype(W + s B A) - (W + s B A)|| / ||s B A|| over every adapted layer: the share of the adapter's update
    that storing the merged weight in `dtype` gets wrong (W: the dequantized NF4 weight)."""
    import bitsandbytes.functional as bnbf

    model = trained_by_hand(run, base_dir)
    error = update = 0.0
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            layer = module.base_layer
            w = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
            merged = w + delta
            error += float((merged.to(dtype).float() - merged).norm() ** 2)
            update += float(delta.norm() ** 2)
    return (error / update) ** 0.5


# ---------------------------------------------------------------- fidelity and dtypes


def test_bf16_rounding_loses_part_of_this_adapter(sharp_run, tmp_path):
    """The premise of the other tests, shown: bf16 gets a sixth of the update wrong and moves the model past the
    limit; written anyway (a large --max-gap), the gap merge reports is the one computed here."""
    run, base_dir = sharp_run
    assert update_lost(run, base_dir, torch.bfloat16) > 0.1
    assert update_lost(run, base_dir, torch.float32) < 1e-6
    result = merging.merge(run, tmp_path / "bf16", dtype="bf16", max_gap=10, device=CPU, log=quiet)
    assert result.dtype == "bf16" and [t.dtype for t in result.tried] == ["bf16"]
    assert result.gap.mean > merging.DEFAULT_MAX_GAP
    assert result.gap.mean == pytest.approx(independent_gap(result.output, run, base_dir), rel=1e-3, abs=1e-5)


def test_auto_picks_a_wider_dtype_and_passes(sharp_run, tmp_path):
    run, base_dir = sharp_run
    out = tmp_path / "merged"
    cli = CliRunner().invoke(app, ["merge", str(run), "-o", str(out)], env={"COLUMNS": "250"})
    assert cli.exit_code == 0, cli.output
    info = json.loads((out / MERGE_INFO).read_text())
    tried = {t["dtype"]: t["mean"] for t in info["tried"]}
    assert list(tried)[0] == "bf16" and tried["bf16"] > merging.DEFAULT_MAX_GAP  # measured and refused
    assert info["dtype"] in ("fp16", "fp32") and info["gap"]["mean"] <= merging.DEFAULT_MAX_GAP
    assert json.loads((out / "config.json").read_text())["dtype"] == {"fp16": "float16", "fp32": "float32"}[info["dtype"]]
    assert info["gap"]["mean"] == pytest.approx(independent_gap(out, run, base_dir), rel=1e-3, abs=1e-5)
    # The summary and the model card name the dtype and the gap.
    assert f"{info['dtype']} (" in cli.output and f"{info['gap']['mean']:.3g} nats/token" in cli.output
    card = (out / "README.md").read_text()
    assert f"| saved in | {info['dtype']} |" in card
    assert f"| gap to the trained model | {info['gap']['mean']:.3g} nats per completion token (limit 0.05) |" in card


def test_forced_bf16_fails_and_names_the_dtype_that_passes(sharp_run, tmp_path):
    run, _ = sharp_run
    cli = CliRunner().invoke(app, ["merge", str(run), "-o", str(tmp_path / "merged"), "--dtype", "bf16"])
    assert cli.exit_code == 2
    line = cli.output.strip().splitlines()[-1]  # the error is one line, after merge's progress lines
    assert line.startswith("error: --dtype bf16 moves the merged model")
    assert "fp16 passes" in line and "use --dtype fp16 or --dtype auto" in line
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary folder


def test_merged_folder_loads_without_peft_and_answers_like_the_trained_model(tiny_run, tmp_path, tiny_model_dir):
    out = tmp_path / "merged"
    result = merging.merge(tiny_run, out, dtype="fp32", device=CPU, log=quiet)
    assert result.dtype == "fp32" and result.gap.mean < 1e-5 and result.gap.rows > 0

    names = {p.name for p in out.iterdir()}
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "README.md", MERGE_INFO):
        assert name in names, name
    assert "chat_template.jinja" in names or "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())  # no temporary folder left
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    weights = load_file(out / "model.safetensors")
    assert not any("lora" in key or "base_layer" in key for key in weights)
    assert result.size_bytes == (out / "model.safetensors").stat().st_size

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(plain).__name__ == "LlamaForCausalLM"
    # The tied head is still the embedding matrix (LoRA never touches either: docs/pitfalls.md, 12).
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight

    card = (out / "README.md").read_text()
    eval_line = json.loads((tiny_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert eval_line["split"] == "eval"
    assert str(tiny_model_dir) in card and "data.jsonl" in card and "lora_r: 16" in card
    assert f"| eval_reward_accuracy | {eval_line['eval_reward_accuracy']:.4g} |" in card


def test_a_run_that_computed_in_bf16_is_merged_exactly_in_fp32(tiny_model_dir, tmp_path):
    """As on a GPU: the run loaded its base in bf16, so its NF4 codes and scales came from bf16 weights. The
    reference keeps those codes and computes in fp32; the fp32 merge reproduces it, while the run computing
    in bf16 (load_run) differs from it by bf16's rounding of activations."""
    from qbco.run.config import build_config
    from qbco.train.loop import train

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in separable_rows(40)), encoding="utf-8")
    config = build_config(model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "run"), eval_fraction=0.25,
                          lr=1e-2, beta=0.5, max_steps=2, batch_size=8, max_prompt_length=32, max_completion_length=16,
                          dtype="bf16")
    run = train(config, log=quiet).output
    trained = merging.load_trained(run, RunFolder(run).finished_config(), CPU)
    layer = trained.get_base_model().model.layers[0].mlp.down_proj.base_layer
    assert layer.compute_dtype == torch.float32 and layer.weight.quant_state.dtype == torch.float32
    as_trained = load_base(str(tiny_model_dir), True, torch.bfloat16, CPU).model.layers[0].mlp.down_proj
    assert torch.equal(layer.weight.data, as_trained.weight.data)  # the NF4 codes training used
    assert all(p.dtype in (torch.float32, torch.uint8) for p in trained.parameters())
    result = merging.merge(run, tmp_path / "merged", dtype="fp32", device=CPU, log=quiet)
    assert result.gap.mean < 1e-5
    _, tokenizer, in_bf16 = load_run(run, CPU)
    rows, _ = merging.held_out_rows(RunFolder(run).finished_config(), tokenizer, merging.CHECK_ROWS)
    reference = merging.completion_token_logps(trained, rows, CPU)
    assert merging.gap("", merging.completion_token_logps(in_bf16, rows, CPU), reference).mean > 10 * result.gap.mean


def test_a_run_on_a_float_base_merges_into_that_base(tiny_model_dir, tmp_path):
    """--no-4bit: nothing to dequantize; the adapter goes into the checkpoint's weights, exactly in fp32."""
    from qbco.run.config import build_config
    from qbco.train.loop import train

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in separable_rows(40)), encoding="utf-8")
    config = build_config(model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "run"), eval_fraction=0.25,
                          lr=1e-2, beta=0.5, max_steps=2, batch_size=8, max_prompt_length=32, max_completion_length=16,
                          load_in_4bit=False)
    run = train(config, log=quiet).output
    result = merging.merge(run, tmp_path / "merged", dtype="fp32", device=CPU, log=quiet)
    assert result.gap.mean < 1e-5
    assert json.loads((result.output / MERGE_INFO).read_text())["base"] == "float"


def test_completion_token_logps_sum_to_completion_logps(tiny_run):
    """The check's log-probs (the model's own forward) and training's (decoder + chunked head) agree."""
    config, tokenizer, trained = load_run(tiny_run, CPU)
    rows, _ = merging.held_out_rows(config, tokenizer, 5)
    per_token = merging.completion_token_logps(trained, rows, CPU)
    batch = collate(rows, list(range(len(rows))), tokenizer.pad_token_id)
    with torch.no_grad():
        sums = completion_logps(trained, batch.input_ids, batch.attention_mask, batch.completion_mask)
    assert [t.numel() for t in per_token] == [len(r.completion_ids) for r in rows]
    assert torch.stack([t.sum() for t in per_token]) == pytest.approx(sums, abs=1e-4)


def test_a_merge_that_lost_part_of_the_update_fails_in_every_dtype(tiny_run, tmp_path, monkeypatch):
    real = merging.merge_exact

    def broken(trained, run_dir):
        merged = real(trained, run_dir)
        with torch.no_grad():
            merged.model.layers[0].mlp.down_proj.weight.mul_(0.5)
        return merged

    monkeypatch.setattr(merging, "merge_exact", broken)
    with pytest.raises(QbcoError, match=r"no dtype keeps the merged model within 0.05 .*bf16 .*fp16 .*fp32 "):
        merging.merge(tiny_run, tmp_path / "merged", device=CPU, log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_merge_leaves_no_output(tiny_run, tmp_path, monkeypatch):
    real_save = merging.save_merged

    def save_then_die(model, tokenizer, folder, **kwargs):
        model.save_pretrained(folder)  # halfway: weights written, tokenizer not
        raise KeyboardInterrupt

    monkeypatch.setattr(merging, "save_merged", save_then_die)
    out = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt):
        merging.merge(tiny_run, out, dtype="fp32", device=CPU, log=quiet)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary folder

    # With --overwrite, the previous folder stays whole until the new one is complete.
    monkeypatch.setattr(merging, "save_merged", real_save)
    merging.merge(tiny_run, out, dtype="fp32", device=CPU, log=quiet)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(merging, "save_merged", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        merging.merge(tiny_run, out, dtype="fp32", device=CPU, overwrite=True, log=quiet)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_cli_refuses_to_overwrite_without_the_flag(tiny_run, tmp_path):
    out = tmp_path / "merged"
    runner = CliRunner()
    first = runner.invoke(app, ["merge", str(tiny_run), "-o", str(out), "--device", "cpu"])
    assert first.exit_code == 0, first.output
    assert "passed" in first.output
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = runner.invoke(app, ["merge", str(tiny_run), "-o", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    replaced = runner.invoke(app, ["merge", str(tiny_run), "-o", str(out), "--overwrite", "--dtype", "fp32"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / MERGE_INFO).read_text())["dtype"] == "fp32"


def test_refusals_name_the_fix(tiny_run, tmp_path):
    with pytest.raises(QbcoError, match="--dtype auto"):
        merging.merge(tiny_run, tmp_path / "m", dtype="nf4", log=quiet)
    with pytest.raises(QbcoError, match="--dtype must be auto, bf16, fp16, fp32"):
        merging.merge(tiny_run, tmp_path / "m", dtype="float8", log=quiet)
    with pytest.raises(QbcoError, match="--max-gap must be > 0"):
        merging.merge(tiny_run, tmp_path / "m", max_gap=0, log=quiet)
    with pytest.raises(QbcoError, match="--device must be cpu or cuda"):
        merging.merge(tiny_run, tmp_path / "m", device="meta", log=quiet)
    if not torch.cuda.is_available():
        with pytest.raises(QbcoError, match="use --device cpu"):
            merging.merge(tiny_run, tmp_path / "m", device="cuda", log=quiet)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(QbcoError, match="not a model folder"):
        merging.merge(tiny_run, tmp_path / "notes", overwrite=True, log=quiet)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    with pytest.raises(QbcoError, match="the run itself"):
        merging.merge(tiny_run, tiny_run, overwrite=True, log=quiet)
    with pytest.raises(QbcoError, match="not a finished qbco run"):
        merging.merge(tmp_path, tmp_path / "m", log=quiet)


def test_an_overflow_never_passes():
    """fp16 can overflow where bf16 cannot: a NaN gap is a miss, and the refusal names a dtype that passed."""
    nan, ok = merging.Gap("fp16", float("nan"), float("nan"), 4, 20), merging.Gap("fp32", 1e-6, 1e-5, 4, 20)
    assert not merging.passes(nan, 0.05) and merging.passes(ok, 0.05)
    assert "fp32 passes" in str(merging._miss("fp16", [nan, ok], 0.05))
    assert "no dtype keeps" in str(merging._miss("auto", [nan], 0.05))


def test_adapter_on_a_tied_head_is_refused(tmp_path):
    """Merged into a tied lm_head, a LoRA update would change the input embeddings too (docs/pitfalls.md, 12)."""
    from types import SimpleNamespace

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"target_modules": ["q_proj", "lm_head"]}))
    with pytest.raises(QbcoError, match="lm_head"):
        merging.check_adapter(tmp_path, SimpleNamespace(tie_word_embeddings=True))
    merging.check_adapter(tmp_path, SimpleNamespace(tie_word_embeddings=False))  # untied: merging is sound


def test_memory_estimate_counts_what_each_device_holds():
    """P parameters: the fp32 merged model is 4P bytes and a bf16 / fp16 copy 2P; on CUDA the fp32 model waits
    in RAM while OUT is checked on the GPU."""
    from transformers import LlamaConfig

    from qbco.model.memory import NF4_BYTES, estimate
    from qbco.run.config import TrainConfig

    hf = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    config = TrainConfig()
    counts = estimate(hf, config, 4)
    p, linear = counts.base_params, counts.linear_params
    trained = linear * NF4_BYTES + (p - linear) * 4 + counts.lora_params * 4
    auto_cpu = merging.merge_memory(hf, config, merging.AUTO_ORDER, CPU)
    assert auto_cpu.trained_bytes == pytest.approx(trained)
    assert auto_cpu.ram_peak == pytest.approx(6 * p) and auto_cpu.device_peak == auto_cpu.ram_peak
    assert merging.merge_memory(hf, config, ("fp32",), CPU).ram_peak == pytest.approx(4 * p)
    cuda = merging.merge_memory(hf, config, merging.AUTO_ORDER, torch.device("cuda"))
    assert cuda.device_peak == pytest.approx(4 * p) and cuda.ram_peak == pytest.approx(6 * p)
    assert "--device cpu" in cuda.line() and "RAM" in auto_cpu.line()


def test_dequantized_base_is_closer_to_the_trained_model_than_the_original(tiny_run):
    """docs/merge.md's base table (scripts/measure_merge.py): the adapter merged into the dequantized NF4 weights
    reproduces the trained model up to float rounding; merged into the original weights it inherits the NF4 gap."""
    spec = importlib.util.spec_from_file_location("measure_merge", ROOT / "scripts" / "measure_merge.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    m = script.bases(script.Measure(tiny_run, 8, CPU), ["fp32"])["fp32"]
    assert m["dequantized_merged_vs_trained"]["mean"] < 1e-5
    assert m["original_base_vs_4bit_base_fp32"]["mean"] > 1e-3
    assert m["original_merged_vs_trained"]["mean"] > 100 * m["dequantized_merged_vs_trained"]["mean"]


# ---------------------------------------------------------------- the check against the base (issue 25)


def _unapplied_adapter(monkeypatch):
    """peft loads the adapter and silently applies nothing (a wrong target name, a peft change): every lora_B
    is zero after loading, on both sides of the check."""
    from peft import PeftModel

    real = PeftModel.from_pretrained.__func__

    def loaded_but_not_applied(cls, *args, **kwargs):
        model = real(cls, *args, **kwargs)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.zero_()
        return model

    monkeypatch.setattr(PeftModel, "from_pretrained", classmethod(loaded_but_not_applied))


def test_a_merge_whose_adapter_was_not_applied_is_refused(tiny_run, tmp_path, monkeypatch):
    """Both sides of the fidelity check equal the base: their gap is 0, so the gap alone passes this merge.
    The trained model's own gap to the base (0 here) refuses it."""
    _unapplied_adapter(monkeypatch)
    with pytest.raises(QbcoError, match=r"answers like its base: 0 nats.*adapter .* was not applied"):
        merging.merge(tiny_run, tmp_path / "merged", device=CPU, log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_a_merge_that_equals_the_base_fails_under_any_limit(tiny_run, tmp_path, monkeypatch):
    """A merge that lost the whole training (OUT is the dequantized base) is refused even under a loose
    --max-gap: it must be closer to the trained model than the training moved it from the base."""
    def base_only(trained, run_dir):
        base = trained.unload()
        return base.dequantize(dtype=torch.float32) if getattr(base, "hf_quantizer", None) is not None else base

    monkeypatch.setattr(merging, "merge_exact", base_only)
    with pytest.raises(QbcoError, match=r"base"):
        merging.merge(tiny_run, tmp_path / "merged", dtype="fp32", max_gap=10, device=CPU, log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_the_check_names_its_rows_and_the_gap_to_the_base(tiny_run, tmp_path):
    lines = []
    result = merging.merge(tiny_run, tmp_path / "merged", dtype="fp32", device=CPU, log=lines.append)
    info = json.loads((tmp_path / "merged" / MERGE_INFO).read_text())
    assert re.match(r"\d+ held-out rows of .*data.jsonl$", info["check_rows"]) and info["check_rows"] == result.check_rows
    assert info["trained_vs_base"]["mean"] == pytest.approx(result.trained_vs_base.mean) and result.trained_vs_base.mean > 0
    assert info["gap"]["worst_row"] >= info["gap"]["mean"]
    card = (tmp_path / "merged" / "README.md").read_text()
    assert result.check_rows in card and "from its base" in card
    assert any("from its base" in line for line in lines)


def test_the_worst_rows_are_limited_too():
    """A merge whose mean is within the limit but one row is far off fails (rows: per-row mean gap)."""
    even = merging.Gap("fp16", mean=0.01, max=0.05, rows=4, tokens=40, worst_row=0.02)
    one_row_off = merging.Gap("fp16", mean=0.04, max=0.9, rows=4, tokens=40, worst_row=0.5)
    base = merging.Gap("base", mean=1.0, max=3.0, rows=4, tokens=40, worst_row=1.5)
    assert merging.passes(even, 0.05, base) and not merging.passes(one_row_off, 0.05, base)
    assert not merging.passes(merging.Gap("fp32", 0.6, 1.0, 4, 40, 0.7), 10, base)  # kept less than half the training
