"""qbco merge --gguf: one GGUF file that transformers' own GGUF loader reads back as the trained model, within the
type's limit; the gap merge reports equals one computed here (full logits of the file read back against peft +
bitsandbytes on the run); a file with Llama's q/k rows left in Hugging Face's order (not as llama.cpp expects) is
refused and nothing is kept; other architectures are refused in one line."""

import json

import pytest
import torch
from conftest import separable_rows
from typer.testing import CliRunner

from qbco.cli.main import app
from qbco.common.errors import QbcoError
from qbco.export import gguf as ggufx
from qbco.export import merge as merging
from qbco.model.loading import load_tokenizer
from qbco.run.folder import RunFolder

CPU = torch.device("cpu")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def quiet(message):
    pass


def bpe_tokenizer(texts):
    """A byte-level BPE tokenizer trained on the rows (the kind SmolLM2, Qwen2 and Llama 3 have), ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def tiny(kind: str, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0,
                  eos_token_id=2, bos_token_id=1)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).float()
    return LlamaForCausalLM(LlamaConfig(**common)).float()


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A finished 4-step BCO run of a tiny llama with a byte-level BPE tokenizer on the 4-bit base."""
    from qbco.run.config import build_config
    from qbco.train.loop import train

    folder = tmp_path_factory.mktemp("gguf-run")
    rows = separable_rows(40)
    tok = bpe_tokenizer([r["prompt"] + " " + r["completion"] for r in rows])
    model = tiny("llama", len(tok))
    with torch.no_grad():  # sharper than the default init, as trained weights are: rounding shows in log-probs
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = build_config(model=str(folder / "model"), data=str(data), output=str(folder / "run"), eval_fraction=0.25,
                          lr=1e-2, beta=0.5, max_steps=4, batch_size=8, max_prompt_length=48, max_completion_length=24)
    return train(config, log=quiet).output, folder / "model"


@torch.no_grad()
def full_logits_logps(model, rows):
    out = []
    for row in rows:
        ids = torch.tensor([row.prompt_ids + row.completion_ids])
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
        p = len(row.prompt_ids)
        out.append(logp[torch.arange(p - 1, ids.shape[1] - 1), ids[0, p:]])
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_written_file_reads_back_as_the_same_model(tmp_path, kind):
    tok = bpe_tokenizer([r["prompt"] + " " + r["completion"] for r in separable_rows(20)])
    model = tiny(kind, len(tok)).eval()
    if kind == "qwen2":
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.bias.normal_()  # Qwen2's attention biases go into the file too
    ggufx.write_gguf(model, tok, tmp_path / "m.gguf", "f16", "m")
    back = ggufx.read_back(tmp_path, "m.gguf", CPU)
    assert type(back).__name__ == type(model).__name__
    ids = torch.tensor([tok.encode("question q3 ? good answer a1 .")])
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, back(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-2  # f16 rounding of weights of this size


def test_merge_gguf_q8_0_through_the_command_line(bpe_run, tmp_path):
    run, base = bpe_run
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", str(run), "-o", str(out), "--gguf", "q8_0", "--device", "cpu"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    (file,) = out.glob("*.gguf")
    assert file.name == "out-q8_0.gguf" and (out / "Modelfile").is_file() and (out / "README.md").is_file()
    assert f"FROM ./{file.name}" in (out / "Modelfile").read_text() and 'PARAMETER stop "<|im_end|>"' in (out / "Modelfile").read_text()
    assert "q8_0" in result.output and "nats per token" in result.output

    # The file's metadata: the tokenizer and the chat template are in it; 2-D weights are Q8_0.
    from gguf import GGUFReader

    reader = GGUFReader(file)
    assert reader.fields["tokenizer.chat_template"].contents() == CHATML
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} == {"Q8_0"}


def test_the_gap_merge_reports_equals_one_computed_here(bpe_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    run, base = bpe_run
    result = ggufx.merge_gguf(run, tmp_path / "out", "q8_0", device=CPU, log=quiet)
    assert 0 < result.gap.mean < result.max_gap and result.tokenizer_rows[0] == result.tokenizer_rows[1] > 0

    config = RunFolder(run).finished_config()
    rows, _ = merging.held_out_rows(config, load_tokenizer(str(run / "adapter")), ggufx.CHECK_ROWS)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8)
    four = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=torch.float32, device_map={"": "cpu"})
    for module in four.modules():  # the CPU repack trap (docs/pitfalls.md, 13)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    trained = PeftModel.from_pretrained(four, run / "adapter").eval()
    from_file = AutoModelForCausalLM.from_pretrained(result.output, gguf_file=result.file.name, dtype=torch.float32).eval()
    a, b = full_logits_logps(from_file, rows), full_logits_logps(trained, rows)
    assert result.gap.mean == pytest.approx(float(torch.cat([(x - y).abs() for x, y in zip(a, b)]).mean()), rel=1e-3, abs=1e-5)


def test_a_file_with_q_k_rows_not_permuted_is_refused_and_nothing_kept(bpe_run, tmp_path):
    run, _ = bpe_run
    out = tmp_path / "wrong"
    with pytest.raises(QbcoError, match=r"the f16 GGUF file fails its check on 24 held-out rows of .*: f16: mean .* nats "
                                        r"per token over the limit 0.05; nothing was written"):
        ggufx.merge_gguf(run, out, "f16", device=CPU, log=quiet, permute=False)
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_a_gguf_of_a_run_whose_adapter_was_not_applied_is_refused(bpe_run, tmp_path, monkeypatch):
    """The safetensors merge's base rule holds for GGUF too: a trained model that answers like its base (every
    lora_B zero after loading) is refused before anything is written, as test_merge shows for safetensors."""
    from test_merge import _unapplied_adapter

    run, _ = bpe_run
    _unapplied_adapter(monkeypatch)
    with pytest.raises(QbcoError, match=r"answers like its base: 0 nats.*adapter .* was not applied"):
        ggufx.merge_gguf(run, tmp_path / "out", "f16", device=CPU, log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_a_gguf_that_equals_the_base_fails_under_any_limit(bpe_run, tmp_path, monkeypatch):
    """A file that lost the whole training (the base written instead of the merge) is refused under a loose
    --max-gap: the file must stay closer to the trained model than the training moved it from its base."""
    def base_only(trained, run_dir):
        base = trained.unload()
        return base.dequantize(dtype=torch.float32) if getattr(base, "hf_quantizer", None) is not None else base

    run, _ = bpe_run
    monkeypatch.setattr(ggufx, "merge_exact", base_only)
    with pytest.raises(QbcoError, match=r"from its base: the merge lost most of the training; nothing was written"):
        ggufx.merge_gguf(run, tmp_path / "out", "f16", max_gap=10, device=CPU, log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_other_architectures_and_types_are_refused_in_one_line():
    from transformers import Gemma2Config

    with pytest.raises(QbcoError, match="--gguf writes Llama .* and Qwen2 models; this base is 'gemma2'"):
        ggufx.architecture(Gemma2Config())
    with pytest.raises(QbcoError, match="--gguf must be one of f16, bf16, q8_0, q4_0"):
        ggufx.check_type("q4_k_m")
