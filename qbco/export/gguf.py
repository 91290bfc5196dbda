"""A run merged into one GGUF file (f16, bf16, q8_0, q4_0) that llama.cpp, LM Studio and Ollama load, with an Ollama
Modelfile beside it, checked before it is kept.

The adapter is merged in fp32 into the weights it was trained against (qbco.export.merge.merge_exact), then each
tensor is written with the `gguf` package's own writer and quantizers (gguf-py, llama.cpp's), named and laid out as
llama.cpp's convert_hf_to_gguf.py does for Llama and Qwen2: Llama's q_proj / k_proj rows permuted for llama.cpp's
rotary embedding, the byte-level BPE tokenizer and the chat template in the metadata. The check reads the file back
with an independent reader (transformers' GGUF loader, which dequantizes it) and measures its per-token log-prob gap
to the trained model on held-out rows, as the safetensors merge does; a file over its type's limit is not kept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from qbco.common.errors import QbcoError
from qbco.common.files import atomic_folder
from qbco.common.progress import Wait
from qbco.data.encoding import Encoded
from qbco.export.merge import (
    Gap,
    _release,
    completion_token_logps,
    gap,
    measure_trained,
    merge_device,
    merge_exact,
    why_not,
)
from qbco.model.names import base_weights, hub_id, no_bars, resolve_model
from qbco.run.folder import RunFolder

TYPES = ("f16", "bf16", "q8_0", "q4_0")
# Default limits, nats per completion token against the trained model (docs/merge.md has the demo run's figures):
# f16 and bf16 as the safetensors merge's; q8_0 and q4_0 are quantized on purpose, so their limit is what each
# type costs a model of this size plus a margin, and a file far beyond it (a wrong layout) still fails.
MAX_GAP = {"f16": 0.05, "bf16": 0.05, "q8_0": 0.1, "q4_0": 0.6}
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # transformers' model_type -> GGUF's architecture
# llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by this name; convert_hf_to_gguf.py
# recognizes it from the tokenizer's output, qbco from the model family it knows.
PRE_TOKENIZERS = {49152: "smollm", 128256: "llama-bpe"}  # a llama's vocabulary size -> its family's pre-tokenizer
MODELFILE = "Modelfile"
CARD = "README.md"
CHECK_ROWS = 32


@dataclass
class GgufResult:
    output: Path  # the folder
    file: Path  # the .gguf file in it
    type: str
    gap: Gap
    max_gap: float
    size_bytes: int
    tokenizer_rows: tuple[int, int]  # (rows the file's own tokenizer encodes as the run's does, rows compared)
    notes: list[str] = field(default_factory=list)


def gguf_file_name(output: Path, kind: str) -> str:
    return f"{output.name}-{kind}.gguf"


# ---------------------------------------------------------------- the file


def check_type(kind: str) -> str:
    if kind not in TYPES:
        raise QbcoError(f"--gguf must be one of {', '.join(TYPES)} (got {kind!r})")
    return kind


def architecture(hf_config) -> str:
    """GGUF's architecture name, or a one-line refusal of a model this writer does not lay out."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise QbcoError(f"--gguf writes Llama (SmolLM2, Llama 3) and Qwen2 models; this base is {model_type!r}: "
                        "merge to safetensors (without --gguf) and convert with llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise QbcoError(f"--gguf: this base scales its rotary embedding ({rope_type}), which this writer does not lay "
                        "out yet; merge to safetensors and convert with llama.cpp's convert_hf_to_gguf.py")
    return ARCHITECTURES[model_type]


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's layout of a Llama q_proj / k_proj (convert_hf_to_gguf.py, LlamaModel.permute): Hugging Face
    keeps each head's rotary pairs as (first half, second half), llama.cpp as interleaved neighbours."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tensor_type(name: str, data: np.ndarray, kind: str):
    """The GGML type of one tensor: 1-D tensors (norms, biases) stay F32, as llama.cpp's converter keeps them; a
    row not a whole number of quantization blocks falls back to F16; q4_0 keeps the token embedding and the output
    head in Q8_0 (a small model's tied embedding is where 4 bits cost most; llama-quantize also keeps them wider)."""
    T = gguf.GGMLQuantizationType
    if data.ndim <= 1:
        return T.F32
    wanted = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[kind]
    if kind == "q4_0" and name in ("token_embd.weight", "output.weight"):
        wanted = T.Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if data.shape[-1] % block == 0 else T.F16


def tokenizer_metadata(writer, tokenizer, hf_config) -> None:
    """The byte-level BPE vocabulary, merges, special tokens and chat template, as convert_hf_to_gguf.py writes a
    "gpt2"-type tokenizer (SmolLM2, Qwen2, Llama 3 all are)."""
    TokenType = gguf.TokenType
    state = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "backend_tokenizer", None) else {}
    model = state.get("model", {})
    if model.get("type") != "BPE":
        raise QbcoError(f"--gguf writes byte-level BPE tokenizers (SmolLM2, Qwen2, Llama 3); this one is "
                        f"{model.get('type') or type(tokenizer).__name__}")
    vocab_size = hf_config.vocab_size
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {t.id: t for t in (state.get("added_tokens") or []) for t in [_Added(**t)]}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:  # the embedding is larger than the vocabulary (Qwen2's padding rows)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    model_type = getattr(hf_config, "model_type", "")
    writer.add_tokenizer_pre("qwen2" if model_type == "qwen2" else PRE_TOKENIZERS.get(vocab_size, "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


@dataclass
class _Added:
    id: int
    content: str
    special: bool = False

    def __init__(self, id, content, special=False, **_):
        self.id, self.content, self.special = id, content, special


def gguf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor the file holds: a tied head is the embedding (llama.cpp reads token_embd
    for it when output.weight is absent), and rotary tables are recomputed by every reader."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    return [(k, v) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight") and "rotary_emb" not in k]


def write_gguf(model, tokenizer, path: Path, kind: str, name: str, done=lambda n: None, permute: bool = True) -> int:
    """Write `model` (a float Llama or Qwen2, merged) as one GGUF file of type `kind`; returns its tensor count.
    `done(n)` is told the tensors converted so far. `permute=False` leaves Llama's q/k rows in Hugging Face's
    order: a wrong file, which the check must refuse (the tests write one)."""
    c = model.config
    arch = architecture(c)
    n_head, n_kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_head
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    writer.add_rope_freq_base(float(theta or getattr(c, "rope_theta", 10000.0)))
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer_metadata(writer, tokenizer, c)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    items = gguf_tensors(model)
    for n, (key, value) in enumerate(items, start=1):
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise QbcoError(f"--gguf: no GGUF name for the tensor {key}; this model's layout is not supported")
        data = value.detach().to(torch.float32).cpu().numpy()
        if arch == "llama" and permute and re.search(r"self_attn\.q_proj\.weight$", key):
            data = permute_qk(data, n_head)
        elif arch == "llama" and permute and re.search(r"self_attn\.k_proj\.weight$", key):
            data = permute_qk(data, n_kv)
        qtype = tensor_type(new, data, kind)
        writer.add_tensor(new, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        done(n)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return len(items)


# ---------------------------------------------------------------- reading it back


def read_back(folder: Path, file_name: str, device):
    """The file as a user of transformers would load it (its GGUF loader dequantizes every tensor to fp32)."""
    from transformers import AutoModelForCausalLM

    with no_bars():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32,
                                                     device_map={"": device})
    model.eval()
    return model


def measure_file(folder: Path, file_name: str, rows, reference, kind: str, device, done=lambda n: None) -> Gap:
    """The file's per-token log-prob gap to the trained model's `reference` on `rows`."""
    model = read_back(folder, file_name, device)
    logps = completion_token_logps(model, rows, device, done)
    del model
    _release()
    return gap(kind, logps, reference)


def tokenizer_agreement(folder: Path, file_name: str, tokenizer, rows: list[Encoded]) -> tuple[int, int]:
    """(rows whose text, chat template and all, the file's own tokenizer, read back by transformers, encodes to
    the same ids as the run's tokenizer, rows compared)."""
    from transformers import AutoTokenizer

    with no_bars():
        theirs = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    texts = [tokenizer.decode(row.prompt_ids + row.completion_ids) for row in rows]
    same = sum(tokenizer.encode(t, add_special_tokens=False) == theirs.encode(t, add_special_tokens=False) for t in texts)
    return same, len(rows)


# ---------------------------------------------------------------- Ollama and the card


def modelfile(file_name: str, tokenizer) -> str:
    """An Ollama Modelfile that points at the file. A ChatML template (SmolLM2, Qwen2) is spelled out in Ollama's
    template language; any other, Ollama reads from the file's own chat-template metadata."""
    lines = [f"# ollama create NAME -f {MODELFILE}; ollama run NAME", f"FROM ./{file_name}"]
    template = tokenizer.chat_template or ""
    if "<|im_start|>" in template:
        # ChatML as LLaMA-Factory's Modelfile export writes it: the system prompt once, then user and assistant turns
        lines += ['TEMPLATE """{{ if .System }}<|im_start|>system',
                  "{{ .System }}<|im_end|>",
                  '{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user',
                  "{{ .Content }}<|im_end|>",
                  "<|im_start|>assistant",
                  '{{ else if eq .Role "assistant" }}{{ .Content }}<|im_end|>',
                  '{{ end }}{{ end }}"""',
                  'PARAMETER stop "<|im_end|>"']
        system = re.search(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", template)
        if system:  # the default system prompt the template adds when a conversation has none (SmolLM2's)
            lines.append(f'SYSTEM """{system.group(1)}"""')
    return "\n".join(lines) + "\n"


def card(result: GgufResult, run_dir: Path, config) -> str:
    hub = hub_id(config.model)
    g = result.gap
    same, compared = result.tokenizer_rows
    return "\n".join([
        "---", "library_name: gguf", "tags: [qbco, bco, lora, merged, gguf]",
        *([f"base_model: {hub}"] if hub else []), "---", "",
        f"# {result.file.name}: {hub or Path(config.model).name} + BCO adapter, merged, GGUF {result.type}", "",
        f"Aligned by qbco with BCO ([arXiv:2404.04656](https://arxiv.org/abs/2404.04656)) on thumbs-up / thumbs-down "
        f"feedback (run {run_dir.name}); the LoRA adapter was merged in fp32 into "
        f"{'the NF4-dequantized base weights it was trained against' if config.load_in_4bit else 'the float base'}, "
        f"then written as GGUF {result.type}.", "",
        f"Base weights: {base_weights(config.model, config.load_in_4bit)}", "",
        "## Check", "",
        f"Read back by transformers' GGUF loader: mean |delta log p| {g.mean:.3g} nats per completion token (max "
        f"{g.max:.3g}) against the trained model over {g.tokens} tokens of {g.rows} held-out rows; the limit for "
        f"{result.type} is {result.max_gap:g}. The file's own tokenizer encodes {same} of {compared} of these rows "
        "as the run's tokenizer does.", "",
        "## Use", "", "```sh", f"llama-cli -m {result.file.name} -cnv",
        f"ollama create {result.output.name} -f {MODELFILE} && ollama run {result.output.name}", "```", "",
    ])


# ---------------------------------------------------------------- the entry point


def check_output(output: Path, run_dir: Path, overwrite: bool) -> None:
    """OUT must not be the run, and replacing it needs --overwrite and a folder that holds a GGUF file."""
    out, run = output.resolve(), run_dir.resolve()
    if out == run or run.is_relative_to(out) or out.is_relative_to(run):
        raise QbcoError(f"{output} would overwrite the run itself; choose another folder")
    if output.exists() and not output.is_dir():
        raise QbcoError(f"{output} exists and is not a folder (--gguf writes a folder: the .gguf file and its Modelfile)")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise QbcoError(f"{output} exists; pass --overwrite to replace it")
        if not any(output.glob("*.gguf")):  # --overwrite deletes it: only ever a GGUF folder
            raise QbcoError(f"{output} holds no .gguf file; refusing to replace it, remove it yourself")


def merge_gguf(run_dir: str | Path, output: str | Path, kind: str, max_gap: float | None = None, overwrite: bool = False,
               device=None, log=print, progress=None, permute: bool = True) -> GgufResult:
    """Merge RUN's adapter in fp32 and write OUT/OUT-KIND.gguf with a Modelfile and a card, after reading the
    file back and measuring it against the trained model; over `max_gap` (default: the type's) nothing is kept."""
    from transformers import AutoConfig  # transformers' import costs seconds: only where a merge runs

    run_dir, output = Path(run_dir), Path(output)
    kind = check_type(kind)
    max_gap = MAX_GAP[kind] if max_gap is None else max_gap
    if not max_gap > 0:
        raise QbcoError(f"--max-gap must be > 0 nats per token (got {max_gap})")
    check_output(output, run_dir, overwrite)
    device = merge_device(device)
    config = RunFolder(run_dir).finished_config()
    path = resolve_model(config.model)
    architecture(AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code))  # refused before loading

    log("loading the trained model (base + adapter)")
    tokenizer, trained, m = measure_trained(run_dir, config, device, progress, log, CHECK_ROWS)  # as merge measures
    rows, notes, named, reference, trained_vs_base = m.rows, m.notes, m.named, m.reference, m.base
    merged = merge_exact(trained, run_dir).to("cpu")
    del trained
    _release()

    file_name = gguf_file_name(output, kind)
    with atomic_folder(output) as tmp:
        write_gguf(merged, tokenizer, tmp / file_name, kind, output.name,
                   Wait(progress, f"writing GGUF {kind}", len(gguf_tensors(merged))),
                   permute=permute)
        del merged
        _release()
        size = (tmp / file_name).stat().st_size
        log(f"wrote {file_name} ({size / 2**20:.1f} MiB); reading it back with transformers' GGUF loader")
        result_gap = measure_file(tmp, file_name, rows, reference, kind, device,
                                  Wait(progress, f"measuring the {kind} file", len(rows)))
        log(f"{kind}: {result_gap.mean:.3g} nats per token from the trained model (limit {max_gap:g})")
        failed = why_not(result_gap, max_gap, trained_vs_base)  # the safetensors merge's rules, base included
        if failed is not None:
            wider = [t for t in TYPES[: TYPES.index(kind)] if t != "bf16"] or ["f16"]
            raise QbcoError(f"the {kind} GGUF file fails its check on {named}: {failed}; nothing was written. A wider "
                            f"type ({', '.join(reversed(wider))}) loses less; --max-gap sets the limit")
        same = tokenizer_agreement(tmp, file_name, tokenizer, rows)
        if same[0] < same[1]:
            notes.append(f"the file's tokenizer, read back by transformers, encodes {same[1] - same[0]} of {same[1]} "
                         "held-out rows differently from the run's tokenizer")
            log(notes[-1])
        result = GgufResult(output, output / file_name, kind, result_gap, max_gap, size, same, notes)
        (tmp / MODELFILE).write_text(modelfile(file_name, tokenizer), encoding="utf-8")
        (tmp / CARD).write_text(card(result, run_dir, config), encoding="utf-8")
    return result
