"""Everything a training run needs before its first step, in the order that keeps a user's mistakes cheap:
every check of their input before anything is written or loaded that takes long, then the model, the run
folder, the reference log-probs (one pass, cached on disk), the optimizer and, on --resume, the state to
continue from. `prepare_run` returns it all as one `Run`, which the loop in qbco/train.py steps through."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from qbco.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from qbco.config import TrainConfig, load_run_config, save_config
from qbco.data import Encoded, encode_all, epoch_order, load_feedback
from qbco.errors import QbcoError
from qbco.logprobs import reference_logps
from qbco.models import compute_dtype, default_device, load_policy, resolve_model
from qbco.objectives import Objective, build_objective
from qbco.refcache import cache_key
from qbco.run_folder import check_run_folder, default_output
from qbco.run_log import keep_steps
from qbco.shift import RewardShift


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
    windows: Iterator[list[list[int]]]  # every optimizer step's rows, cut into micro-batches
    scaler: torch.amp.GradScaler | None = field(init=False, default=None)  # fp16 only: see loss_scaler
    start_step: int = 0  # the step a resumed run continues after
    elapsed_before: float = 0.0  # training seconds before the resume
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.scaler = loss_scaler(compute_dtype(self.config.dtype, self.device), self.device)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def elapsed(self) -> float:
        """Training seconds of the whole run, across resumes."""
        return self.elapsed_before + time.perf_counter() - self.started

    def checkpoint(self, step: int) -> Path:
        return save_checkpoint(self.out, self.model, self.optimizer, self.scheduler, step, self.elapsed(),
                               self.shift.state_dict(), self.config.keep, self.scaler)


def prepare_run(config: TrainConfig, log=print, resume: str | Path | None = None, overwrite: bool = False) -> Run:
    """The run `config` describes, or the run at `resume` (with its own config.yaml) ready to continue."""
    config, out = run_folder(config, resume, overwrite)
    resolve_model(config.model)  # an unknown name fails here, before anything is loaded or written
    # Everything that can fail on the user's input fails before the run folder is touched.
    train_examples, eval_examples = load_feedback(config.data, config.eval_fraction, config.seed)
    objective = build_objective(config, train_examples)
    units = objective.units(train_examples)
    device = default_device()
    log_memory_estimate(config, device, log)

    torch.manual_seed(config.seed)  # the LoRA initialisation
    tokenizer, model, base_path = load_policy(config, device)
    train_rows, eval_rows = (encode_all(e, tokenizer, config.max_prompt_length, config.max_completion_length)
                             for e in (train_examples, eval_examples))
    describe_data(train_rows, eval_rows, log)
    if resume is None:
        publish(out, config)

    started = time.perf_counter()
    dtype = compute_dtype(config.dtype, device)
    ref_train, ref_eval = (
        reference_logps(model, rows, config.batch_size, tokenizer.pad_token_id, device, config.logprob_chunk,
                        cache_key(base_path, config.load_in_4bit, dtype, device, rows))
        for rows in (train_rows, eval_rows)
    )
    log(f"reference log-probs: {len(train_rows) + len(eval_rows)} rows in {time.perf_counter() - started:.1f}s "
        "(one pass, cached on disk)")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    steps_per_epoch = max(1, len(units) // (config.batch_size * config.grad_accum))  # partial windows dropped
    total_steps = math.ceil(config.epochs * steps_per_epoch)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    run = Run(config, out, device, tokenizer, model, objective, train_rows, eval_rows, ref_train, ref_eval,
              optimizer, schedule(optimizer, config.warmup_ratio, total_steps), RewardShift(config.ema_decay),
              steps_per_epoch, total_steps, step_windows(units, config))
    if resume is not None:
        restore(run, log)
    return run


def run_folder(config: TrainConfig, resume, overwrite: bool) -> tuple[TrainConfig, Path]:
    """(config, run folder): a new run's folder, checked; or a run to resume, with the config it was started with."""
    if resume is None:
        out = Path(config.output) if config.output else default_output(config)
        check_run_folder(out, overwrite)
        return config, out
    out = Path(resume)
    if not (out / "config.yaml").is_file():
        raise QbcoError(f"--resume {out}: no qbco run there (config.yaml missing)")
    if not checkpoint_dirs(out):
        raise QbcoError(f"--resume {out}: the run has no complete checkpoint to continue from; start it again")
    return load_run_config(out / "config.yaml"), out


def publish(out: Path, config: TrainConfig) -> None:
    """The run folder, with the resolved config; one already there holds a run that --overwrite replaces."""
    import shutil

    if out.exists():
        shutil.rmtree(out)  # check_run_folder let only an empty folder or a run with --overwrite through
    out.mkdir(parents=True)
    save_config(config, out / "config.yaml")


def describe_data(train_rows: list[Encoded], eval_rows: list[Encoded], log) -> None:
    ups = sum(e.label for e in train_rows)
    log(f"data: {len(train_rows)} train rows ({ups / len(train_rows):.0%} thumbs-up), {len(eval_rows)} held out")
    cut_p = sum(e.prompt_cut for e in train_rows + eval_rows)
    cut_c = sum(e.completion_cut for e in train_rows + eval_rows)
    if cut_p or cut_c:
        log(f"truncated: {cut_p} prompts (from the left), {cut_c} completions (from the right)")


def log_memory_estimate(config: TrainConfig, device, log) -> None:
    """One line before loading: what the run will need and which flag shrinks what (docs/pitfalls.md, 11)."""
    from transformers import AutoConfig

    from qbco.memory import estimate

    try:
        hf_config = AutoConfig.from_pretrained(resolve_model(config.model), trust_remote_code=config.trust_remote_code)
        log(estimate(hf_config, config, compute_dtype(config.dtype, device).itemsize).line(config))
    except (OSError, AttributeError, TypeError):  # no config reachable, or not a llama-style decoder: no estimate
        pass


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


def step_windows(units: list[tuple[int, ...]], config: TrainConfig) -> Iterator[list[list[int]]]:
    """The rows of every optimizer step, epoch after epoch (each reshuffled), cut into micro-batches.

    A step's rows do not depend on how they are cut: batch 8 x accumulation 1 and batch 2 x accumulation 4
    see the same rows and make the same update. A micro-batch of pair units holds [chosen..., rejected...].
    """
    window = config.batch_size * config.grad_accum
    epoch = 0
    while True:
        for order in epoch_order(len(units), window, config.seed, epoch):
            micro = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
            yield [[row for part in zip(*(units[u] for u in m)) for row in part] for m in micro]
        epoch += 1


def restore(run: Run, log) -> None:
    """Continue from the run's last checkpoint: weights, optimizer, scheduler, RNG and reward shift restored,
    the data order advanced past the steps done (it is a pure function of (seed, epoch)), and the metrics
    log cut back to the checkpoint's step."""
    state = load_checkpoint(checkpoint_dirs(run.out)[-1], run.model, run.optimizer, run.scheduler, run.scaler)
    run.start_step, run.elapsed_before = state["step"], state["elapsed_s"]
    run.shift.load_state_dict(state["shift"])
    for _ in range(run.start_step):
        next(run.windows)
    keep_steps(run.out / "metrics.jsonl", run.start_step)
    log(f"resumed {run.out} at step {run.start_step} of {run.total_steps}")
