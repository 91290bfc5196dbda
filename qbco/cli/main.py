"""The qbco command line: each command parses its flags, calls one library function and prints what it returns.
What imports torch (the model, training, eval and export layers) is imported inside the commands that need it,
not here: `qbco --help` and `qbco CMD --help` must not wait seconds for it."""

from __future__ import annotations

import inspect
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
from rich.text import Text

from qbco.cli import tables
from qbco.cli.allocator import active, restart_under_mimalloc
from qbco.cli.flags import train_options
from qbco.common.errors import QbcoError, TrainingStopped
from qbco.common.launcher import launched_rank
from qbco.common.signals import Terminated, interrupt_on_term
from qbco.data import binarize as binarizer
from qbco.data.registry import listing
from qbco.run.config import build_config, choose_recipe, resume_overrides_help, shipped_recipes

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
        with interrupt_on_term():  # SIGTERM is Ctrl-C: qbco.common.signals
            yield
    except QbcoError as err:  # escaped: a message may hold brackets ("pip install 'qbco[eval]'") that are not markup
        rank = launched_rank()
        console.print(f"[bold red]error:[/] {f'rank {rank}: ' if rank else ''}{escape(str(err))}", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt as stop:  # eval, score, merge, generate, plot (train reports its own)
        what = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
        console.print(f"[bold yellow]interrupted:[/] {what}: stopped; every output is written whole or not at all, so "
                      "nothing half-written is left under its name", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


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
    """The training bar's loss, delta and tokens/s; a wait's tokens/s where it says them (eval --generate's
    answering); nothing on the other bars."""

    def render(self, task) -> Text:
        f = task.fields
        if "loss" in f:
            return Text(f"loss {f['loss']:.4f}  delta {f['delta']:+.4f}  {f['tps']:.0f} tok/s")
        return Text(f"{f['tps']:.1f} tok/s" if "tps" in f else "")


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


def train(**flags) -> None:
    """Align a model on binary feedback with BCO: 4-bit base, LoRA adapters, reference = adapters off."""
    recipe, resume, overwrite, quiet = (flags.pop(k) for k in ("recipe", "resume", "overwrite", "quiet"))
    given = {name: value for name, value in flags.items() if value is not None}  # the settings typed on the line
    restart_under_mimalloc()  # before anything is loaded: qbco.cli.allocator says why
    with user_errors():
        if resume is None:
            recipe_file, matched = choose_recipe(recipe, flags["model"], flags["data"], flags["loss"])
            config = build_config(recipe_file, **given)  # a mistake in a flag or recipe fails here, before torch loads
            if matched and quiet:  # what was applied is said even under --quiet, on stderr
                print(f"qbco: {matched}", file=sys.stderr)
            elif matched:
                _log(matched)
        _quiet_libraries()
        from qbco.run.folder import resume_config  # torch: see the module's docstring
        from qbco.train.loop import train as run_training

        if resume is not None:
            # Only run.config.RESUME_OVERRIDES may be given (--lr, as the NaN stop advises); others are refused.
            config = resume_config(resume, recipe=recipe, **given)
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
    if quiet:
        print(result.output, file=sys.stdout)
    else:
        Console().print(tables.train_table(result, config, active()))


# `qbco train`'s flags: one per TrainConfig field (qbco.cli.flags), then those of the command itself.
_config_options = train_options()
train.__signature__ = inspect.Signature([
    *_config_options[:2],
    inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
        None, help=f"A YAML recipe file, a shipped recipe's name ({', '.join(shipped_recipes())}) or 'none'. "
                   "Without it, the shipped recipe written for this --model and --data is applied when there is one. "
                   "Flags override a recipe.")),
    *_config_options[2:],
    inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
        None, help=f"Continue an interrupted run from its last checkpoint, with the settings it was started with; only "
                   f"{resume_overrides_help()} may be given with it (recorded in the run's config).")),
    inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--overwrite", help="Replace the run that --output already holds.")),
    inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--quiet", help="No progress bar or summary table; for scripts.")),
])
app.command()(train)


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
    layout: Optional[str] = typer.Option(None, help=f"How the input is laid out: {', '.join(binarizer.layout_names())} (default: told from the columns; docs/data.md)."),
    pairs: bool = typer.Option(False, "--pairs", help="Rows with prompt, chosen, rejected: chosen -> thumbs-up, rejected -> thumbs-down."),
    pairs_from_scores: bool = typer.Option(False, "--pairs-from-scores", help="Scored rows sharing a prompt: the higher score -> thumbs-up, the lower -> thumbs-down; ties dropped."),
    dpo_prompts_only: bool = typer.Option(False, "--dpo-prompts-only", help="Keep only prompts whose responses form a preference pair (scores differ), as the paper did to compare with DPO."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first defective row (empty, missing or non-numeric score, duplicate) instead of dropping it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
) -> None:
    """Turn published feedback (scores, pairs, transcripts, ratings, votes, thumbs exports) into the thumbs-up/down rows `qbco train` reads."""
    with user_errors():
        if pairs and pairs_from_scores:
            raise QbcoError("--pairs and --pairs-from-scores exclude each other; pick one")
        mode = "pairs" if pairs else "pairs-from-scores" if pairs_from_scores else None  # None: the layout's own
        options = binarizer.Options(
            mode=mode, layout=layout, score_column=score, threshold=threshold,
            scale=binarizer.parse_scale(scale) if scale is not None else None,
            prompt_column=prompt_column, response_column=response_column,
            dpo_prompts_only=dpo_prompts_only, strict=strict,
        )
        summary = binarizer.binarize(input, output, options, fmt=format, overwrite=overwrite)
    if summary.mostly_dropped:  # the first line printed, before the table
        console.print(f"[bold yellow]warning:[/] {escape(summary.mostly_dropped)}", highlight=False, soft_wrap=True)
    Console().print(tables.binarize_table(summary))


@app.command("datasets")
def datasets_() -> None:
    """List the names `qbco train --data` accepts besides local files."""
    Console().print(tables.datasets_table(listing()))


@app.command("eval")
def eval_(
    run_dir: Path = typer.Argument(..., help="A finished run folder (what qbco train wrote)."),
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
        from qbco.eval.evaluate import evaluate
        from qbco.eval.generate import Sampling

        if batch_size is not None and batch_size < 1:
            raise QbcoError(f"--batch-size must be >= 1 (got {batch_size})")
        if max_prompts is not None and max_prompts < 1:
            raise QbcoError(f"--max-prompts must be >= 1 (got {max_prompts})")
        sampling = Sampling(max_new_tokens=max_new_tokens).validate() if generate else None
        _quiet_libraries()
        with _progress() as progress:
            report = evaluate(run_dir, data=data, slice_by=slice_by, batch_size=batch_size, log=_log, progress=progress,
                              generate=sampling, max_prompts=max_prompts)
    Console().print(tables.eval_table(report))
    if generate:
        Console().print(tables.generation_table(report))
    for path in report["files"]:
        console.print(f"wrote {path}", highlight=False)


@app.command()
def score(
    target: Path = typer.Argument(..., help="A finished run folder, or a folder written by qbco merge (it names the run and the base, the reference)."),
    data: str = typer.Option(..., help="Rows to score: a .jsonl/.json/.csv/.tsv/.parquet file with prompt, completion (label optional), or 'demo' / a registered name (every row)."),
    output: Path = typer.Option(..., "--output", "-o", help="JSON lines to write, one per row; with labels OUTPUT.summary.json goes next to it."),
    batch_size: Optional[int] = typer.Option(None, help="Rows per scoring batch. (default: the run's batch size)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
) -> None:
    """Score rows with a run: policy and reference log-probs, r, r - delta and calibrated p_up per row."""
    restart_under_mimalloc()
    with user_errors():
        from qbco.eval.score import score_file

        _quiet_libraries()
        with _progress() as progress:
            summary = score_file(target, data, output, batch_size=batch_size, overwrite=overwrite, progress=progress, log=_log)
    if summary["figures"]:
        Console().print(tables.score_table(summary))
    for path in summary["files"]:
        console.print(f"wrote {path}", highlight=False)


@app.command()
def plot(
    run_dir: Path = typer.Argument(..., help="A run folder (finished or still training)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG to write. (default: RUN_DIR/metrics.png)"),
) -> None:
    """Draw a run's metrics as PNG: loss, delta, thumbs-up/down rewards and tokens/s per step."""
    with user_errors():
        from qbco.eval.plot import training_curves

        path = training_curves(run_dir, output)
    console.print(f"wrote {path}", highlight=False)


@app.command()
def merge(
    run_dir: Path = typer.Argument(..., help="A finished qbco run."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write: a standard Hugging Face model (safetensors, config, tokenizer, README); with --gguf, OUTPUT/OUTPUT-TYPE.gguf, an Ollama Modelfile and a README."),
    dtype: str = typer.Option("auto", help="Weights of the merged model: auto (the smallest of bf16, fp16, fp32 within --max-gap), bf16, fp16 or fp32. Never 4-bit: it rounds the update away."),
    gguf: Optional[str] = typer.Option(None, "--gguf", help="Write one GGUF file instead (llama.cpp, LM Studio, Ollama): f16, bf16, q8_0 or q4_0; Llama (SmolLM2, Llama 3) and Qwen2 bases. Read back by transformers and checked like the safetensors merge (docs/merge.md)."),
    max_gap: Optional[float] = typer.Option(None, "--max-gap", help="Fail (nothing written) when OUTPUT's mean |delta log p| per completion token against the trained model exceeds this, in nats (its worst row: 4 times this; and OUTPUT must keep at least half of the trained model's own gap to its base). (default: 0.05; with --gguf the type's: f16 and bf16 0.05, q8_0 0.1, q4_0 0.6)"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when there is one); --device cpu merges a model too big for the GPU in RAM."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists (only a model folder)."),
) -> None:
    """Merge a run's LoRA adapter and save a model that loads without peft and answers like the trained one."""
    with user_errors():
        _quiet_libraries()
        if gguf is not None:
            if dtype != "auto":
                raise QbcoError("--dtype sets the safetensors merge's weights; --gguf TYPE sets the GGUF file's: drop one")
            from qbco.export.gguf import merge_gguf

            with _progress() as progress:
                result = merge_gguf(run_dir, output, gguf, max_gap=max_gap, overwrite=overwrite, device=device, log=_log,
                                    progress=progress)
            Console().print(tables.gguf_table(result))
            return
        from qbco.export.merge import DEFAULT_MAX_GAP
        from qbco.export.merge import merge as run_merge

        max_gap = DEFAULT_MAX_GAP if max_gap is None else max_gap
        with _progress() as progress:
            result = run_merge(run_dir, output, dtype=dtype, max_gap=max_gap, overwrite=overwrite, device=device,
                               log=_log, progress=progress)
    Console().print(tables.merge_table(result))


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
    rank_by: Optional[str] = typer.Option(None, "--rank-by", help="With --best-of: per-token (r / answer tokens) or sum (r, which favours long answers). Default: the one docs/score.md measured to pick right answers more often."),
) -> None:
    """Answer prompts with a tuned model, and with --compare its base too, side by side."""
    if best_of is not None or output is not None or rank_by is not None:
        return _best_of(target, prompt, data, limit, compare, best_of, output, rank_by,
                        sampling_args=dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed))
    with user_errors():
        _quiet_libraries()
        from qbco.eval.generate import Sampling, read_prompts
        from qbco.eval.generate import generate as run_generate

        prompts = read_prompts(prompt, data, limit)
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        answers, kind = run_generate(target, prompts, sampling, compare=compare)
    Console().print(tables.answers_table(answers, target, kind, sampling, compare))


def _best_of(target, prompt, data, limit, compare, n, output, rank_by, sampling_args) -> None:
    """qbco generate --best-of N: N sampled answers per prompt, the best by the run's reward (--rank-by) shown."""
    with user_errors():
        from qbco.eval.generate import RANK_BY, RANKINGS, Sampling, best_of, read_prompts, write_candidates

        if n is None:
            raise QbcoError("--output and --rank-by go with --best-of N; give --best-of")
        if rank_by is not None and rank_by not in RANKINGS:
            raise QbcoError(f"--rank-by must be one of {', '.join(RANKINGS)} (got {rank_by!r})")
        if compare:
            raise QbcoError("--best-of and --compare exclude each other; pick one")
        if output is not None and output.exists():
            raise QbcoError(f"{output} exists; choose another --output")
        _quiet_libraries()
        prompts = read_prompts(prompt, data, limit)
        sampling = Sampling(**sampling_args)
        results, kind = best_of(target, prompts, n, sampling, rank_by=rank_by or RANK_BY)
        if output is not None:
            write_candidates(results, output)
    Console().print(tables.best_of_table(results, target, kind, sampling, n))
    if output is not None:
        console.print(f"wrote {output} ({sum(len(r.answers) for r in results)} candidates)", highlight=False)
