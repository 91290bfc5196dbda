"""The qbco command line: each command parses its flags, builds its config and calls one function."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from qbco.allocator import active, restart_under_mimalloc
from qbco.distributed import launched_rank
from qbco.errors import QbcoError

app = typer.Typer(
    help="qbco: align a 4-bit LLM with LoRA + BCO on thumbs-up / thumbs-down feedback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@contextmanager
def user_errors():
    """A QbcoError is one red line and exit code 2, never a traceback (on every rank under a launcher, the
    others' lines naming their rank: one rank's own problem, a file missing on one node, is seen too)."""
    try:
        yield
    except QbcoError as err:  # escaped: a message may hold brackets ("pip install 'qbco[eval]'") that are not markup
        rank = launched_rank()
        console.print(f"[bold red]error:[/] {f'rank {rank}: ' if rank else ''}{escape(str(err))}", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(2) from None


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*kernels.*")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, not the user's concern
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "no `kernels` package": the fallback is correct
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class _StepFigures(ProgressColumn):
    """The training bar's loss, delta and tokens/s; nothing on the bars of the waits around it."""

    def render(self, task) -> Text:
        f = task.fields
        return Text(f"loss {f['loss']:.4f}  delta {f['delta']:+.4f}  {f['tps']:.0f} tok/s" if "loss" in f else "")


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _StepFigures(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def _log(message) -> None:
    console.print(message, highlight=False)


def _run(run_training, config, quiet: bool, resume, overwrite: bool):
    """The training run, under rich progress bars unless quiet."""
    if quiet:
        return run_training(config, progress=None, log=lambda message: None, resume=resume, overwrite=overwrite)
    with _progress() as progress:
        return run_training(config, progress=progress, log=_log, resume=resume, overwrite=overwrite)


@app.callback()
def main() -> None:
    """qbco: align a 4-bit LLM with LoRA + BCO on thumbs-up / thumbs-down feedback."""


@app.command()
def train(
    model: Optional[str] = typer.Option(None, help="Model: smollm2-135m (offline), qwen2.5-3b, qwen2.5-7b, llama-3.2-3b, llama-3.1-8b, a local folder or a hub id. (default: smollm2-135m)"),
    data: Optional[str] = typer.Option(None, help="Feedback: 'demo' (bundled), a registered name (qbco datasets) or a .jsonl/.json/.csv/.tsv/.parquet file with prompt, completion, label. (default: demo)"),
    recipe: Optional[str] = typer.Option(None, help="A YAML recipe file, a shipped recipe's name (qwen2.5-3b-helpsteer2, smollm2-135m-demo) or 'none'. Without it, the shipped recipe written for this --model and --data is applied when there is one. Flags override a recipe."),
    output: Optional[str] = typer.Option(None, help="Run folder. (default: runs/<model>-<data>-<timestamp>)"),
    loss: Optional[str] = typer.Option(None, help="bco (reward shift delta, Eq. 7), bce (delta fixed at 0), kto (Ethayarajh et al. 2024) or dpo (pairs of rows sharing a prompt). (default: bco)"),
    balance: Optional[str] = typer.Option(None, help="Class imbalance: none (BCO's per-class means already weigh both classes equally), oversample (repeat minority-class rows, as the paper did for HelpSteer2) or weight (class weights from the dataset's shares; see docs/data.md). (default: none)"),
    beta: Optional[float] = typer.Option(None, help="Reward scale beta in r = beta * log(pi/pi_ref). (default: 0.1)"),
    sft_weight: Optional[float] = typer.Option(None, help="Add this times the per-token NLL of the thumbs-up completions to the loss, so that good answers gain likelihood (RPO; docs/results.md). 0 is the paper's loss. (default: 0)"),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate of the LoRA weights (AdamW). (default: 3e-4)"),
    epochs: Optional[float] = typer.Option(None, help="Passes over the training rows (fractions allowed). (default: 1)"),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps. (default: all epochs)"),
    batch_size: Optional[int] = typer.Option(None, help="Rows per micro-batch. (default: 8)"),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step. (default: 1)"),
    max_prompt_length: Optional[int] = typer.Option(None, help="Prompt tokens kept (cut from the left). (default: 256)"),
    max_completion_length: Optional[int] = typer.Option(None, help="Completion tokens kept (cut from the right). (default: 128)"),
    lora_r: Optional[int] = typer.Option(None, help="LoRA rank. (default: 16)"),
    lora_alpha: Optional[int] = typer.Option(None, help="LoRA alpha (scale alpha/r). (default: 32)"),
    lora_dropout: Optional[float] = typer.Option(None, help="LoRA dropout. (default: 0)"),
    lora_targets: Optional[str] = typer.Option(None, help="'all-linear' (every decoder linear layer) or names like q_proj,v_proj. (default: all-linear)"),
    eval_fraction: Optional[float] = typer.Option(None, help="Share of rows held out, split by prompt. (default: the data's own held-out part, else 0.1)"),
    ema_decay: Optional[float] = typer.Option(None, help="Decay of the per-class reward means behind delta. (default: 0.9)"),
    warmup_ratio: Optional[float] = typer.Option(None, help="Share of steps of linear learning-rate warm-up. (default: 0.1)"),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay of the LoRA weights. (default: 0)"),
    max_grad_norm: Optional[float] = typer.Option(None, help="Gradient norm clip per optimizer step. (default: 1.0)"),
    seed: Optional[int] = typer.Option(None, help="Seed for LoRA init, data order and splits. (default: 0)"),
    load_in_4bit: Optional[bool] = typer.Option(None, "--4bit/--no-4bit", help="Base in 4-bit NF4 (double quantization) or plain float. (default: 4bit)"),
    dtype: Optional[str] = typer.Option(None, help="Compute dtype: auto (bf16 on a GPU with native bf16, A100 / RTX 30xx and newer; fp16 with loss scaling on older ones, T4 / V100; fp32 on CPU), bf16, fp16 (always with loss scaling), fp32. (default: auto)"),
    gradient_checkpointing: Optional[str] = typer.Option(None, help="Recompute activations in backward: auto (every k-th decoder layer, k chosen from the memory estimate against --memory-budget: as few as fit), on (every layer, the least memory), off. (default: auto)"),
    memory_budget: Optional[float] = typer.Option(None, help="GiB that --gradient-checkpointing auto plans for. (default: the free GPU memory less 10% of the card; on a CPU a third of the available RAM, at most 2.5x the estimate with every layer checkpointed)"),
    logprob_chunk: Optional[int] = typer.Option(None, help="Completion tokens per LM-head chunk: bounds the logits memory. (default: 2^24 logits' worth, 341 tokens for a 49,152-token vocabulary)"),
    save_every: Optional[int] = typer.Option(None, help="Optimizer steps between checkpoints; one is always written at the end and on Ctrl-C. (default: 50)"),
    keep: Optional[int] = typer.Option(None, help="Checkpoints kept in RUN/checkpoints. (default: 2)"),
    allow_one_class: Optional[bool] = typer.Option(None, "--allow-one-class", help="Train BCO on data that holds only thumbs-up or only thumbs-down rows. (default: refuse)"),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Run the Python code a hub model ships. (default: off)"),
    fsdp: Optional[bool] = typer.Option(None, "--fsdp", help="Under torchrun or accelerate launch: shard the decoder layers over the processes with FSDP2 (for a base too big for one GPU) instead of a copy per process (DDP). See docs/distributed.md. (default: DDP)"),
    resume: Optional[Path] = typer.Option(None, help="Continue an interrupted run from its last checkpoint, with its own config.yaml; only --lr, --max-steps, --epochs, --save-every, --keep, --memory-budget, --gradient-checkpointing (recorded in config.yaml) and --quiet may be given with it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run that --output already holds."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or summary table; for scripts."),
) -> None:
    """Align a model on binary feedback with BCO: 4-bit base, LoRA adapters, reference = adapters off."""
    given = {name: value for name, value in locals().items() if value is not None and name not in ("quiet", "overwrite", "resume")}
    restart_under_mimalloc()  # before anything is loaded: qbco.allocator says why
    from qbco.config import build_config, choose_recipe, resume_config

    with user_errors():
        recipe_file, matched = choose_recipe(recipe, model, data) if resume is None else (None, None)
        # On --resume only config.RESUME_OVERRIDES may be given (--lr, as the NaN stop advises); others are refused.
        config = resume_config(resume, **given) if resume is not None else build_config(
            recipe_file,
            model=model, data=data, output=output, loss=loss, balance=balance, beta=beta, sft_weight=sft_weight, lr=lr, epochs=epochs, max_steps=max_steps,
            batch_size=batch_size, grad_accum=grad_accum, max_prompt_length=max_prompt_length,
            max_completion_length=max_completion_length, lora_r=lora_r, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, lora_targets=lora_targets, eval_fraction=eval_fraction, ema_decay=ema_decay,
            warmup_ratio=warmup_ratio, weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed,
            load_in_4bit=load_in_4bit, dtype=dtype, gradient_checkpointing=gradient_checkpointing, memory_budget=memory_budget,
            logprob_chunk=logprob_chunk, save_every=save_every, keep=keep, allow_one_class=allow_one_class,
            trust_remote_code=trust_remote_code, fsdp=fsdp,
        )
        if matched and not quiet:
            _log(matched)
        _quiet_libraries()
        from qbco.train import TrainingStopped
        from qbco.train import train as run_training

        main_rank = launched_rank() == 0  # under a launcher, rank 0 alone shows progress, messages and the summary
        try:
            result = _run(run_training, config, quiet or not main_rank, resume, overwrite)
        except TrainingStopped as stop:  # reported even with --quiet: it says how to go on
            if main_rank:
                console.print(f"[bold yellow]stopped:[/] {escape(str(stop))}", highlight=False, soft_wrap=True)
            raise typer.Exit(stop.exit_code) from None
        except KeyboardInterrupt:
            if main_rank:
                console.print("[bold yellow]interrupted:[/] exited at once; checkpoints are written whole, so the last "
                              "one is intact (qbco train --resume RUN continues from it, or from the start if none was "
                              "written)", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
    if not main_rank:
        return
    if not quiet:
        table = Table(title=f"qbco train: {result.output}", show_header=False)
        rows = [
            ("steps", str(result.steps)),
            ("processes", result.processes),
            ("time", f"{result.elapsed_s:.1f} s"),
            ("tokens/s", f"{result.tokens_per_s:.0f}"),
            ("peak memory", f"{result.peak_memory_mb:.0f} MiB"),
            ("checkpointing", result.checkpointing.summary() if result.checkpointing else f"{config.gradient_checkpointing} (no estimate for this model)"),
            ("allocator", active()),
            ("final loss", f"{result.final_loss:.4f}" if result.final_loss is not None else "-"),
            ("held-out reward accuracy", f"{result.eval['eval_reward_accuracy']:.3f}" if result.eval else "no held-out rows"),
            ("calibration (calibration.json)", result.calibration.describe() if result.calibration else "-"),
            # Answering the held-out prompts costs minutes on a CPU (docs/results.md), so training leaves it to eval.
            ("the answers, base vs tuned", f"qbco eval {result.output} --generate"),
        ]
        for name, value in rows:
            table.add_row(name, value)
        Console().print(table)
    else:
        print(result.output, file=sys.stdout)


@app.command()
def binarize(
    input: Path = typer.Argument(..., help="Feedback file: .csv, .tsv, .jsonl, .json or .parquet (by extension)."),
    output: Path = typer.Option(..., "--output", "-o", help="Thumbs-up/down rows to write (.jsonl); OUTPUT.summary.json goes next to it."),
    format: Optional[str] = typer.Option(None, "--format", help="Input format when the extension does not say: csv, tsv, jsonl, json, parquet."),
    score: Optional[str] = typer.Option(None, "--score", help="Score column (default: the first of helpfulness, score, rating)."),
    threshold: Optional[float] = typer.Option(None, help="A score >= threshold is thumbs-up (default: 4, HelpSteer2's mapping in the paper)."),
    scale: Optional[str] = typer.Option(None, help="MIN-MAX of the scores, e.g. 0-4; a score outside it is an error (default: inferred and printed)."),
    prompt_column: Optional[str] = typer.Option(None, help="Prompt column (default: prompt)."),
    response_column: Optional[str] = typer.Option(None, help="Response column (default: response, then completion)."),
    pairs: bool = typer.Option(False, "--pairs", help="Rows with prompt, chosen, rejected: chosen -> thumbs-up, rejected -> thumbs-down."),
    pairs_from_scores: bool = typer.Option(False, "--pairs-from-scores", help="Scored rows sharing a prompt: the higher score -> thumbs-up, the lower -> thumbs-down; ties dropped."),
    dpo_prompts_only: bool = typer.Option(False, "--dpo-prompts-only", help="Keep only prompts whose responses form a preference pair (scores differ), as the paper did to compare with DPO."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first defective row (empty, missing or non-numeric score, duplicate) instead of dropping it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
) -> None:
    """Turn Likert scores or chosen/rejected pairs into the thumbs-up/down rows `qbco train` reads."""
    from qbco import binarize as binarizer

    with user_errors():
        if pairs and pairs_from_scores:
            raise QbcoError("--pairs and --pairs-from-scores exclude each other; pick one")
        mode = "pairs" if pairs else "pairs-from-scores" if pairs_from_scores else "likert"
        options = binarizer.Options(
            mode=mode, score_column=score, threshold=threshold,
            scale=binarizer.parse_scale(scale) if scale is not None else None,
            prompt_column=prompt_column, response_column=response_column,
            dpo_prompts_only=dpo_prompts_only, strict=strict,
        )
        summary = binarizer.binarize(input, output, options, fmt=format, overwrite=overwrite)
    Console().print(binarizer.summary_table(summary))


@app.command("datasets")
def datasets_() -> None:
    """List the names `qbco train --data` accepts besides local files."""
    from qbco.registry import listing

    table = Table(title="qbco datasets: qbco train --data NAME")
    for column in ("name", "source (splits)", "thumbs-up / down", "description"):
        table.add_column(column, no_wrap=column == "name", overflow="fold")
    for row in listing():
        table.add_row(*row)
    Console().print(table)


@app.command("eval")
def eval_(
    run_dir: Path = typer.Argument(..., help="A finished run folder (config.yaml, adapter/)."),
    data: Optional[str] = typer.Option(None, help="Rows to score: a file (every row; prompt/completion/label or prompt/chosen/rejected) or a name (its held-out part). (default: the run's held-out part)"),
    slice_by: Optional[str] = typer.Option(None, help="Also report every figure per value of this column (e.g. task in the demo data)."),
    batch_size: Optional[int] = typer.Option(None, help="Rows per scoring batch. (default: the run's batch size)"),
    generate: bool = typer.Option(False, "--generate", help="Also answer the rows' prompts with base and tuned (greedy, seeded): RUN_DIR/eval/generations.jsonl, answer changes, rewards and task success where rows carry a check (docs/eval.md)."),
    max_new_tokens: int = typer.Option(128, help="With --generate: most tokens per answer."),
    max_prompts: Optional[int] = typer.Option(None, help="With --generate: answer only the first N distinct prompts. (default: all)"),
) -> None:
    """Score feedback with a run: classification, calibration, pairs, drift; writes RUN_DIR/eval/ (--data X: RUN_DIR/eval-X/)."""
    restart_under_mimalloc()
    with user_errors():
        from qbco.evaluate import evaluate, generation_table, summary_table
        from qbco.generate import Sampling

        if batch_size is not None and batch_size < 1:
            raise QbcoError(f"--batch-size must be >= 1 (got {batch_size})")
        if max_prompts is not None and max_prompts < 1:
            raise QbcoError(f"--max-prompts must be >= 1 (got {max_prompts})")
        sampling = Sampling(max_new_tokens=max_new_tokens).validate() if generate else None
        _quiet_libraries()
        with _progress() as progress:
            report = evaluate(run_dir, data=data, slice_by=slice_by, batch_size=batch_size, log=_log, progress=progress,
                              generate=sampling, max_prompts=max_prompts)
    Console().print(summary_table(report))
    if generate:
        Console().print(generation_table(report))
    for path in report["files"]:
        console.print(f"wrote {path}", highlight=False)


@app.command()
def score(
    target: Path = typer.Argument(..., help="A finished run folder (config.yaml, adapter/), or a folder written by qbco merge (its qbco_merge.json names the base, the reference)."),
    data: str = typer.Option(..., help="Rows to score: a .jsonl/.json/.csv/.tsv/.parquet file with prompt, completion (label optional), or 'demo' / a registered name (every row)."),
    output: Path = typer.Option(..., "--output", "-o", help="JSON lines to write, one per row; with labels OUTPUT.summary.json goes next to it."),
    batch_size: Optional[int] = typer.Option(None, help="Rows per scoring batch. (default: the run's batch size)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
) -> None:
    """Score rows with a run: policy and reference log-probs, r, r - delta and calibrated p_up per row."""
    restart_under_mimalloc()
    with user_errors():
        from qbco.score import score_file, summary_table

        _quiet_libraries()
        with _progress() as progress:
            summary = score_file(target, data, output, batch_size=batch_size, overwrite=overwrite, progress=progress, log=_log)
    if summary["figures"]:
        Console().print(summary_table(summary))
    for path in summary["files"]:
        console.print(f"wrote {path}", highlight=False)


@app.command()
def plot(
    run_dir: Path = typer.Argument(..., help="A run folder with metrics.jsonl (finished or still training)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG to write. (default: RUN_DIR/metrics.png)"),
) -> None:
    """Draw a run's metrics.jsonl as PNG: loss, delta, thumbs-up/down rewards and tokens/s per step."""
    with user_errors():
        from qbco.plot import training_curves

        path = training_curves(run_dir, output)
    console.print(f"wrote {path}", highlight=False)


@app.command()
def merge(
    run_dir: Path = typer.Argument(..., help="A finished qbco run (config.yaml + adapter/)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write: a standard Hugging Face model (safetensors, config, tokenizer, README)."),
    dtype: str = typer.Option("auto", help="Weights of the merged model: auto (the smallest of bf16, fp16, fp32 within --max-gap), bf16, fp16 or fp32. Never 4-bit: it rounds the update away."),
    max_gap: float = typer.Option(0.05, "--max-gap", help="Fail (nothing written) when OUTPUT's mean |delta log p| per completion token against the trained model exceeds this, in nats."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when there is one); --device cpu merges a model too big for the GPU in RAM."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists (only a model folder)."),
) -> None:
    """Merge a run's LoRA adapter and save a model that loads without peft and answers like the trained one."""
    with user_errors():
        _quiet_libraries()
        from qbco.merge import merge as run_merge

        with _progress() as progress:
            result = run_merge(run_dir, output, dtype=dtype, max_gap=max_gap, overwrite=overwrite, device=device,
                               log=_log, progress=progress)
    gap = result.gap
    table = Table(title=f"qbco merge: {result.output}", show_header=False)
    table.add_row("saved in", f"{result.dtype} ({result.size_bytes / 2**20:.0f} MiB of weights); the adapter merged in fp32")
    table.add_row("gap to the trained model", f"mean |delta log p| {gap.mean:.3g} nats/token, max {gap.max:.3g} "
                  f"({gap.tokens} tokens of {gap.rows} held-out rows; limit {result.max_gap:g}): [green]passed[/]")
    table.add_row("dtypes measured", ", ".join(f"{t.dtype} {t.mean:.3g}" for t in result.tried))
    Console().print(table)


@app.command()
def generate(
    target: str = typer.Argument(..., help="A qbco run folder (4-bit base + adapter) or a merged model folder."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="A prompt to answer (repeat for more)."),
    data: Optional[str] = typer.Option(None, help="Answer the prompts of a file with a prompt column, or 'demo' (its held-out prompts)."),
    limit: int = typer.Option(5, help="How many distinct prompts of --data to answer."),
    compare: bool = typer.Option(False, "--compare", help="Also answer with the base (adapters off) and show both side by side."),
    max_new_tokens: int = typer.Option(128, help="Most tokens generated per answer."),
    temperature: float = typer.Option(0.0, help="0 is greedy decoding; above 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling: keep the smallest set of tokens with this much probability."),
    seed: int = typer.Option(0, help="Seed for sampling (the same for base and tuned)."),
    best_of: Optional[int] = typer.Option(None, "--best-of", help="Sample N answers per prompt (needs --temperature > 0), score each with the run's reward and show the best."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="With --best-of: write every candidate, its reward and p_up to this .jsonl."),
) -> None:
    """Answer prompts with a tuned model, and with --compare its base too, side by side."""
    if best_of is not None or output is not None:
        return _best_of(target, prompt, data, limit, compare, best_of, output,
                        sampling_args=dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed))
    with user_errors():
        _quiet_libraries()
        from qbco.generate import Sampling, prompt_label, read_prompts
        from qbco.generate import generate as run_generate

        prompts = read_prompts(prompt, data, limit)
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        answers, kind = run_generate(target, prompts, sampling, compare=compare)
    table = Table(title=f"qbco generate: {target} ({kind})", caption=sampling.describe(), show_lines=True)
    table.add_column("prompt", overflow="fold", ratio=1)
    for column in (("base", "tuned") if compare else ("answer",)):
        table.add_column(column, overflow="fold", ratio=2)
    for answer in answers:
        table.add_row(prompt_label(answer.prompt), *((answer.base, answer.tuned) if compare else (answer.tuned,)))
    Console().print(table)


def _best_of(target, prompt, data, limit, compare, n, output, sampling_args) -> None:
    """qbco generate --best-of N: N sampled answers per prompt, the one with the highest reward shown."""
    with user_errors():
        from qbco.generate import Sampling, best_of, prompt_label, read_prompts, write_candidates

        if n is None:
            raise QbcoError("--output writes the candidates of --best-of N; give --best-of")
        if compare:
            raise QbcoError("--best-of and --compare exclude each other; pick one")
        if output is not None and output.exists():
            raise QbcoError(f"{output} exists; choose another --output")
        _quiet_libraries()
        prompts = read_prompts(prompt, data, limit)
        sampling = Sampling(**sampling_args)
        results, kind = best_of(target, prompts, n, sampling)
        if output is not None:
            write_candidates(results, output)
    table = Table(title=f"qbco generate --best-of {n}: {target} ({kind})", caption=sampling.describe(), show_lines=True)
    for column, ratio in (("prompt", 1), ("best answer", 2), ("reward / p_up", 1), (f"other {n - 1}: p_up", 1)):
        table.add_column(column, overflow="fold", ratio=ratio)
    for r in results:
        others = ", ".join(f"{p:.2f}" for k, p in enumerate(r.p_up) if k != r.best)
        table.add_row(prompt_label(r.prompt), r.answers[r.best], f"{r.rewards[r.best]:+.3f} / {r.p_up[r.best]:.2f}", others)
    Console().print(table)
    if output is not None:
        console.print(f"wrote {output} ({sum(len(r.answers) for r in results)} candidates)", highlight=False)
