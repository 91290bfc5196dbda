"""Everything a training run needs before its first step, in the order that keeps a user's mistakes cheap:
every check of their input before anything is written or loaded that takes long, then the model, the run
folder, the reference log-probs (one pass, cached on disk in parts), the optimizer and, on --resume, the state
to continue from, once the inputs are known to be those the checkpoint recorded and the flags to be those a
resume may change. `prepare_run` returns it all as one `Run`, which the loop in qbco/train/loop.py steps through."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from qbco.common.errors import QbcoError, TrainingStopped
from qbco.common.progress import Wait
from qbco.data.encoding import Encoded, encode_all, epoch_order
from qbco.data.feedback import check_data_source, load_feedback
from qbco.model.device import compute_dtype
from qbco.model.loading import load_policy, load_tokenizer, parameter_count
from qbco.model.logprobs import reference_logps
from qbco.model.memory import Plan, plan
from qbco.model.names import cache_dir, resolve_model
from qbco.model.recompute import apply_recompute
from qbco.model.refcache import ReferenceInterrupted, cache_key
from qbco.reward.objectives import Objective, build_objective
from qbco.reward.shift import RewardShift
from qbco.run.config import RESUME_OVERRIDES, TrainConfig, changed_settings, resume_overrides_help
from qbco.run.folder import RunFolder, checkpoint_record, default_output
from qbco.train.checkpoint import (
    check_inputs,
    checkpoint_world,
    data_fingerprint,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
    saved_inputs,
)
from qbco.train.distributed import Parallel


@dataclass
class Run:
    """A prepared run: what the loop reads and updates, step after step."""

    config: TrainConfig
    out: Path
    device: torch.device
    tokenizer: object
    model: torch.nn.Module  # the PeftModel; the reference is the same model with its adapters disabled
    objective: Objective
    train_rows: list[Encoded]
    eval_rows: list[Encoded]
    ref_train: torch.Tensor  # [rows] reference log-probs of every training row, computed once
    ref_eval: torch.Tensor
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    shift: RewardShift
    steps_per_epoch: int
    total_steps: int
    windows: Iterator[list[list[int]]]  # every optimizer step's rows, cut into micro-batches (rank after rank)
    scaler: torch.amp.GradScaler | None = field(init=False, default=None)  # fp16 only: see loss_scaler
    parallel: Parallel = field(default_factory=Parallel)  # this process among the run's processes
    start_step: int = 0  # the step a resumed run continues after
    elapsed_before: float = 0.0  # training seconds before the resume
    started: float = field(default_factory=time.perf_counter)
    inputs: dict = field(default_factory=dict)  # the fingerprint every checkpoint records (train/checkpoint.py)
    recompute: Plan | None = None  # the layers recomputed in backward (--gradient-checkpointing), the budget, the estimate

    def __post_init__(self):
        self.scaler = loss_scaler(compute_dtype(self.config.dtype, self.device), self.device)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def elapsed(self) -> float:
        """Training seconds of the whole run, across resumes."""
        return self.elapsed_before + time.perf_counter() - self.started

    def checkpoint(self, step: int, rng: dict | None = None) -> Path:
        """RUN/checkpoints/step-N; `rng`: the RNG state to record when it is not now's (a failed step's)."""
        return save_checkpoint(self.out, self.model, self.optimizer, self.scheduler, step, self.elapsed(),
                               self.shift.state_dict(), self.config.keep, self.inputs, rng, self.scaler, self.parallel)


def prepare_run(config: TrainConfig | None, log=print, resume: str | Path | None = None, overwrite: bool = False,
                progress=None, parallel: Parallel | None = None) -> Run:
    """The run `config` describes, or the run at `resume` ready to continue: with its own saved config, but for
    the settings run.config.RESUME_OVERRIDES lets a resume change (`config` carries them; None changes nothing).
    `progress` (the CLI's rich Progress, or None) shows the reference pass. `parallel`: this process among
    several under a launcher (qbco/train/distributed.py); default: the launcher's."""
    config, out, changes = open_run(config, resume, overwrite)
    parallel = parallel or Parallel.from_env(config.fsdp)
    if parallel.fsdp and not config.fsdp:  # asked for by accelerate's FSDP config: the run's config says so
        config = dataclasses.replace(config, fsdp=True)
    checkpoints = RunFolder(out).checkpoints() if resume is not None else []
    since = checkpoints[-1] if checkpoints else None
    saved = saved_inputs(since) if since else {}
    check_data_source(config.data)  # a typo fails here, before a model is converted or loaded
    resolve_model(config.model, log)  # an unknown name fails here, before anything is loaded or written
    # Everything that can fail on the user's input fails before the run folder is touched (and, with several
    # processes, on every rank before any of them joins the process group).
    train_examples, eval_examples = load_feedback(config.data, config.eval_fraction, config.seed)
    inputs = data_fingerprint(train_examples, eval_examples)
    check_inputs(out, since, saved, inputs)  # before the model loads: an edited file is refused at once
    objective = build_objective(config, train_examples)
    units = objective.units(train_examples)
    asked = config  # the settings as given: auto ones are said once the model's size is known
    config = config.sized(rows=len(units))  # auto epochs: from the file's size (run.config.auto_epochs)
    check_processes(parallel, config, units, out, since)
    steps_per_epoch, total_steps = step_counts(config, len(units), parallel.world)
    done = checkpoint_record(since)["step"] if since is not None else 0
    if done > total_steps:
        raise QbcoError(f"--resume {out}: the run is at step {done}, past the {total_steps} steps that --max-steps / "
                        "--epochs now allow; give more")
    device = parallel.device()
    if parallel.fsdp and compute_dtype(config.dtype, device) == torch.float16:
        # fp16's GradScaler would see only this rank's gradient shard: ranks could skip different steps
        raise QbcoError("--fsdp trains in bf16 or fp32, not fp16 (its loss scaler's overflow check would see one "
                        "rank's shard of the gradients); use --dtype bf16 (or fp32), or DDP without --fsdp")
    # The rows' token lengths plan activation recompute; planned here, before the model loads, the one memory line
    # is the estimate the run then uses (docs/pitfalls.md, 11).
    tokenizer = load_tokenizer(resolve_model(config.model), config.trust_remote_code)
    train_rows, eval_rows = (encode_all(e, tokenizer, config.max_prompt_length, config.max_completion_length)
                             for e in (train_examples, eval_examples))
    planned = memory_plan(config, device, train_rows + eval_rows, log)

    parallel.start(device)
    out = parallel.same(out)  # a default folder is named by the clock: rank 0's
    if parallel.world > 1:
        log(f"processes: {parallel.describe()}; each step's {config.batch_size * config.grad_accum * parallel.world} "
            f"rows cut into {config.batch_size} per process and micro-step")
    torch.manual_seed(config.seed)  # the LoRA initialisation
    tokenizer, model, base_path = load_policy(config, device)
    parameters = parameter_count(model)
    config = config.sized(parameters=parameters)  # auto lr: from the model's size (run.config.auto_lr)
    if asked.lr is None or asked.epochs is None:
        log(asked.sized_line(len(units), parameters))
    dtype = compute_dtype(config.dtype, device)
    inputs |= model_fingerprint(train_rows, eval_rows, base_path, config.load_in_4bit, dtype)
    check_inputs(out, since, saved, inputs, log)  # a library upgraded under the run: a warning naming it
    describe_data(train_rows, eval_rows, log)
    recompute = apply_recompute(model, config, train_rows + eval_rows, device, planned)  # k from the longest rows
    if resume is None and parallel.main:
        RunFolder(out).publish(config)
    parallel.wrap(model, device)

    ref_train, ref_eval = reference_pass(model, tokenizer, train_rows, eval_rows, config, base_path, dtype, device, out,
                                         since, log, progress, parallel)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    run = Run(config, out, device, tokenizer, model, objective, train_rows, eval_rows, ref_train, ref_eval,
              optimizer, schedule(optimizer, config.warmup_ratio, total_steps), RewardShift(config.ema_decay),
              steps_per_epoch, total_steps, step_windows(units, config, parallel.world), inputs=inputs,
              recompute=recompute, parallel=parallel)
    if resume is not None:
        restore(run, since, changes, log)
    return run


def open_run(config: TrainConfig | None, resume, overwrite: bool) -> tuple[TrainConfig, Path, dict]:
    """(config, run folder, settings changed on resume): a new run's folder, checked; or a run to resume, with
    the config it was started with and the overrides `config` brings (only run.config.RESUME_OVERRIDES)."""
    if resume is None:
        out = Path(config.output) if config.output else default_output(config)
        RunFolder(out).check_new(overwrite, config)
        return config, out, {}
    out = Path(resume)
    if overwrite:
        raise QbcoError(f"--overwrite has no effect with --resume: --resume continues {out}, --overwrite would replace "
                        "it; drop one")
    folder = RunFolder(out)
    if not folder.holds_run():
        raise QbcoError(f"--resume {out}: no qbco run there ({folder.config_file.name} missing)")
    saved = folder.config()
    changes = changed_settings(saved, config) if config is not None else {}
    fixed = [k for k in changes if k not in RESUME_OVERRIDES]
    if fixed:
        name = fixed[0]
        raise QbcoError(f"--resume continues a run with its own {folder.config_file.name}; --{name.replace('_', '-')} "
                        f"cannot change ({changes[name][0]!r} there, {changes[name][1]!r} given; flags allowed with "
                        f"--resume: {resume_overrides_help()})")
    return (config if changes else saved), out, changes


def step_counts(config: TrainConfig, units: int, world: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the run): partial windows (batch x accumulation x processes) are
    dropped; --max-steps caps the total."""
    per_epoch = max(1, units // (config.batch_size * config.grad_accum * world))
    total = math.ceil(config.epochs * per_epoch)
    return per_epoch, total if config.max_steps is None else min(total, config.max_steps)


def check_processes(parallel: Parallel, config: TrainConfig, units: list, out: Path, since: Path | None) -> None:
    """Under a launcher: a resumed run keeps its number of processes (`since`: its last checkpoint), and every
    rank needs a full share of a window (the step's rows are cut into equal per-rank micro-batches)."""
    if since is not None:
        parallel.check_resume(str(out), checkpoint_world(since))
    window = config.batch_size * config.grad_accum * parallel.world
    if parallel.world > 1 and len(units) < window:
        raise QbcoError(f"{config.data}: {len(units)} training units are fewer than one step's window of {window} "
                        f"(batch size {config.batch_size} x accumulation {config.grad_accum} x {parallel.world} processes); "
                        "lower --batch-size or use fewer processes")


def reference_pass(model, tokenizer, train_rows, eval_rows, config, base_path, dtype, device, out, since, log, progress=None,
                   parallel: Parallel | None = None):
    """The reference log-probs of the training and held-out rows (one pass each, cached on disk in parts), on
    one progress bar. Ctrl-C keeps the finished part in the cache and stops with a message that says so and how
    to go on (`since`: the checkpoint a resumed run continues from, which stays as it was)."""
    started, done, values = time.perf_counter(), 0, []
    wait = Wait(progress, "reference log-probs", len(train_rows) + len(eval_rows))
    for rows in (train_rows, eval_rows):
        key = cache_key(base_path, config.load_in_4bit, dtype, device, rows)
        try:
            values.append(reference_logps(model, rows, config.batch_size, tokenizer.pad_token_id, device,
                                          config.logprob_chunk, key, wait.after(done), parallel))
        except ReferenceInterrupted as cut:
            total = len(train_rows) + len(eval_rows)
            raise TrainingStopped(
                f"interrupted in the reference pass: the reference log-probs of {done + cut.done} of {total} rows are "
                f"kept in {cache_dir() / 'reference'}; "
                + (f"the run's checkpoint {since.name} is as it was. Continue with: qbco train --resume {out}" if since else
                   f"the run has no checkpoint yet. Run the same command again, or qbco train --resume {out}, to continue "
                   "from them"), exit_code=130) from None
        done += len(rows)
    log(f"reference log-probs: {done} rows in {time.perf_counter() - started:.1f}s (one pass, cached on disk)")
    return values


def describe_data(train_rows: list[Encoded], eval_rows: list[Encoded], log) -> None:
    ups = sum(e.label for e in train_rows)
    log(f"data: {len(train_rows)} train rows ({ups / len(train_rows):.0%} thumbs-up), {len(eval_rows)} held out")
    cut_p = sum(e.prompt_cut for e in train_rows + eval_rows)
    cut_c = sum(e.completion_cut for e in train_rows + eval_rows)
    if cut_p or cut_c:
        log(f"truncated: {cut_p} prompts (from their earliest turns; the template's head and the final turn kept), "
            f"{cut_c} completions (from the right)")


def memory_plan(config: TrainConfig, device, rows: list[Encoded], log) -> Plan | None:
    """The run's recompute plan from the model's config and the longest of `rows`, and its one line, before the
    model loads: what the run will need at the layers it will recompute, and which flag shrinks what
    (docs/pitfalls.md, 11). None, and no line, where no config is reachable or it is not a llama-style decoder."""
    from transformers import AutoConfig  # transformers' import costs seconds; here only when a run starts

    longest = max((len(e) for e in rows), default=config.max_prompt_length + config.max_completion_length)
    try:
        hf_config = AutoConfig.from_pretrained(resolve_model(config.model), trust_remote_code=config.trust_remote_code)
        chosen = plan(hf_config, config, compute_dtype(config.dtype, device).itemsize, longest, device)
    except (OSError, AttributeError, TypeError):
        return None
    log(chosen.estimate.line(config, chosen.every_n, chosen.budget))
    return chosen


def loss_scaler(dtype: torch.dtype, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 training always gets a loss scaler: the loss is multiplied up before backward so that small
    gradients do not flush to zero in fp16's narrow range, and a step whose gradients overflowed is skipped and
    the scale lowered (the loop logs it). bf16 has fp32's range and fp32 needs none."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def schedule(optimizer, warmup_ratio: float, total_steps: int):
    """Linear warm-up over the first warmup_ratio of the steps, then linear decay to 0."""
    warmup = int(warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup)),
    )


def step_windows(units: list[tuple[int, ...]], config: TrainConfig, world: int = 1) -> Iterator[list[list[int]]]:
    """The rows of every optimizer step, epoch after epoch (each reshuffled), cut into micro-batches.

    A step's rows do not depend on how they are cut: batch 8 x accumulation 1 and batch 2 x accumulation 4
    see the same rows and make the same update, and so do 2 processes x batch 4 (a window is batch x
    accumulation x world units; its micro-batches are ordered micro-step after micro-step, rank after rank,
    so one process's micro-batch m of batch 8 is the two ranks' micro-batches m). A micro-batch of pair
    units holds [chosen..., rejected...]: a pair stays whole on one rank.
    """
    window = config.batch_size * config.grad_accum * world
    epoch = 0
    while True:
        for order in epoch_order(len(units), window, config.seed, epoch):
            micro = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
            yield [[row for part in zip(*(units[u] for u in m)) for row in part] for m in micro]
        epoch += 1


def restore(run: Run, since: Path | None, changes: dict, log) -> None:
    """Continue from the run's last checkpoint (`since`; None: the run had none, so it starts at step 0):
    weights, optimizer, scheduler, RNG and reward shift restored, the data order advanced past the steps done
    (it is a pure function of (seed, epoch)), the metrics log cut back to the checkpoint's step, and each
    override recorded in the run's config."""
    folder = RunFolder(run.out)
    if run.parallel.main:
        folder.remove_leftovers()
    if since is not None:
        state = load_checkpoint(since, run.model, run.optimizer, run.scheduler, run.scaler, run.parallel)
        run.start_step, run.elapsed_before = state["step"], state["elapsed_s"]
        run.shift.load_state_dict(state["shift"])
        if changes.keys() & {"lr", "max_steps", "epochs"}:
            reschedule(run.optimizer, run.scheduler, run.config.lr)
    for _ in range(run.start_step):
        next(run.windows)
    if run.parallel.main:
        folder.keep_steps(run.start_step)
    said = ""
    if changes:
        said = ", ".join(f"{k} {new!r} (was {old!r})" for k, (old, new) in changes.items())
        if run.parallel.main:
            folder.save_config(run.config, folder.config_notes() + [f"--resume at step {run.start_step}: {said}"])
        said = f"; changed: {said}"
    log(f"resumed {run.out} at step {run.start_step} of {run.total_steps}{said}")


def reschedule(optimizer, scheduler, lr: float) -> None:
    """A new peak learning rate, or a new number of steps, from the restored step on: the schedule's base and
    the learning rate of the next step follow (LambdaLR keeps neither in a form that would)."""
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
