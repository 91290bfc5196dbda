"""The training loop. `train` reads top to bottom: prepare the run (qbco/train/prepare.py), then one
`optimizer_step` per window of rows, each giving one line of the metrics log, then the held-out figures, the
adapter and the calibration. What a loss computes is the objective's business (qbco/reward/objectives.py),
never the loop's."""

from __future__ import annotations

import math
import resource
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from qbco.common.errors import TrainingStopped
from qbco.common.launcher import launched_rank
from qbco.common.progress import Wait
from qbco.common.signals import interrupt_on_term
from qbco.data.encoding import Encoded, collate
from qbco.model.logprobs import completion_logps, dataset_logps
from qbco.model.lora import reference
from qbco.model.memory import Plan, out_of_memory_message
from qbco.reward.calibration import Calibration, calibrate_held_out
from qbco.reward.loss import implicit_rewards
from qbco.reward.metrics import held_out_figures as held_out_record
from qbco.reward.objectives import MicroBatch
from qbco.run.config import TrainConfig
from qbco.run.folder import RunFolder
from qbco.train.checkpoint import rng_state
from qbco.train.prepare import Run, prepare_run
from qbco.train.report import Reported, check_trackers


@dataclass
class RunResult:
    output: Path
    steps: int
    elapsed_s: float
    tokens_per_s: float
    final_loss: float | None
    peak_memory_mb: float  # the largest of the ranks'
    eval: dict = field(default_factory=dict)
    recompute: Plan | None = None  # the layers recomputed in backward (--gradient-checkpointing)
    calibration: Calibration | None = None  # the Platt scale of p_up, saved in the run folder
    processes: str = "1"  # how many processes trained it, and how (Parallel.describe)


def train(config: TrainConfig, progress=None, log=print, resume: str | Path | None = None, overwrite: bool = False) -> RunResult:
    """Run one training run as `config` says, or continue the run at `resume`; returns what the summary shows.
    Under torchrun or accelerate launch this is one rank of several (qbco/train/distributed.py): only rank 0 logs,
    shows progress and writes. SIGTERM is Ctrl-C in every phase (the reference pass keeps its finished part; the
    steps stop after the current one with a checkpoint)."""
    with interrupt_on_term():
        return _train(config, progress, log, resume, overwrite)


def _train(config: TrainConfig, progress, log, resume: str | Path | None, overwrite: bool) -> RunResult:
    if launched_rank() != 0:
        progress, log = None, lambda message: None
    check_trackers(config.report_to if config is not None else "none")  # a missing package fails before anything loads
    run = prepare_run(config, log, resume, overwrite, progress)
    config, out, loss, tokens = run.config, run.out, None, 0
    task = progress.add_task("training", total=run.total_steps, completed=run.start_step, loss=float("nan"),
                             delta=run.shift.delta, tps=0.0) if progress else None
    run.started = time.perf_counter()
    with metrics_writer(run, log) as metrics, StopSignals(log) as signals:
        for step in range(run.start_step + 1, run.total_steps + 1):
            step_start = time.perf_counter()
            window = next(run.windows)
            rng = rng_state()  # dropout's draws in a step that fails must not count: they are drawn again
            try:
                figures = optimizer_step(run, window)
            except NonFinite as bad:  # nothing was updated: the state before this step is the last good one
                raise TrainingStopped(bad.message(run, step, window, kept=run.checkpoint(step - 1, rng)), exit_code=3) from None
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
                raise out_of_memory(err, run, step) from None
            seconds = time.perf_counter() - step_start
            loss, tokens = figures["loss"], tokens + figures["tokens"]
            metrics.write({"step": step, "epoch": round(step / run.steps_per_epoch, 4), **figures,
                           "tokens_per_s": figures["tokens"] / seconds, "elapsed_s": run.elapsed()})
            if figures["skipped"]:
                log(f"step {step}: fp16 gradients overflowed; step skipped, loss scale lowered to {figures['loss_scale']:g}")
            if progress:
                progress.update(task, advance=1, loss=loss, delta=figures["delta"], tps=figures["tokens"] / seconds)
            stop = run.parallel.any(signals.requested)  # every rank stops after the same step
            if step % config.save_every == 0 or step == run.total_steps or stop:
                kept = run.checkpoint(step)
            if stop and step < run.total_steps:
                raise TrainingStopped(f"{signals.requested or 'a signal to another process'} at step {step} of "
                                      f"{run.total_steps}: checkpoint written to {kept}. Continue with: "
                                      f"{resume_command(run)} --resume {out}", exit_code=130)
        elapsed = run.elapsed()
        held_out, margins = held_out_figures(run, progress)
        if held_out:
            metrics.write({"split": "eval", "step": run.total_steps, "delta": run.shift.delta, **held_out})
    save_final_adapter(run)
    calibration = None
    if run.parallel.main:  # rank 0's to write
        calibration = calibrate_held_out(margins, [e.label for e in run.eval_rows], f"held-out part of {config.data}")
        RunFolder(out).save_calibration(calibration)
    return RunResult(output=out, steps=run.total_steps, elapsed_s=elapsed,
                     tokens_per_s=tokens / (time.perf_counter() - run.started) if tokens else 0.0,
                     final_loss=loss, peak_memory_mb=run.parallel.max(peak_memory_mb(run.device)), eval=held_out,
                     recompute=run.recompute, calibration=calibration, processes=run.parallel.describe())


def optimizer_step(run: Run, window: list[list[int]]) -> dict:
    """One optimizer step over a window of micro-batches: each one's loss against the window's frozen
    denominators and delta, backward; clip, step; then the reward shift's one update from every reward of the
    window (docs/pitfalls.md, 1). Returns the step's figures; raises NonFinite, with nothing updated, when the
    loss or the gradient norm is not finite. In fp16 the loss is scaled for backward; a step whose gradients
    overflowed is skipped (nothing updated, `skipped` true) and the scaler lowers its scale."""
    labels = torch.tensor([run.train_rows[i].label for rows in window for i in rows])  # every rank: the whole window's
    frozen = run.objective.window(labels, run.shift.delta)
    scaler = run.scaler  # fp16 only
    loss, outputs, par = 0.0, [], run.parallel
    mine = par.share(window)  # with one process: every micro-batch of the window
    for k, (rows, group, where) in enumerate(mine):
        with par.accumulating(last=k == len(mine) - 1):
            shared = () if par.world == 1 else (group, where)  # one process: the micro-step's rows are its own
            out = run.objective.loss(micro_batch(run, rows, *shared), frozen)
            scaled = out.loss * par.loss_scale if par.world > 1 else out.loss  # DDP / FSDP average over ranks
            (scaler.scale(scaled) if scaler else scaled).backward()
        loss += out.loss.item()
        outputs.append(out)
    loss = par.sum(loss)  # the window's loss is the ranks' sum
    if scaler:
        scaler.unscale_(run.optimizer)
    grad_norm = par.clip_grad_norm(run.params, run.config.max_grad_norm)
    # Under a loss scaler, overflowed gradients of a finite loss are the scaler's to handle (it skips the step).
    if not math.isfinite(loss) or (not math.isfinite(grad_norm) and not scaler):
        run.optimizer.zero_grad(set_to_none=True)
        raise NonFinite("loss" if not math.isfinite(loss) else "gradient norm")
    lr = run.scheduler.get_last_lr()[0]
    skipped = False
    if scaler:
        scale = scaler.get_scale()
        scaler.step(run.optimizer)  # no update when unscale_ found inf gradients
        scaler.update()
        skipped = scaler.get_scale() < scale
    else:
        run.optimizer.step()
    if not skipped:  # a skipped step moves neither the schedule nor the reward shift
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    rewards = torch.cat([par.gather(o.rewards.cpu()) for o in outputs])  # the window's, in its rows' order
    if run.objective.shifts and not skipped:
        run.shift.update(rewards, labels)
    return {
        "loss": loss,
        "delta": frozen.delta,
        "reward_up": float(rewards[labels].mean()) if labels.any() else None,
        "reward_down": float(rewards[~labels].mean()) if (~labels).any() else None,
        "lr": lr,
        "grad_norm": None if skipped else grad_norm,
        "tokens": sum(len(run.train_rows[i]) for rows in window for i in rows),
        "skipped": skipped,
        **({"loss_scale": scaler.get_scale()} if scaler else {}),
        **run.objective.record(outputs, par.sum),
    }


def micro_batch(run: Run, rows: list[int], group: list[int] | None = None, mine: slice | None = None) -> MicroBatch:
    """The policy's log-probs of these training rows (with gradient), beside their cached reference log-probs.
    `group` is the micro-step's rows across all ranks, group[mine] == rows (default, one process: rows itself)."""
    b = collate(run.train_rows, rows, run.tokenizer.pad_token_id).to(run.device)
    # Under DDP through its wrapper: it syncs the gradients of what its forward computed.
    logps = run.parallel.ddp if run.parallel.ddp is not None else partial(completion_logps, run.model)
    policy = logps(b.input_ids, b.attention_mask, b.completion_mask, run.config.logprob_chunk)
    group, mine = (rows, slice(0, len(rows))) if group is None else (group, mine)
    mismatched = mismatched_logps(run, group, mine) if run.objective.needs_mismatched else None
    return MicroBatch(policy, run.ref_train[rows].to(run.device), b.labels, mismatched, b.completion_mask.sum(1))


def mismatched_logps(run: Run, group: list[int], mine: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO's KL estimate inputs, without gradients: each prompt of the micro-step with the next row's
    completion (as TRL pairs them), under the policy and under the reference. A rank computes the pairs of
    its rows and gets every rank's, so the estimate is the whole micro-step's mean, as in one process."""
    encoded = run.train_rows
    shifted = [
        Encoded(encoded[group[k]].prompt_ids, encoded[group[(k + 1) % len(group)]].completion_ids, encoded[group[k]].label,
                False, False)
        for k in range(mine.start, mine.stop)
    ]
    b = collate(shifted, list(range(len(shifted))), run.tokenizer.pad_token_id).to(run.device)
    chunk = run.config.logprob_chunk
    with torch.no_grad():
        policy = completion_logps(run.model, b.input_ids, b.attention_mask, b.completion_mask, chunk)
    with reference(run.model):
        ref = completion_logps(run.model, b.input_ids, b.attention_mask, b.completion_mask, chunk)
    return run.parallel.gather(policy), run.parallel.gather(ref)


def held_out_figures(run: Run, progress=None) -> tuple[dict, torch.Tensor]:
    """eval_loss (BCO with the final delta, per-class means) and the share of held-out rows classified right
    by sign(r - delta), non-finite rewards counted apart (qbco.reward.metrics.held_out_figures); delta is 0
    for an objective that never shifts. Empty without held-out rows. Also
    every held-out row's r - delta, which the calibration is fit on."""
    if not run.eval_rows:
        return {}, torch.zeros(0)
    c = run.config
    policy = run.parallel.sharded(  # each rank its share of the rows
        run.eval_rows, lambda rows: dataset_logps(run.model, rows, c.batch_size, run.tokenizer.pad_token_id, run.device,
                                                  c.logprob_chunk, Wait(progress, "held-out evaluation", len(rows))))
    rewards = implicit_rewards(policy, run.ref_eval, c.beta)
    labels = torch.tensor([e.label for e in run.eval_rows])
    delta = run.shift.delta
    return held_out_record(rewards, labels, delta), rewards - delta  # non-finite rewards: counted, left out


def out_of_memory(err: BaseException, run: Run, step: int) -> TrainingStopped:
    """A step that ran out of memory stops with the flag to change (docs/pitfalls.md, 11), not a traceback;
    any other RuntimeError goes on as it was."""
    if isinstance(err, RuntimeError) and not isinstance(err, torch.OutOfMemoryError) and "can't allocate memory" not in str(err):
        raise err
    return TrainingStopped(out_of_memory_message(run.recompute, run.config, f"in step {step}"), exit_code=4)


class NonFinite(Exception):
    """A step whose loss or gradient norm is not finite (`what` says which)."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what

    def message(self, run: Run, step: int, window: list[list[int]], kept: Path) -> str:
        sources = ", ".join(run.train_rows[i].source for rows in window for i in rows)
        fp16 = "; in fp16 activations overflow sooner: --dtype fp32 (or bf16 where the GPU has it) avoids that" if run.scaler else ""
        return (f"step {step}: the {self.what} is not finite; stopped and kept the last good state in {kept}. "
                f"Try a lower --lr (now {run.config.lr:g}) or check the rows of this batch: {sources}{fp16}")


def save_final_adapter(run: Run) -> None:
    """The run's adapter, written by rank 0 (under FSDP from tensors every rank helped gather); every rank waits for it."""
    adapter = run.parallel.adapter_state(run.model)
    if run.parallel.main:
        RunFolder(run.out).save_adapter(run.model, run.tokenizer, run.shift, adapter)
    run.parallel.barrier()


def metrics_writer(run: Run, log=print):
    """The metrics log, written by rank 0 alone (the other ranks' records are the same), each record also sent to
    the trackers --report-to names (qbco/train/report.py)."""
    if not run.parallel.main:
        return NoMetrics()
    folder = RunFolder(run.out)
    return Reported(folder.metrics_writer(), folder, run.config, check_trackers(run.config.report_to), log)


class NoMetrics(nullcontext):
    def __enter__(self):
        return self

    def write(self, record: dict) -> None:
        pass


def resume_command(run: Run) -> str:
    """The command that continues the run: the same launcher and number of processes."""
    n = run.parallel.world
    return "qbco train" if n == 1 else f"torchrun --nproc-per-node {n} --no-python qbco train"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


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
