"""Merge a run's LoRA adapter into its base and save a Hugging Face folder that answers like the trained model.

The adapter was trained on top of the NF4-dequantized weights, so it is merged into exactly those (the 4-bit
model dequantized in place, never the checkpoint's float weights and never 4-bit weights: docs/pitfalls.md, 7), in
fp32, where the merge is exact. Each smaller dtype rounds it; the check is fidelity: OUT is saved, reloaded
with plain transformers and its per-token log-probs compared with the trained model's on held-out rows.
`--dtype auto` keeps the smallest dtype within the limit. docs/merge.md has the measurements.
"""

from __future__ import annotations

import copy
import gc
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from qbco.common.errors import QbcoError
from qbco.common.files import atomic_folder
from qbco.common.progress import Wait
from qbco.data.encoding import Encoded, encode_all
from qbco.data.feedback import load_feedback, read_demo
from qbco.model.device import compute_dtype, default_device
from qbco.model.loading import load_base, load_tokenizer, to_fp32_compute
from qbco.model.lora import EXCLUDED_TARGETS
from qbco.model.memory import NF4_BYTES, GiB, estimate
from qbco.model.names import base_weights, hub_id, resolve_model
from qbco.run.config import TrainConfig
from qbco.run.folder import RunFolder, write_merge_info
from qbco.run.metrics_log import Metrics

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# --dtype auto tries these in order and keeps the first within the limit: smallest first, and bf16 before
# fp16 (the same size; bf16 has fp32's range, so no activation overflows).
AUTO_ORDER = ("bf16", "fp16", "fp32")
DEFAULT_MAX_GAP = 0.05  # nats per completion token: docs/merge.md has the gaps per dtype measured on demo runs
CHECK_ROWS = 32
# The check's rules beyond the mean (passes / why_not): the worst row's mean gap may be ROW_FACTOR times the
# limit; OUT keeps at least 1 - KEPT_SHARE of what training moved from the base; and the trained model must be
# at least MIN_TRAINED_GAP nats per token from its base (the fp32 merge's own rounding is 1.5e-5 on the demo run).
ROW_FACTOR = 4.0
KEPT_SHARE = 0.5
MIN_TRAINED_GAP = 1e-4


@dataclass
class Gap:
    """|log p(OUT) - log p(trained model)| per completion token of the check rows, in nats."""

    dtype: str
    mean: float
    max: float
    rows: int
    tokens: int
    worst_row: float = math.nan  # the largest of the rows' own mean gaps


@dataclass
class MergeResult:
    output: Path
    dtype: str
    gap: Gap  # of OUT as saved, reloaded with plain transformers
    tried: list[Gap]  # every dtype measured, in the order tried
    max_gap: float
    size_bytes: int  # OUT's weights on disk
    notes: list[str] = field(default_factory=list)
    check_rows: str = ""  # which rows the check measured, in words ("8 held-out rows of data.jsonl")
    trained_vs_base: Gap | None = None  # the trained model's own gap to its base (adapters off) on those rows


def dtype_candidates(name: str) -> tuple[str, ...]:
    """The dtypes to measure, in order: every one for 'auto'; for an explicit dtype, that one and the wider
    ones after it (measured only if it misses, to name one that passes)."""
    if name == "auto":
        return AUTO_ORDER
    if name in DTYPES:
        return AUTO_ORDER[AUTO_ORDER.index(name):]
    if name.lower() in ("4bit", "nf4", "int4", "fp4", "int8", "8bit"):
        raise QbcoError(f"cannot merge into {name} weights: the LoRA update is rounded away (docs/pitfalls.md, 7); use --dtype auto")
    raise QbcoError(f"--dtype must be auto, {', '.join(DTYPES)} (got {name!r})")


def merge_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return default_device()
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise QbcoError(f"--device must be cpu or cuda (got {device})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QbcoError("--device cuda: no CUDA device is available here; use --device cpu")
    return device


# ---------------------------------------------------------------- rows and log-probs


def held_out_rows(config: TrainConfig, tokenizer, limit: int) -> tuple[list[Encoded], list[str]]:
    """The first `limit` held-out rows of the run's data (its training rows if none were held out), encoded
    as in training. If the data cannot be read any more, the demo's held-out rows stand in, with a note."""
    rows, notes, _ = check_rows(config, tokenizer, limit)
    return rows, notes


def check_rows(config: TrainConfig, tokenizer, limit: int) -> tuple[list[Encoded], list[str], str]:
    """held_out_rows, and which rows they are in words, for the card and the merge record (write_merge_info)."""
    notes, data = [], config.data
    try:
        train_rows, eval_rows = load_feedback(config.data, config.eval_fraction, config.seed)
    except Exception as err:  # a moved file, an unreachable dataset: the check still needs some text
        notes.append(f"cannot read the run's data {config.data!r} ({err}); checking on the demo's held-out rows")
        train_rows, eval_rows = read_demo()
        data = "the demo (the run's data could not be read)"
    if not eval_rows:
        notes.append("the run held out no rows; checking on its first training rows")
    rows = (eval_rows or train_rows)[:limit]
    named = f"{len(rows)} {'held-out' if eval_rows else 'training'} rows of {data}"
    if not eval_rows:
        named += " (the run held out none)"
    return encode_all(rows, tokenizer, config.max_prompt_length, config.max_completion_length), notes, named


@torch.no_grad()
def completion_token_logps(model, rows: list[Encoded], device, done=lambda n: None) -> list[torch.Tensor]:
    """log p of every completion token, one row at a time (no padding), from the model's own forward, so a
    logit transform inside it (softcapping, logit scales: docs/pitfalls.md, 15) counts; float32 log-softmax.
    `done(n)` is told the rows measured so far (a progress bar)."""
    out = []
    for i, row in enumerate(rows):
        ids = torch.tensor([row.prompt_ids + row.completion_ids], device=device)
        n = len(row.completion_ids)
        # The last n + 1 positions: n of them predict the completion tokens, the very last predicts nothing.
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=n + 1).logits[0, :-1].float()
        targets = ids[0, -n:]
        out.append((logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)).cpu())
        done(i + 1)
    return out


def why_not(g: Gap, max_gap: float, base: Gap | None = None) -> str | None:
    """Why OUT fails the check, or None when it passes. With d_t = |log p_OUT(t) - log p_trained(t)| per
    completion token t and b_t = |log p_trained(t) - log p_base(t)| (`base`, the training's own effect):

        mean_t d_t <= max_gap                                  (a NaN, an fp16 overflow, never is)
        max over rows of (mean of d_t in the row) <= ROW_FACTOR * max_gap
        mean_t d_t <= KEPT_SHARE * mean_t b_t                  (OUT keeps most of what training changed)

    The last rule fails a merge that equals the base (d = b) under any --max-gap."""
    if not math.isfinite(g.mean):
        return f"{g.dtype}: not finite (an overflow)"
    if g.mean > max_gap:
        return f"{g.dtype}: mean {g.mean:.3g} nats per token over the limit {max_gap:g}"
    if math.isfinite(g.worst_row) and g.worst_row > ROW_FACTOR * max_gap:
        return f"{g.dtype}: its worst row is {g.worst_row:.3g} nats per token off (limit {ROW_FACTOR:g} x {max_gap:g})"
    if base is not None and g.mean > KEPT_SHARE * base.mean:
        return (f"{g.dtype}: {g.mean:.3g} nats per token from the trained model, which is only {base.mean:.3g} from "
                f"its base: the merge lost most of the training")
    return None


def passes(g: Gap, max_gap: float, base: Gap | None = None) -> bool:
    """Within the limit, its worst row too, and closer to the trained model than the base is (why_not)."""
    return why_not(g, max_gap, base) is None


def gap(dtype: str, logps: list[torch.Tensor], reference: list[torch.Tensor]) -> Gap:
    per_row = [(a - b).abs() for a, b in zip(logps, reference)]
    diffs = torch.cat(per_row)
    worst_row = max((float(d.mean()) for d in per_row if d.numel()), default=math.nan)
    return Gap(dtype, float(diffs.mean()), float(diffs.max()), len(logps), diffs.numel(), worst_row)


@torch.no_grad()
def base_token_logps(trained, rows: list[Encoded], device, done=lambda n: None) -> list[torch.Tensor]:
    """The base's log-probs of the check rows: the trained PeftModel with its adapters off (as the reference
    of training is)."""
    with trained.disable_adapter():
        return completion_token_logps(trained, rows, device, done)


def check_trained(trained_vs_base: Gap, adapter: Path, rows: str) -> None:
    """Refuse a trained model that answers like its base, mean_t |log p_trained(t) - log p_base(t)| <
    MIN_TRAINED_GAP: the adapter was not applied, and OUT could match it while having lost the training."""
    if not trained_vs_base.mean >= MIN_TRAINED_GAP:
        raise QbcoError(
            f"the trained model answers like its base: {trained_vs_base.mean:.3g} nats per token apart on {rows} "
            f"(under {MIN_TRAINED_GAP:g}); the adapter in {adapter} was not applied (a target name that matches no "
            "module, a peft change), so no merge of it can be checked; nothing was written")


# ---------------------------------------------------------------- the trained model and the exact merge


@dataclass
class Measured:
    """The check rows (named, with notes on where they come from), the trained model's log-probs of their
    completion tokens (what an output is compared with), and its gap to its base (`base`)."""

    rows: list[Encoded]
    notes: list[str]
    named: str
    reference: list[torch.Tensor]
    base: Gap


def measure_trained(run_dir: Path, config: TrainConfig, device, progress, log, limit: int = CHECK_ROWS):
    """(tokenizer, trained PeftModel, Measured): what the safetensors and the GGUF merge both check against,
    measured once; a trained model that answers like its base is refused here (check_trained)."""
    tokenizer = load_tokenizer(str(RunFolder(run_dir).adapter))
    trained = load_trained(run_dir, config, device)
    rows, notes, named = check_rows(config, tokenizer, limit)
    for note in notes:
        log(note)
    reference = completion_token_logps(trained, rows, device, Wait(progress, "measuring the trained model", len(rows)))
    base = gap("base", base_token_logps(trained, rows, device), reference)
    log(f"trained model measured on {named}: {base.mean:.3g} nats per token from its base "
        f"(worst row {base.worst_row:.3g}); merging in fp32")
    check_trained(base, RunFolder(run_dir).adapter, named)
    return tokenizer, trained, Measured(rows, notes, named, reference, base)


def check_adapter(run_dir: Path, model_config) -> None:
    """Refuse an adapter on a tied lm_head / embed_tokens: merged, it would change both (docs/pitfalls.md, 12)."""
    targets = RunFolder(run_dir).adapter_targets()
    hit = [t for t in targets if t.rsplit(".", 1)[-1] in EXCLUDED_TARGETS]
    if hit and getattr(model_config, "tie_word_embeddings", False):
        raise QbcoError(
            f"the adapter adapts {', '.join(hit)}, which is tied to the other embedding matrix; merging would "
            "change both. Retrain without it (--lora-targets all-linear excludes them)"
        )


def load_trained(run_dir: Path, config: TrainConfig, device: torch.device):
    """The run's model: its base loaded as training loads it (4-bit NF4 or float, the run's dtype), its
    adapter on top (peft), computing in fp32. The reference every dtype is measured against."""
    from peft import PeftModel

    base = load_base(resolve_model(config.model), config.load_in_4bit, compute_dtype(config.dtype, device), device,
                     config.trust_remote_code)
    check_adapter(run_dir, base.config)
    to_fp32_compute(base)
    model = PeftModel.from_pretrained(base, RunFolder(run_dir).adapter, is_trainable=False)
    model.eval()  # safe on the CPU: load_base switched bitsandbytes' repacking off (docs/pitfalls.md, 13)
    return model


def merge_exact(trained, run_dir: Path):
    """The trained model's weights merged in fp32, in place: the LoRA layers are taken out, the 4-bit base is
    dequantized (transformers' PreTrainedModel.dequantize; no second copy of the model is loaded) and the
    adapter is added back by peft's merge_and_unload, W + s B A in fp32. A tied head must stay tied."""
    from peft import PeftModel

    base = trained.unload()
    if getattr(base, "hf_quantizer", None) is not None:
        base = base.dequantize(dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, RunFolder(run_dir).adapter, is_trainable=False).merge_and_unload()
    if getattr(merged.config, "tie_word_embeddings", False):
        head, embed = merged.get_output_embeddings(), merged.get_input_embeddings()
        if head is not None and head.weight is not embed.weight:
            raise QbcoError("after merging, lm_head is no longer tied to embed_tokens; refusing to save a broken model")
    merged.requires_grad_(False)
    merged.eval()
    return merged


def cast_copy(model, dtype: torch.dtype):
    """A copy of `model` with every floating parameter in `dtype` (rounded once from fp32). A tied parameter
    is one object, so it is cast once and the copy's head stays tied; buffers are copied as they are."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
            for p in model.parameters() if p.is_floating_point()}
    return copy.deepcopy(model, memo)


def _release() -> None:
    """Give back the memory of models the caller has just dropped (before the next one loads)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- memory


@dataclass
class MergeMemory:
    """What a merge holds at its peak, from the model's config (docs/pitfalls.md, 11): the trained model (4-bit base
    computing in fp32), the fp32 merged model, and OUT reloaded for the check (with a cast copy while saving)."""

    device: torch.device
    trained_bytes: float
    merged_bytes: float
    narrow_bytes: float  # a bf16 / fp16 copy of the model (0 when none is tried)
    out_bytes: float  # OUT reloaded in the widest dtype tried

    @property
    def device_peak(self) -> float:
        if self.device.type == "cuda":  # the merged fp32 model moves to RAM once built
            return max(self.trained_bytes, self.merged_bytes, self.out_bytes)
        return max(self.trained_bytes, self.merged_bytes + self.narrow_bytes, self.out_bytes)

    @property
    def ram_peak(self) -> float:
        return self.merged_bytes + self.narrow_bytes if self.device.type == "cuda" else self.device_peak

    def line(self) -> str:
        where = (f"~{_size(self.device_peak)} on {self.device}, ~{_size(self.ram_peak)} of RAM"
                 if self.device.type == "cuda" else f"~{_size(self.ram_peak)} of RAM")
        hint = "; --device cpu needs no GPU memory" if self.device.type == "cuda" else ""
        return (f"merge memory estimate: {where} (trained model {_size(self.trained_bytes)}, fp32 merged model "
                f"{_size(self.merged_bytes)}, OUT reloaded {_size(self.out_bytes)}){hint}")


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.0f} MiB"


def merge_memory(hf_config, config: TrainConfig, candidates: tuple[str, ...], device: torch.device) -> MergeMemory:
    counts = estimate(hf_config, config, 4)
    params, linear = counts.base_params, counts.linear_params
    base = linear * NF4_BYTES + (params - linear) * 4 if config.load_in_4bit else params * 4
    narrow = [DTYPES[d].itemsize for d in candidates if d != "fp32"]
    widest = max(DTYPES[d].itemsize for d in candidates)
    return MergeMemory(device, base + counts.lora_params * 4, params * 4.0, params * max(narrow, default=0),
                       params * float(widest))


# ---------------------------------------------------------------- saving and checking


def save_merged(model, tokenizer, folder: Path, max_shard_size: str = "2GB") -> None:
    """safetensors shards, config, generation config, tokenizer and chat template."""
    from transformers import GenerationConfig

    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if not (folder / "generation_config.json").is_file():
        GenerationConfig.from_model_config(model.config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def measure_saved(folder: Path, rows: list[Encoded], reference: list[torch.Tensor], dtype: str, device,
                  trust_remote_code: bool = False, done=lambda n: None) -> Gap:
    """Reload `folder` as a user would (plain transformers, no peft, the dtype it was saved in) and measure
    its gap to the trained model's log-probs `reference`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, trust_remote_code=trust_remote_code,
                                                 device_map={"": device})
    model.eval()
    logps = completion_token_logps(model, rows, device, done)
    del model
    _release()
    return gap(dtype, logps, reference)


def clear_folder(folder: Path) -> None:
    """Empty the temporary folder of a dtype that missed, before the next one is saved into it."""
    for path in folder.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def model_card_inputs(run_dir: Path) -> Metrics:
    """The run's metrics log, which the card quotes (none: an empty one)."""
    run = RunFolder(run_dir)
    return run.metrics() if run.metrics_file.is_file() else Metrics()


def model_card(run_dir: Path, output: Path, config: TrainConfig, result: MergeResult) -> str:
    """README.md of the merged folder, from the run's config and metrics log and the merge's check."""
    hub = hub_id(config.model)
    log = model_card_inputs(run_dir)
    last, ev = log.last_step, log.eval
    front = {"library_name": "transformers", "tags": ["qbco", "bco", "lora", "merged"]}
    if hub:
        front["base_model"] = hub
    base_text = ("the base's NF4 weights dequantized (the weights the adapter was trained against)"
                 if config.load_in_4bit else "the base's float weights")
    g = result.gap
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {output.name}: {hub or Path(config.model).name} + BCO adapter, merged",
        "",
        f"Aligned by qbco with BCO (binary classifier optimization, [arXiv:2404.04656](https://arxiv.org/abs/2404.04656)) "
        f"on thumbs-up / thumbs-down feedback: a LoRA adapter trained on a {'4-bit NF4' if config.load_in_4bit else 'float'} base, "
        f"merged into {base_text} in fp32, saved in {result.dtype}. Loads with plain transformers; no peft needed.",
        "",
        "| | |", "|---|---|",
        f"| base model | {config.model}{f' ({hub})' if hub and hub != config.model else ''} |",
        f"| base weights | {base_weights(config.model, config.load_in_4bit)} |",
        f"| data | {config.data} |",
        f"| loss | {config.loss}, beta {config.beta} |",
        f"| LoRA | r {config.lora_r}, alpha {config.lora_alpha}, targets {config.lora_targets} |",
        f"| saved in | {result.dtype} |",
        f"| gap to the trained model | {g.mean:.3g} nats per completion token (limit {result.max_gap:g}) |",
        *([f"| trained model from its base | {result.trained_vs_base.mean:.3g} nats per completion token |"]
          if result.trained_vs_base else []),
        f"| run | {run_dir.name} |",
        "",
        "## Final metrics",
        "",
    ]
    if ev:
        lines += [f"Held-out ({ev.get('eval_rows')} rows, after step {ev.get('step')}):", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in ev.items() if k not in ("split",)]
    else:
        lines.append("The run recorded no held-out figures.")
    if last:
        lines += ["", f"Last training step {last.get('step')}: loss {_fmt(last.get('loss'))}, delta {_fmt(last.get('delta'))}."]
    lines += ["", "## Merge check", "",
              f"This folder, reloaded with plain transformers in {result.dtype}, against the trained model (its 4-bit "
              f"base + adapter, computing in fp32): mean |delta log p| {g.mean:.3g} nats per completion token (max "
              f"{g.max:.3g}, worst row {g.worst_row:.3g}) over {g.tokens} tokens of {result.check_rows or f'{g.rows} rows'}; "
              f"the limit is {result.max_gap:g} (worst row {ROW_FACTOR:g} x that)."
              + (f" The trained model itself is {result.trained_vs_base.mean:.3g} nats per token from its base (adapters "
                 f"off) on those rows; OUT must keep at least {1 - KEPT_SHARE:.0%} of that." if result.trained_vs_base else ""),
              "", "| dtype | mean \\|delta log p\\| per token | worst row | max |", "|---|---|---|---|"]
    lines += [f"| {t.dtype} | {t.mean:.3g} | {t.worst_row:.3g} | {t.max:.3g} |" for t in result.tried]
    lines += [
        "", "## Training config", "", "```yaml", yaml.safe_dump(config.to_dict(), sort_keys=False).strip(), "```",
        "", "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{output}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{output}")',
        'messages = [{"role": "user", "content": "Hello!"}]',
        "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
        "print(tokenizer.decode(model.generate(**ids, max_new_tokens=64)[0]))",
        "```", "",
    ]
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def check_merge_output(output: Path, run_dir: Path, overwrite: bool) -> None:
    """OUT must not be the run, and replacing it needs --overwrite and a folder that holds a model."""
    out, run = output.resolve(), run_dir.resolve()
    if out == run or run.is_relative_to(out) or out.is_relative_to(RunFolder(run).adapter):
        raise QbcoError(f"{output} would overwrite the run itself; choose another folder")
    if output.exists() and not output.is_dir():
        raise QbcoError(f"{output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise QbcoError(f"{output} exists; pass --overwrite to replace it")
        if not (output / "config.json").is_file():  # --overwrite deletes it: only ever a model folder
            raise QbcoError(f"{output} is not a model folder (no config.json); refusing to replace it, remove it yourself")


def _miss(asked: str, tried: list[Gap], max_gap: float, base: Gap | None = None) -> QbcoError:
    """The one-line refusal: what missed, by how much, and the dtype that passes if one does."""
    passing = next((t for t in tried if passes(t, max_gap, base)), None)
    first = tried[0]
    if asked != "auto" and passing is not None:
        return QbcoError(
            f"--dtype {asked} moves the merged model {first.mean:.3g} nats per token from the trained one (limit "
            f"{max_gap:g}; {why_not(first, max_gap, base)}); {passing.dtype} passes ({passing.mean:.3g}): use --dtype "
            f"{passing.dtype} or --dtype auto; nothing was written"
        )
    figures = ", ".join(f"{t.dtype} {t.mean:.3g}" for t in tried)
    reasons = "; ".join(r for r in (why_not(t, max_gap, base) for t in tried) if r)
    return QbcoError(
        f"no dtype keeps the merged model within {max_gap:g} nats per token of the trained one ({figures}; {reasons}); "
        "nothing was written (--max-gap sets the limit)"
    )


# ---------------------------------------------------------------- the entry point


def merge(run_dir: str | Path, output: str | Path, dtype: str = "auto", max_gap: float = DEFAULT_MAX_GAP,
          overwrite: bool = False, device: str | torch.device | None = None, log=print, progress=None) -> MergeResult:
    """Merge RUN's adapter in fp32, save OUT in `dtype` (auto: the smallest within `max_gap`), check it.

    Every dtype is measured on the saved folder itself, reloaded. Everything is written into a temporary
    folder next to `output` and renamed at the end: a failed check or an interrupted merge leaves no OUT.
    `progress` (the CLI's rich Progress, or None) shows the measuring of the trained model and of each dtype.
    """
    run_dir, output = Path(run_dir), Path(output)
    candidates = dtype_candidates(dtype)
    if not max_gap > 0:
        raise QbcoError(f"--max-gap must be > 0 nats per token (got {max_gap})")
    check_merge_output(output, run_dir, overwrite)
    device = merge_device(device)
    config = RunFolder(run_dir).finished_config()
    _ = model_card_inputs(run_dir)  # a damaged metrics log is one line now, not after the merge's work
    path = resolve_model(config.model)
    from transformers import AutoConfig  # transformers' import costs seconds: only where a merge runs

    try:
        memory = merge_memory(AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code), config,
                                candidates, device)
    except (OSError, AttributeError, TypeError):  # an unreachable hub config (load_base says so) or not llama-style
        memory = None
    if memory is not None:
        log(memory.line())
        if device.type == "cuda" and memory.device_peak > torch.cuda.mem_get_info(device)[0]:
            log(f"note: {device} has {_size(torch.cuda.mem_get_info(device)[0])} free; --device cpu merges in RAM")

    tokenizer, trained, m = measure_trained(run_dir, config, device, progress, log)
    rows, notes, named, reference, trained_vs_base = m.rows, m.notes, m.named, m.reference, m.base
    merged = merge_exact(trained, run_dir)
    del trained
    if device.type == "cuda":
        merged.to("cpu")  # the fp32 master waits in RAM while each dtype is saved and checked on the GPU
    _release()

    tried: list[Gap] = []
    chosen = None
    with atomic_folder(output) as tmp:
        for name in candidates:
            # fp32 is always the last to try: the merged model itself is saved and then let go before the
            # reload; a narrower dtype is saved from a cast copy, keeping the fp32 model for the next one.
            out_model = merged if name == "fp32" else cast_copy(merged, DTYPES[name])
            log(f"saving the merged model in {name}; then reloading it to measure")  # a stage with no bar: say it
            save_merged(out_model, tokenizer, tmp)
            del out_model
            if name == "fp32":
                merged = None
            _release()
            tried.append(measure_saved(tmp, rows, reference, name, device, config.trust_remote_code,
                                       Wait(progress, f"measuring the saved {name} model", len(rows))))
            log(f"{name}: {tried[-1].mean:.3g} nats per token from the trained model (limit {max_gap:g})")
            if passes(tried[-1], max_gap, trained_vs_base):
                chosen = tried[-1]
                break
            clear_folder(tmp)
        if chosen is None or (dtype != "auto" and chosen.dtype != dtype):
            raise _miss(dtype, tried, max_gap, trained_vs_base)
        result = MergeResult(output, chosen.dtype, chosen, tried, max_gap, folder_bytes(tmp), notes, named,
                             trained_vs_base)
        (tmp / "README.md").write_text(model_card(run_dir, output, config, result), encoding="utf-8")
        info = {"run": str(run_dir.resolve()), "model": config.model, "base": "dequantized" if config.load_in_4bit else "float",
                "dtype": result.dtype, "max_gap": max_gap, "gap": asdict(result.gap), "tried": [asdict(t) for t in tried],
                "trust_remote_code": config.trust_remote_code, "check_rows": named,
                "trained_vs_base": asdict(trained_vs_base)}
        write_merge_info(tmp, info)
    return result
