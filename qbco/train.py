"""The training loop: data, reference log-probs once, then per optimizer step policy log-probs, BCO loss,
backward, step, reward-shift update, log. A reader should find every step of the algorithm here."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qbco.config import TrainConfig, save_config
from qbco.data import Batch, Encoded, collate, encode_all, epoch_order, iter_batches, load_feedback
from qbco.errors import QbcoError
from qbco.logprobs import completion_logps
from qbco.loss import bco_loss, implicit_rewards
from qbco.models import default_device, load_policy, reference
from qbco.shift import RewardShift


@dataclass
class RunResult:
    output: Path
    steps: int
    elapsed_s: float
    tokens_per_s: float
    final_loss: float | None
    peak_memory_mb: float
    eval: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def default_output(config: TrainConfig) -> Path:
    data = Path(config.data).stem if Path(config.data).suffix else config.data
    model = Path(config.model).name if Path(config.model).expanduser().is_dir() else config.model.replace("/", "_")
    return Path("runs") / f"{model}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_output(config: TrainConfig) -> Path:
    out = Path(config.output) if config.output else default_output(config)
    if out.exists() and any(out.iterdir()):
        raise QbcoError(f"output folder {out} is not empty; choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    return out


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def dataset_logps(model, encoded: list[Encoded], batch_size: int, pad_id: int, device, chunk: int) -> torch.Tensor:
    """[N] completion log-probs of every encoded row under `model` as it is now, without gradients."""
    out = torch.zeros(len(encoded), dtype=torch.float32)
    was_training = model.training
    model.eval()  # safe on 4-bit CPU layers: models.disable_cpu_repack keeps them differentiable
    with torch.no_grad():
        for batch in iter_batches(encoded, batch_size, pad_id):
            b = batch.to(device)
            out[batch.index] = completion_logps(model, b.input_ids, b.attention_mask, b.completion_mask, chunk).cpu()
    model.train(was_training)
    return out


def reference_logps(model, encoded, batch_size, pad_id, device, chunk) -> torch.Tensor:
    """One no-grad pass of the reference (adapters disabled) over a dataset; every later step reuses it."""
    with reference(model):
        return dataset_logps(model, encoded, batch_size, pad_id, device, chunk)


def step_windows(n: int, config: TrainConfig):
    """The rows of every optimizer step, epoch after epoch (each reshuffled), cut into micro-batches.

    A step's rows do not depend on how they are cut: batch 8 x accumulation 1 and batch 2 x
    accumulation 4 see the same rows and make the same update.
    """
    window = config.batch_size * config.grad_accum
    epoch = 0
    while True:
        for rows in epoch_order(n, window, config.seed, epoch):
            yield [rows[i : i + config.batch_size] for i in range(0, len(rows), config.batch_size)]
        epoch += 1


def held_out_figures(rewards: torch.Tensor, labels: torch.Tensor, delta: float) -> dict:
    """eval_loss (BCO with the final delta, per-class means) and the share classified right by sign(r - delta)."""
    loss = bco_loss(rewards, torch.zeros_like(rewards), labels, delta, beta=1.0).loss
    correct = ((rewards - delta) > 0) == labels.bool()
    return {"eval_loss": float(loss), "eval_reward_accuracy": float(correct.float().mean()), "eval_rows": len(labels)}


def train(config: TrainConfig, progress=None, log=print) -> RunResult:
    """Run one BCO (or BCE) training run as `config` says; returns what the summary table shows."""
    device = default_device()
    out = prepare_output(config)
    save_config(config, out / "config.yaml")
    torch.manual_seed(config.seed)

    train_rows, eval_rows = load_feedback(config.data, config.eval_fraction, config.seed)
    ups = sum(e.label for e in train_rows)
    if config.loss == "bco" and ups in (0, len(train_rows)):
        raise QbcoError(f"{config.data}: the training data holds only one class; BCO's delta needs both")
    tokenizer, model, _ = load_policy(config, device)
    pad_id = tokenizer.pad_token_id
    train_enc = encode_all(train_rows, tokenizer, config.max_prompt_length, config.max_completion_length)
    eval_enc = encode_all(eval_rows, tokenizer, config.max_prompt_length, config.max_completion_length)
    notes = [f"data: {len(train_enc)} train rows ({ups / len(train_enc):.0%} thumbs-up), {len(eval_enc)} held out"]
    cut_p, cut_c = sum(e.prompt_cut for e in train_enc + eval_enc), sum(e.completion_cut for e in train_enc + eval_enc)
    if cut_p or cut_c:
        notes.append(f"truncated: {cut_p} prompts (from the left), {cut_c} completions (from the right)")
    for note in notes:
        log(note)

    t0 = time.perf_counter()
    ref_train = reference_logps(model, train_enc, config.batch_size, pad_id, device, config.logprob_chunk)
    ref_eval = reference_logps(model, eval_enc, config.batch_size, pad_id, device, config.logprob_chunk)
    log(f"reference log-probs: {len(train_enc) + len(eval_enc)} rows in {time.perf_counter() - t0:.1f}s (one pass)")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_enc) / (config.batch_size * config.grad_accum))
    total_steps = math.ceil(config.epochs * steps_per_epoch)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup = int(config.warmup_ratio * total_steps)
    # Linear warm-up, then linear decay to 0.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup))
    )
    shift = RewardShift(config.ema_decay)
    windows = step_windows(len(train_enc), config)
    loss_value, run_tokens = None, 0
    started = time.perf_counter()
    task = progress.add_task("training", total=total_steps, loss=float("nan"), delta=0.0, tps=0.0) if progress else None

    with open(out / "metrics.jsonl", "w", encoding="utf-8") as metrics_file:
        for step in range(1, total_steps + 1):
            step_start = time.perf_counter()
            window: list[Batch] = [collate(train_enc, rows, pad_id) for rows in next(windows)]
            labels = torch.cat([b.labels for b in window])
            n_up, n_down = int(labels.sum()), int((~labels).sum())
            delta = shift.delta if config.loss == "bco" else 0.0  # frozen for the whole window
            step_loss, rewards = 0.0, []
            for batch in window:
                b = batch.to(device)
                policy = completion_logps(model, b.input_ids, b.attention_mask, b.completion_mask, config.logprob_chunk)
                result = bco_loss(policy, ref_train[batch.index].to(device), b.labels, delta, config.beta, n_up, n_down)
                result.loss.backward()
                step_loss += result.loss.item()
                rewards.append(result.rewards.cpu())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            rewards_t = torch.cat(rewards)
            if config.loss == "bco":
                shift.update(rewards_t, labels)

            tokens = sum(b.tokens for b in window)
            run_tokens += tokens
            seconds = time.perf_counter() - step_start
            loss_value = step_loss
            record = {
                "step": step,
                "epoch": round(step / steps_per_epoch, 4),
                "loss": step_loss,
                "delta": delta,
                "reward_up": float(rewards_t[labels].mean()) if n_up else None,
                "reward_down": float(rewards_t[~labels].mean()) if n_down else None,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": tokens,
                "tokens_per_s": tokens / seconds,
                "elapsed_s": time.perf_counter() - started,
            }
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if progress:
                progress.update(task, advance=1, loss=step_loss, delta=delta, tps=tokens / seconds)

        elapsed = time.perf_counter() - started
        final_delta = shift.delta if config.loss == "bco" else 0.0
        figures: dict = {}
        if eval_enc:
            policy_eval = dataset_logps(model, eval_enc, config.batch_size, pad_id, device, config.logprob_chunk)
            eval_rewards = implicit_rewards(policy_eval, ref_eval, config.beta)
            eval_labels = torch.tensor([e.label for e in eval_enc])
            figures = held_out_figures(eval_rewards, eval_labels, final_delta)
            metrics_file.write(json.dumps({"split": "eval", "step": total_steps, "delta": final_delta, **figures}) + "\n")

    save_adapter(model, tokenizer, out / "adapter", shift)
    return RunResult(
        output=out,
        steps=total_steps,
        elapsed_s=elapsed,
        tokens_per_s=run_tokens / elapsed if elapsed else 0.0,
        final_loss=loss_value,
        peak_memory_mb=peak_memory_mb(device),
        eval=figures,
        notes=notes,
    )


def save_adapter(model, tokenizer, folder: Path, shift: RewardShift) -> None:
    """adapter/ written into a temporary folder and renamed: never half a folder that looks finished."""
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "reward_shift.json").write_text(json.dumps(shift.state_dict()), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
