"""The training loop: data, reference log-probs once, then per optimizer step policy log-probs, BCO loss,
backward, step, reward-shift update, log, checkpoint. A reader should find every step of the algorithm here."""

from __future__ import annotations

import json
import math
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qbco.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from qbco.config import TrainConfig, load_run_config, save_config
from qbco.data import Encoded, collate, encode_all, epoch_order, load_feedback
from qbco.errors import QbcoError
from qbco.logprobs import completion_logps, dataset_logps, reference_logps
from qbco.loss import bco_loss, dpo_loss, implicit_rewards, kto_loss
from qbco.models import (
    compute_dtype,
    default_device,
    load_policy,
    reference,
    resolve_model,
)
from qbco.refcache import cache_key
from qbco.run_folder import check_output, default_output, keep_metrics, save_adapter
from qbco.shift import RewardShift


class TrainingStopped(Exception):
    """Training stopped before its last step (a signal, or a non-finite loss); a checkpoint was kept.
    `exit_code` is what the CLI exits with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


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


def log_memory_estimate(config: TrainConfig, device, log) -> None:
    """One line before loading: what the run will need and which flag shrinks what (PITFALLS 11)."""
    from transformers import AutoConfig

    from qbco.memory import estimate

    try:
        hf_config = AutoConfig.from_pretrained(resolve_model(config.model), trust_remote_code=config.trust_remote_code)
        log(estimate(hf_config, config, compute_dtype(config.dtype, device).itemsize).line(config))
    except (OSError, AttributeError, TypeError):  # no config reachable, or not a llama-style decoder: no estimate
        pass


def training_units(config: TrainConfig, rows: list) -> list[tuple[int, ...]]:
    """What one 'row' of the step order is: a row index, or for dpo a (chosen, rejected) pair of rows that
    share a prompt (every thumbs-up x thumbs-down combination). --balance oversample repeats randomly drawn
    minority-class rows until both classes are as many."""
    import random

    if config.loss == "dpo":
        groups: dict[str, tuple[list[int], list[int]]] = {}
        for i, e in enumerate(rows):
            groups.setdefault(e.prompt_key, ([], []))[0 if e.label else 1].append(i)
        pairs = [(w, l) for ups, downs in groups.values() for w in ups for l in downs]
        if not pairs:
            raise QbcoError(f"{config.data}: --loss dpo needs pairs (rows that share a prompt, one of each label); found none")
        return pairs
    units = [(i,) for i in range(len(rows))]
    if config.balance == "oversample":
        ups = [u for u in units if rows[u[0]].label]
        downs = [u for u in units if not rows[u[0]].label]
        small, big = sorted((ups, downs), key=len)
        if small:
            units += random.Random(config.seed).choices(small, k=len(big) - len(small))
    return units


class StopSignals:
    """SIGINT / SIGTERM: the first asks the loop to stop after the current step; a second exits at once."""

    def __init__(self, log):
        self.requested, self.log, self.previous = None, log, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt  # the last complete checkpoint stays as it was: writes are atomic
        self.requested = signal.Signals(signum).name
        self.log(f"{self.requested}: finishing this step, then writing a checkpoint (again to exit at once)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(config: TrainConfig, progress=None, log=print, resume: str | Path | None = None, overwrite: bool = False) -> RunResult:
    """Run one BCO (or BCE) training run as `config` says, or continue `resume`; returns what the summary shows."""
    device = default_device()
    if resume is not None:
        out = Path(resume)
        if not (out / "config.yaml").is_file():
            raise QbcoError(f"--resume {out}: no qbco run there (config.yaml missing)")
        config = load_run_config(out / "config.yaml")
        if not checkpoint_dirs(out):
            raise QbcoError(f"--resume {out}: the run has no complete checkpoint to continue from; start it again")
    else:
        out = Path(config.output) if config.output else default_output(config)
        check_output(out, overwrite)
    resolve_model(config.model)  # an unknown name fails here, before anything is loaded or written

    # Everything that can fail on the user's input fails before the run folder is touched.
    train_rows, eval_rows = load_feedback(config.data, config.eval_fraction, config.seed)
    ups = sum(e.label for e in train_rows)
    if config.loss == "bco" and ups in (0, len(train_rows)) and not config.allow_one_class:
        only = "thumbs-up" if ups else "thumbs-down"
        raise QbcoError(f"{config.data}: every training row is {only}; BCO's delta needs both classes "
                        "(--allow-one-class trains anyway)")
    units = training_units(config, train_rows)
    log_memory_estimate(config, device, log)
    torch.manual_seed(config.seed)
    tokenizer, model, base_path = load_policy(config, device)
    pad_id = tokenizer.pad_token_id
    train_enc = encode_all(train_rows, tokenizer, config.max_prompt_length, config.max_completion_length)
    eval_enc = encode_all(eval_rows, tokenizer, config.max_prompt_length, config.max_completion_length)
    notes = [f"data: {len(train_enc)} train rows ({ups / len(train_enc):.0%} thumbs-up), {len(eval_enc)} held out"]
    cut_p, cut_c = sum(e.prompt_cut for e in train_enc + eval_enc), sum(e.completion_cut for e in train_enc + eval_enc)
    if cut_p or cut_c:
        notes.append(f"truncated: {cut_p} prompts (from the left), {cut_c} completions (from the right)")
    for note in notes:
        log(note)

    if resume is None:
        if out.exists():
            shutil.rmtree(out)  # --overwrite was checked above
        out.mkdir(parents=True)
        save_config(config, out / "config.yaml")

    t0 = time.perf_counter()
    dtype = compute_dtype(config.dtype, device)
    ref_train, ref_eval = (
        reference_logps(model, enc, config.batch_size, pad_id, device, config.logprob_chunk,
                        cache_key(base_path, config.load_in_4bit, dtype, device, enc))
        for enc in (train_enc, eval_enc)
    )
    log(f"reference log-probs: {len(train_enc) + len(eval_enc)} rows in {time.perf_counter() - t0:.1f}s (one pass, cached on disk)")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, len(units) // (config.batch_size * config.grad_accum))  # partial windows dropped
    total_steps = math.ceil(config.epochs * steps_per_epoch)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup = int(config.warmup_ratio * total_steps)
    # Linear warm-up, then linear decay to 0.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup))
    )
    shift = RewardShift(config.ema_decay)
    windows = step_windows(len(units), config)
    share_up = ups / len(train_rows)
    # --balance weight: bco/bce divide each class sum by its expected count in the window (dataset share x
    # window size) instead of the window's own count; kto weights the minority class up (lambda_D n_D = lambda_U n_U).
    lambda_d = max(1.0, (1 - share_up) / share_up) if config.balance == "weight" and 0 < share_up else 1.0
    lambda_u = max(1.0, share_up / (1 - share_up)) if config.balance == "weight" and share_up < 1 else 1.0
    start_step, elapsed_before = 0, 0.0
    if resume is not None:
        state = load_checkpoint(checkpoint_dirs(out)[-1], model, optimizer, scheduler)
        start_step, elapsed_before = state["step"], state["elapsed_s"]
        shift.load_state_dict(state["shift"])
        for _ in range(start_step):  # the data order is a pure function of (seed, epoch): skip what was done
            next(windows)
        keep_metrics(out / "metrics.jsonl", start_step)
        log(f"resumed {out} at step {start_step} of {total_steps}")

    def checkpoint(step: int) -> Path:
        return save_checkpoint(out, model, optimizer, scheduler, step, elapsed_before + time.perf_counter() - started,
                               shift.state_dict(), config.keep)

    loss_value, run_tokens = None, 0
    started = time.perf_counter()
    task = progress.add_task("training", total=total_steps, completed=start_step, loss=float("nan"), delta=shift.delta, tps=0.0) if progress else None

    with open(out / "metrics.jsonl", "a", encoding="utf-8") as metrics_file, StopSignals(log) as signals:
        for step in range(start_step + 1, total_steps + 1):
            step_start = time.perf_counter()
            window = [[i for part in zip(*(units[u] for u in micro)) for i in part] for micro in next(windows)]
            # dpo rows are [chosen..., rejected...]; every other loss has one row per unit
            labels = torch.tensor([train_enc[i].label for rows in window for i in rows])
            window_rows = len(labels)
            n_up, n_down = int(labels.sum()), int((~labels).sum())
            # the class means' denominators: the window's own counts, or with --balance weight the expected ones
            per_class = (window_rows * share_up, window_rows * (1 - share_up)) if config.balance == "weight" else (n_up, n_down)
            delta = shift.delta if config.loss == "bco" else 0.0  # frozen for the whole window
            step_loss, rewards, kl = 0.0, [], []
            for rows in window:
                b = collate(train_enc, rows, pad_id).to(device)
                policy = completion_logps(model, b.input_ids, b.attention_mask, b.completion_mask, config.logprob_chunk)
                ref = ref_train[rows].to(device)
                if config.loss in ("bco", "bce"):
                    result = bco_loss(policy, ref, b.labels, delta, config.beta, *per_class)
                    loss = result.loss
                elif config.loss == "kto":
                    kl_policy, kl_ref = mismatched_logps(model, train_enc, rows, pad_id, device, config.logprob_chunk)
                    result = kto_loss(policy, ref, b.labels, kl_policy, kl_ref, config.beta, lambda_d, lambda_u)
                    loss = result.loss * len(rows) / window_rows  # the batch mean becomes the window's mean
                    kl.append(float(result.kl))
                else:  # dpo
                    p = len(rows) // 2
                    result = dpo_loss(policy[:p], ref[:p], policy[p:], ref[p:], config.beta)
                    loss = result.loss * len(rows) / window_rows
                loss.backward()
                step_loss += loss.item()
                rewards.append(result.rewards.cpu())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                kept = checkpoint(step - 1)  # the weights before this step are the last good ones
                sources = ", ".join(train_enc[i].source for rows in window for i in rows)
                raise TrainingStopped(
                    f"step {step}: the {'loss' if not math.isfinite(step_loss) else 'gradient norm'} is not finite; "
                    f"stopped and kept the last good state in {kept}. Try a lower --lr (now {config.lr:g}) or check "
                    f"the rows of this batch: {sources}",
                    exit_code=3,
                )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            rewards_t = torch.cat(rewards)
            if config.loss == "bco":
                shift.update(rewards_t, labels)

            tokens = sum(len(train_enc[i]) for rows in window for i in rows)
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
                "elapsed_s": elapsed_before + time.perf_counter() - started,
            }
            if config.loss == "kto":
                record["kl"] = sum(kl) / len(kl)  # KTO's z_ref (nats per sequence, clamped at 0)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if progress:
                progress.update(task, advance=1, loss=step_loss, delta=delta, tps=tokens / seconds)
            if step % config.save_every == 0 or step == total_steps or signals.requested:
                kept = checkpoint(step)
            if signals.requested and step < total_steps:
                raise TrainingStopped(
                    f"{signals.requested} at step {step} of {total_steps}: checkpoint written to {kept}. "
                    f"Continue with: qbco train --resume {out}",
                    exit_code=130,
                )

        elapsed = elapsed_before + time.perf_counter() - started
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
        tokens_per_s=run_tokens / (time.perf_counter() - started) if run_tokens else 0.0,
        final_loss=loss_value,
        peak_memory_mb=peak_memory_mb(device),
        eval=figures,
        notes=notes,
    )


def mismatched_logps(model, encoded: list[Encoded], rows: list[int], pad_id: int, device, chunk: int):
    """KTO's KL estimate inputs, without gradients: each prompt of the batch with the next row's completion
    (as TRL pairs them), under the policy and under the reference."""
    shifted = [
        Encoded(encoded[i].prompt_ids, encoded[rows[(k + 1) % len(rows)]].completion_ids, encoded[i].label, False, False)
        for k, i in enumerate(rows)
    ]
    b = collate(shifted, list(range(len(shifted))), pad_id).to(device)
    with torch.no_grad():
        policy = completion_logps(model, b.input_ids, b.attention_mask, b.completion_mask, chunk)
    with reference(model):
        ref = completion_logps(model, b.input_ids, b.attention_mask, b.completion_mask, chunk)
    return policy, ref
