"""Merge a run's LoRA adapter into float weights and save a standard Hugging Face folder, verified.

The adapter was trained on top of the NF4-dequantized weights, not the checkpoint's float weights, so by
default it is merged into those ('dequantized'); 'original' merges into the checkpoint as it was. Never
into 4-bit weights: that rounds the update away (docs/pitfalls.md, 7). docs/merge.md has the measured figures.
"""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from qbco.config import TrainConfig
from qbco.data import Encoded, encode_all, load_feedback, read_demo
from qbco.errors import QbcoError
from qbco.logprobs import causal_lm, token_logps
from qbco.models import (
    EXCLUDED_TARGETS,
    MODEL_ALIASES,
    compute_dtype,
    default_device,
    load_base,
    load_run,
    resolve_model,
)
from qbco.run_folder import atomic_folder
from qbco.run_log import Metrics, read_metrics

BASES = ("dequantized", "original")
DEFAULT_BASE = "dequantized"  # measured closer to the trained model: docs/merge.md
MERGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Verification passes when the saved folder's logits differ from float base + adapter in memory by at most
# this share of the reference's logit scale: max |diff| against max |logit|, mean |diff| against mean |logit|.
# The two differ only in arithmetic (W + BA rounded once to the dtype, against x W + (x A) B with the
# adapter in fp32), which grows with the dtype's epsilon: on SmolLM2-135M bf16 gives 7% (max) and 4.4%
# (mean), fp16 0.75% and 0.52%, fp32 4e-6 (docs/merge.md). A dropped adapter or a broken tied head moves
# logits by tens of percent.
RTOL = {torch.float32: 1e-4, torch.float16: 0.03, torch.bfloat16: 0.25}
VERIFY_ROWS = 4
MEASURE_ROWS = 64
MERGE_INFO = "qbco_merge.json"  # what generate --compare reads to find the base


@dataclass
class Verification:
    """Logits of the saved folder (plain transformers) against float base + adapter in memory."""

    max_abs: float
    mean_abs: float
    max_limit: float  # RTOL x max |reference logit|
    mean_limit: float  # RTOL x mean |reference logit|
    rtol: float
    adapter_effect: float  # mean |logit change| the adapter makes: what a dropped adapter would show
    rows: int
    positions: int

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.max_limit and self.mean_abs <= self.mean_limit

    @property
    def adapter_visible(self) -> bool:
        """Whether a dropped adapter would fail the check (not when the adapter barely moves the logits)."""
        return self.adapter_effect > self.mean_limit


@dataclass
class Fidelity:
    """Per completion token |log p(merged) - log p(trained 4-bit + adapter)|, in nats."""

    mean_abs: float
    max_abs: float
    rows: int
    tokens: int


@dataclass
class MergeResult:
    output: Path
    base: str
    dtype: str
    verification: Verification | None
    fidelity: Fidelity
    notes: list[str] = field(default_factory=list)


def merge_dtype(name: str) -> torch.dtype:
    if name in MERGE_DTYPES:
        return MERGE_DTYPES[name]
    if name.lower() in ("4bit", "nf4", "int4", "fp4", "int8", "8bit"):
        raise QbcoError(f"cannot merge into {name} weights: the LoRA update is rounded away (docs/pitfalls.md, 7); use --dtype bf16")
    raise QbcoError(f"--dtype must be one of {', '.join(MERGE_DTYPES)} (got {name!r})")


def check_base(base: str) -> str:
    if base not in BASES:
        raise QbcoError(f"--base must be one of {', '.join(BASES)} (got {base!r})")
    return base


def hub_id(model: str) -> str | None:
    """The Hub id a model name stands for, or None for a local folder."""
    if model in MODEL_ALIASES:
        return MODEL_ALIASES[model]
    return model if "/" in model and not Path(model).expanduser().is_dir() else None


# ---------------------------------------------------------------- rows and log-probs


def held_out_rows(config: TrainConfig, tokenizer, limit: int) -> tuple[list[Encoded], list[str]]:
    """The first `limit` held-out rows of the run's data (its training rows if none were held out), encoded
    as in training. If the data cannot be read any more, the demo's held-out rows stand in, with a note."""
    notes = []
    try:
        train_rows, eval_rows = load_feedback(config.data, config.eval_fraction, config.seed)
    except Exception as err:  # a moved file, an unreachable dataset: the check still needs some text
        notes.append(f"cannot read the run's data {config.data!r} ({err}); checking on the demo's held-out rows")
        train_rows, eval_rows = read_demo()
    if not eval_rows:
        notes.append("the run held out no rows; checking on its first training rows")
    rows = (eval_rows or train_rows)[:limit]
    return encode_all(rows, tokenizer, config.max_prompt_length, config.max_completion_length), notes


def _ids(row: Encoded, device) -> torch.Tensor:
    return torch.tensor([row.prompt_ids + row.completion_ids], device=device)


@torch.no_grad()
def per_token_logps(model, rows: list[Encoded], device) -> list[torch.Tensor]:
    """log p of every completion token, one row at a time (no padding): completion_logps without the sum,
    through the same decoder, head and gather - logsumexp (tests check the sums agree)."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    out = []
    for row in rows:
        ids = _ids(row, device)
        hidden = lm.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]
        p = len(row.prompt_ids)
        out.append(token_logps(head, hidden[p - 1 : -1], ids[0, p:]).cpu())
    return out


@torch.no_grad()
def row_logits(model, rows: list[Encoded], device) -> list[torch.Tensor]:
    """[T, vocab] float32 logits of every row, one row at a time."""
    return [model(input_ids=_ids(row, device), use_cache=False).logits[0].float().cpu() for row in rows]


def logit_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float, int]:
    """(max |a - b|, mean |a - b|, positions) over every position and vocabulary entry of every row."""
    diffs = [(x - y).abs() for x, y in zip(a, b)]
    total = sum(float(d.sum()) for d in diffs)
    count = sum(d.numel() for d in diffs)
    return max(float(d.max()) for d in diffs), total / count, sum(d.shape[0] for d in diffs)


def fidelity(merged: list[torch.Tensor], trained: list[torch.Tensor]) -> Fidelity:
    gaps = torch.cat([(m - t).abs() for m, t in zip(merged, trained)])
    return Fidelity(float(gaps.mean()), float(gaps.max()), len(merged), gaps.numel())


# ---------------------------------------------------------------- building the merged model


def dequantize_into(float_model: torch.nn.Module, quantized: torch.nn.Module) -> int:
    """Copy the dequantized weight of every bitsandbytes Linear4bit in `quantized` (a 4-bit model, wrapped
    in a PeftModel or not) into the linear layer of the same name in `float_model`. Returns the count."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    targets = dict(float_model.named_modules())
    n = 0
    for name, module in quantized.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        # A PeftModel names the layer base_model.model.<name>.base_layer
        name = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        target = targets.get(name)
        if target is None or not isinstance(target, torch.nn.Linear):
            raise QbcoError(f"the 4-bit model's layer {name} has no float counterpart; cannot build the dequantized base")
        w = dequantize_4bit(module.weight.data, module.weight.quant_state)
        with torch.no_grad():
            target.weight.copy_(w.reshape(target.weight.shape).to(target.weight.device, target.weight.dtype))
        n += 1
    if n == 0:
        raise QbcoError("found no 4-bit layers to dequantize")
    return n


def check_adapter(run_dir: Path, model_config) -> None:
    """Refuse an adapter on a tied lm_head / embed_tokens: merged, it would change both (docs/pitfalls.md, 12)."""
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    targets = adapter.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    hit = [t for t in targets if t.rsplit(".", 1)[-1] in EXCLUDED_TARGETS]
    if hit and getattr(model_config, "tie_word_embeddings", False):
        raise QbcoError(
            f"the adapter adapts {', '.join(hit)}, which is tied to the other embedding matrix; merging would "
            "change both. Retrain without it (--lora-targets all-linear excludes them)"
        )


def float_base(config: TrainConfig, base: str, dtype: torch.dtype, device, quantized=None):
    """The base in `dtype`: the checkpoint's weights ('original') or, for 'dequantized', the checkpoint with
    every 4-bit linear layer replaced by its NF4 weights dequantized. `quantized` is the 4-bit model loaded
    exactly as in training (models.load_base with the run's compute dtype); loaded here when not given."""
    path, remote = resolve_model(config.model), config.trust_remote_code
    model = load_base(path, load_in_4bit=False, dtype=dtype, device=device, trust_remote_code=remote)
    if base == "dequantized":
        if quantized is None:
            quantized = load_base(path, True, compute_dtype(config.dtype, device), device, remote)
        dequantize_into(model, quantized)
    return model


def with_adapter(model, run_dir: Path):
    from peft import PeftModel

    check_adapter(run_dir, model.config)
    peft_model = PeftModel.from_pretrained(model, run_dir / "adapter", is_trainable=False)
    peft_model.eval()
    return peft_model


def merge_adapter(peft_model):
    """peft's merge_and_unload in the base's float dtype; a tied head must still be the embedding matrix."""
    merged = peft_model.merge_and_unload()
    if getattr(merged.config, "tie_word_embeddings", False):
        head, embed = merged.get_output_embeddings(), merged.get_input_embeddings()
        if head is not None and head.weight is not embed.weight:
            raise QbcoError("after merging, lm_head is no longer tied to embed_tokens; refusing to save a broken model")
    merged.eval()
    return merged


def _release() -> None:
    """Give back the memory of models the caller has just dropped (before the next one loads)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- saving and verifying


def save_merged(model, tokenizer, folder: Path, max_shard_size: str = "2GB") -> None:
    """safetensors shards, config, generation config, tokenizer and chat template."""
    from transformers import GenerationConfig

    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if not (folder / "generation_config.json").is_file():
        GenerationConfig.from_model_config(model.config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def verify(folder: Path, rows: list[Encoded], reference: list[torch.Tensor], dtype: torch.dtype, device,
           adapter_effect: float, trust_remote_code: bool = False) -> Verification:
    """Reload `folder` with plain transformers (no peft) and compare its logits with `reference`, the float
    base + adapter logits computed in memory before merging."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    ).to(device)
    model.eval()
    logits = row_logits(model, rows, device)
    del model
    _release()
    max_abs, mean_abs, positions = logit_gap(logits, reference)
    scale_max = max(float(r.abs().max()) for r in reference)
    scale_mean = sum(float(r.abs().sum()) for r in reference) / sum(r.numel() for r in reference)
    rtol = RTOL[dtype]
    return Verification(max_abs, mean_abs, rtol * scale_max, rtol * scale_mean, rtol, adapter_effect, len(rows), positions)


def model_card(run_dir: Path, output: Path, config: TrainConfig, base: str, dtype: str,
               verification: Verification | None, fid: Fidelity) -> str:
    """README.md of the merged folder, from the run's config.yaml and metrics.jsonl."""
    hub = hub_id(config.model)
    log = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else Metrics()
    last, ev = log.last_step, log.eval
    front = {"library_name": "transformers", "tags": ["qbco", "bco", "lora", "merged"]}
    if hub:
        front["base_model"] = hub
    base_text = ("the base's NF4 weights dequantized (the weights the adapter was trained against)"
                 if base == "dequantized" else "the base's original float weights")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {output.name}: {hub or Path(config.model).name} + BCO adapter, merged",
        "",
        f"Aligned by qbco with BCO (binary classifier optimization, [arXiv:2404.04656](https://arxiv.org/abs/2404.04656)) "
        f"on thumbs-up / thumbs-down feedback: a LoRA adapter trained on a {'4-bit NF4' if config.load_in_4bit else 'float'} base, "
        f"merged into {base_text}, saved in {dtype}. Loads with plain transformers; no peft needed.",
        "",
        "| | |", "|---|---|",
        f"| base model | {config.model}{f' ({hub})' if hub and hub != config.model else ''} |",
        f"| data | {config.data} |",
        f"| loss | {config.loss}, beta {config.beta} |",
        f"| LoRA | r {config.lora_r}, alpha {config.lora_alpha}, targets {config.lora_targets} |",
        f"| merged into | {base} weights, {dtype} |",
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
    lines += ["", "## Merge check", ""]
    lines.append(f"- against the trained model (4-bit base + adapter): mean |delta log p| {fid.mean_abs:.3g} nats per "
                 f"completion token (max {fid.max_abs:.3g}) over {fid.tokens} tokens of {fid.rows} held-out rows")
    if verification:
        v = verification
        lines.append(f"- saved folder against float base + adapter in memory: logits max |diff| {v.max_abs:.3g} "
                     f"(limit {v.max_limit:.3g}), mean {v.mean_abs:.3g} (limit {v.mean_limit:.3g}) over {v.positions} "
                     f"positions of {v.rows} rows; the adapter itself moves logits by {v.adapter_effect:.3g} on average")
    else:
        lines.append("- the reload check was skipped (--no-verify)")
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


def check_output(output: Path, run_dir: Path, overwrite: bool) -> None:
    out, run = output.resolve(), run_dir.resolve()
    if out == run or run.is_relative_to(out) or out.is_relative_to(run / "adapter"):
        raise QbcoError(f"{output} would overwrite the run itself; choose another folder")
    if output.exists() and not output.is_dir():
        raise QbcoError(f"{output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise QbcoError(f"{output} exists; pass --overwrite to replace it")
        if not (output / "config.json").is_file():  # --overwrite deletes it: only ever a model folder
            raise QbcoError(f"{output} is not a model folder (no config.json); refusing to replace it, remove it yourself")


# ---------------------------------------------------------------- the two entry points


def merge(run_dir: str | Path, output: str | Path, base: str = DEFAULT_BASE, dtype: str = "bf16",
          verify_output: bool = True, overwrite: bool = False, device: torch.device | None = None,
          log=print) -> MergeResult:
    """Merge RUN's adapter into float weights, save a Hugging Face folder at `output`, verify it.

    Everything is written into a temporary folder next to `output` and renamed at the end: an interrupted
    or failed merge leaves nothing that looks finished.
    """
    run_dir, output = Path(run_dir), Path(output)
    torch_dtype = merge_dtype(dtype)
    check_base(base)
    check_output(output, run_dir, overwrite)
    device = device or default_device()

    # The trained model exactly as it was trained (4-bit base + adapter): the reference for fidelity.
    config, tokenizer, trained = load_run(run_dir, device)
    rows, notes = held_out_rows(config, tokenizer, VERIFY_ROWS)
    for note in notes:
        log(note)
    trained_logps = per_token_logps(trained, rows, device)
    if base == "dequantized" and not config.load_in_4bit:
        notes.append("the run trained on a float base (--no-4bit): 'dequantized' is the same as 'original'")
        log(notes[-1])
    kind = base if config.load_in_4bit else "original"
    # The 4-bit model just loaded is the one training used; its weights are what 'dequantized' needs.
    model = float_base(config, kind, torch_dtype, device, quantized=trained if kind == "dequantized" else None)
    del trained
    _release()
    model = with_adapter(model, run_dir)
    reference, adapter_effect = None, 0.0
    if verify_output:
        reference = row_logits(model, rows, device)
        with model.disable_adapter():
            adapter_effect = logit_gap(row_logits(model, rows, device), reference)[1]
    merged = merge_adapter(model)
    fid = fidelity(per_token_logps(merged, rows, device), trained_logps)
    trained_dtype = compute_dtype(config.dtype, device)
    if torch_dtype != trained_dtype:
        trained_name = {v: k for k, v in MERGE_DTYPES.items()}[trained_dtype]
        notes.append(f"the trained model computes in {trained_name}: part of the gap to it is {dtype} rounding "
                     f"(--dtype {trained_name} avoids it)")
        log(notes[-1])

    with atomic_folder(output) as tmp:
        save_merged(merged, tokenizer, tmp)
        del merged, model
        _release()
        check = None
        if verify_output:
            check = verify(tmp, rows, reference, torch_dtype, device, adapter_effect, config.trust_remote_code)
            if not check.ok:
                raise QbcoError(
                    f"verification failed: the saved model's logits differ from base + adapter by up to "
                    f"{check.max_abs:.3g}, {check.mean_abs:.3g} on average (limits {check.max_limit:.3g} and "
                    f"{check.mean_limit:.3g} for {dtype}); nothing was written to {output} (--no-verify writes it anyway)"
                )
            if not check.adapter_visible:
                notes.append(f"the adapter moves logits by only {check.adapter_effect:.2g} on average, below the "
                             f"{dtype} check's limit {check.mean_limit:.2g}: a dropped adapter would pass; "
                             "--dtype fp32 checks more strictly")
                log(notes[-1])
        (tmp / "README.md").write_text(model_card(run_dir, output, config, kind, dtype, check, fid), encoding="utf-8")
        info = {"run": str(run_dir.resolve()), "model": config.model, "base": kind, "dtype": dtype,
                "trust_remote_code": config.trust_remote_code,
                "verification": asdict(check) if check else None, "fidelity": asdict(fid)}
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return MergeResult(output, kind, dtype, check, fid, notes)


def measure_bases(run_dir: str | Path, dtype: str = "fp32", limit: int = MEASURE_ROWS,
                  device: torch.device | None = None) -> dict:
    """How far each merge option is from the trained model (4-bit base + adapter), per completion token of
    up to `limit` held-out rows, in nats; also how far each float base is from the 4-bit base with the
    adapter off. The figures in docs/merge.md come from here."""
    run_dir = Path(run_dir)
    torch_dtype = merge_dtype(dtype)
    device = device or default_device()
    config, tokenizer, trained = load_run(run_dir, device)
    if not config.load_in_4bit:
        raise QbcoError(f"{run_dir} trained on a float base (--no-4bit): both merge options are the same")
    rows, notes = held_out_rows(config, tokenizer, limit)
    trained_logps = per_token_logps(trained, rows, device)
    with trained.disable_adapter():
        base4_logps = per_token_logps(trained, rows, device)
    result: dict = {"run": str(run_dir), "dtype": dtype, "rows": len(rows),
                    "tokens": sum(t.numel() for t in trained_logps), "notes": notes}
    for kind in BASES:
        model = with_adapter(float_base(config, kind, torch_dtype, device, quantized=trained), run_dir)
        with model.disable_adapter():
            base_gap = fidelity(per_token_logps(model, rows, device), base4_logps)
        merged = merge_adapter(model)
        merged_logps = per_token_logps(merged, rows, device)
        merged_gap = fidelity(merged_logps, trained_logps)
        row_gap = torch.tensor([float((m.sum() - t.sum()).abs()) for m, t in zip(merged_logps, trained_logps)])
        result[kind] = {
            "merged_vs_trained_mean": merged_gap.mean_abs, "merged_vs_trained_max": merged_gap.max_abs,
            "merged_vs_trained_row_sum_mean": float(row_gap.mean()),
            "base_vs_4bit_base_mean": base_gap.mean_abs, "base_vs_4bit_base_max": base_gap.max_abs,
        }
        del model, merged
        _release()
    result["adapter_effect_mean"] = fidelity(trained_logps, base4_logps).mean_abs
    return result


if __name__ == "__main__":  # python -m qbco.merge RUN [DTYPE]: the figures of docs/merge.md
    import sys

    print(json.dumps(measure_bases(sys.argv[1], *sys.argv[2:3]), indent=2))
