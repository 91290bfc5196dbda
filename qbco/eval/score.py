"""A finished run as a calibrated thumbs-up predictor: for each (prompt, completion) the policy's and the
reference's log-probs, the implicit reward r, r - delta and p_up = sigmoid(a (r - delta) + b) with the
run's Platt scale (qbco/reward/calibration.py). `Scorer` is the Python API for serving code; `score_file` is
`qbco score`. Log-probs come from qbco.model.logprobs.dataset_logps, rows from the one reader."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from qbco.common.errors import QbcoError
from qbco.common.files import write_temp
from qbco.common.progress import Wait
from qbco.data.binarize import summary_path
from qbco.data.encoding import encode_all
from qbco.data.feedback import Example, load_feedback, rows_to_examples
from qbco.data.reader import read_rows
from qbco.model.device import compute_dtype, default_device
from qbco.model.loading import dequantized_base, load_tokenizer
from qbco.model.logprobs import check_against_forward, dataset_logps
from qbco.model.lora import reference
from qbco.reward import calibration as calib
from qbco.reward import metrics
from qbco.reward.loss import implicit_rewards
from qbco.run.folder import MERGE_INFO, RunFolder, check_model_files, load_run, merge_info


@dataclass
class Scores:
    """Per-row arrays, in the order the rows were given. Log-probs are sums over completion tokens, in nats."""

    policy_logp: np.ndarray
    reference_logp: np.ndarray
    completion_tokens: np.ndarray
    reward: np.ndarray  # r = beta * (policy_logp - reference_logp)
    margin: np.ndarray  # r - delta
    p_up: np.ndarray  # the run's calibrated probability of a thumbs-up
    p_up_uncalibrated: np.ndarray  # sigmoid(r - delta)

    @property
    def reward_per_token(self) -> np.ndarray:
        """r / completion tokens (at least one): the length-fair reward for ranking answers of different lengths
        (qbco.eval.generate.pick_best)."""
        return self.reward / np.maximum(self.completion_tokens, 1)

    def row(self, i: int) -> dict:
        return {"policy_logp": float(self.policy_logp[i]), "reference_logp": float(self.reference_logp[i]),
                "completion_tokens": int(self.completion_tokens[i]), "reward": float(self.reward[i]),
                "reward_per_token": float(self.reward_per_token[i]),
                "reward_minus_delta": float(self.margin[i]), "p_up": float(self.p_up[i]),
                "p_up_uncalibrated": float(self.p_up_uncalibrated[i])}


class Scorer:
    """Scores completions with a run's implicit reward and calibrated p(up).

        from qbco import Scorer
        scorer = Scorer.load("runs/my-run")
        scorer.p_up(["What is 2 + 2?", "What is 2 + 2?"], ["4.", "Ask someone else."])   # array([0.9, 0.1])

    A run is loaded as it was trained (4-bit or float base + adapter; the reference is the same model with
    the adapter off), a merged folder as saved, with the base its merge record names as the reference.
    A prompt is text or a list of chat messages, formatted as in training; one prompt is paired with every
    completion.
    """

    def __init__(self, tokenizer, model, *, beta: float, delta: float, calibration: calib.Calibration,
                 max_prompt_length: int, max_completion_length: int, batch_size: int = 8, chunk: int | None = None,
                 reference_model=None, device: torch.device | None = None, kind: str = "run", config=None):
        self.tokenizer, self.model, self.reference_model = tokenizer, model, reference_model
        self.config = config  # the run's TrainConfig, when loaded from a run (or a merged folder's run)
        self.beta, self.delta, self.calibration = beta, delta, calibration
        self.max_prompt_length, self.max_completion_length = max_prompt_length, max_completion_length
        self.batch_size, self.chunk, self.kind = batch_size, chunk, kind
        self.device = device or next(model.parameters()).device

    @classmethod
    def load(cls, target: str | Path, device: torch.device | None = None, batch_size: int | None = None) -> "Scorer":
        """A run folder, or a folder written by `qbco merge` (whose run still holds beta, delta and calibration)."""
        if batch_size is not None and batch_size < 1:
            raise QbcoError(f"--batch-size must be >= 1 (got {batch_size})")
        path = Path(target).expanduser()
        run = RunFolder(path)
        device = device or default_device()
        meta = merge_info(path)
        if meta is not None and not run.holds_run():
            return cls._load_merged(path, meta, device, batch_size)
        if (path / "config.json").is_file() and not run.holds_run():
            raise QbcoError(f"{target} is a model folder without {MERGE_INFO}, so its reference (the base) is unknown; "
                            "score a qbco run or a folder written by qbco merge")
        config, tokenizer, model = load_run(path, device)  # a folder that is not a finished run is a one-line error
        return cls(tokenizer, model, beta=config.beta, delta=run.delta(config), calibration=run.calibration(),
                   max_prompt_length=config.max_prompt_length, max_completion_length=config.max_completion_length,
                   batch_size=batch_size or config.batch_size, chunk=config.logprob_chunk, device=device, config=config,
                   kind=f"run: {'4-bit' if config.load_in_4bit else 'float'} base + adapter; reference: adapter off")

    @classmethod
    def _load_merged(cls, folder: Path, meta: dict, device, batch_size: int | None) -> "Scorer":
        from transformers import AutoModelForCausalLM  # transformers' import costs seconds: only where a model loads

        run = RunFolder(meta.get("run", ""))
        if not run.holds_run():
            raise QbcoError(f"{folder}: the run it was merged from ({run}, named in {MERGE_INFO}) is gone; "
                            "its beta, delta and calibration are needed to score")
        config = run.config()
        dtype = compute_dtype("auto", device)
        remote = bool(meta.get("trust_remote_code", False))
        check_model_files(folder)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, trust_remote_code=remote)
        except OSError as err:
            raise QbcoError(f"cannot load the model in {folder}: {err}") from None
        model.to(device).eval()
        check_against_forward(model)  # as load_base does: a logit transform qbco does not apply is refused (docs/pitfalls.md, 15)
        reference_model = dequantized_base(config, device, dtype)
        return cls(load_tokenizer(str(folder), remote), model, beta=config.beta, delta=run.delta(config),
                   calibration=run.calibration(), max_prompt_length=config.max_prompt_length,
                   max_completion_length=config.max_completion_length, batch_size=batch_size or config.batch_size,
                   chunk=config.logprob_chunk, reference_model=reference_model, device=device, config=config,
                   kind=f"merged folder; reference: {meta.get('model')}, "
                        f"{'its NF4 weights dequantized' if config.load_in_4bit else 'its float weights'}")

    # ------------------------------------------------------------ scoring

    def encode(self, prompts, completions: Sequence[str]):
        """Encoded rows as in training (prompt cut from the left, completion ended by EOS, cut from the right)."""
        completions = list(completions)
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
            prompts = [prompts] * len(completions)  # one prompt (text or chat messages) for every completion
        prompts = list(prompts)
        if len(prompts) != len(completions):
            raise QbcoError(f"{len(prompts)} prompts for {len(completions)} completions; give one prompt or one per completion")
        return self.encode_examples([Example(p, c, None, f"row {i}") for i, (p, c) in enumerate(zip(prompts, completions), start=1)])

    def encode_examples(self, examples):
        # A row's label plays no part in its log-probs; an unlabelled one is encoded as a thumbs-down.
        rows = [replace(e, label=bool(e.label)) for e in examples]
        return encode_all(rows, self.tokenizer, self.max_prompt_length, self.max_completion_length)

    def score_encoded(self, encoded, on_rows: Callable[[int], None] | None = None) -> Scores:
        """Scores of encoded rows: one no-grad pass of the policy, one of the reference; `on_rows(done)` hears
        the rows done of both passes together (2 x rows in all), as a qbco.common.progress.Wait takes them."""
        args = (encoded, self.batch_size, self.tokenizer.pad_token_id, self.device, self.chunk)
        second = None if on_rows is None else (lambda done: on_rows(len(encoded) + done))
        policy = dataset_logps(self.model, *args, on_rows)
        if self.reference_model is None:
            with reference(self.model):
                ref = dataset_logps(self.model, *args, second)
        else:
            ref = dataset_logps(self.reference_model, *args, second)
        rewards = implicit_rewards(policy, ref, self.beta)
        margins = metrics.margins(rewards, self.delta)  # the arithmetic of training's held-out accuracy
        return Scores(policy.numpy().astype(np.float64), ref.numpy().astype(np.float64),
                      np.array([len(e.completion_ids) for e in encoded]), rewards.numpy().astype(np.float64),
                      margins.numpy().astype(np.float64), self.calibration.p_up(margins.numpy()),
                      metrics.p_up(rewards, self.delta))

    def score(self, prompts, completions: Sequence[str], on_rows=None) -> Scores:
        return self.score_encoded(self.encode(prompts, completions), on_rows)

    def rewards(self, prompts, completions: Sequence[str]) -> np.ndarray:
        """r = beta * (log pi_theta - log pi_ref) per completion."""
        return self.score(prompts, completions).reward

    def p_up(self, prompts, completions: Sequence[str]) -> np.ndarray:
        """The calibrated probability that each completion earns a thumbs-up."""
        return self.score(prompts, completions).p_up


# ---------------------------------------------------------------- qbco score


def read_rows_to_score(data: str):
    """(examples, what they are) from a file (prompt, completion; label optional) or a name ('demo', a
    registered dataset: every row of it, train and held-out). Read and checked as `qbco train` reads."""
    path = Path(data).expanduser()
    if path.is_file():
        return rows_to_examples(read_rows(path), str(path), labels=False), f"{path} (every row)"
    examples, _ = load_feedback(data, 0.0, 0)  # a fraction of 0 keeps every row; unknown names fail as in train
    return examples, f"{data} (every row)"


def held_out_sources(data: str, config) -> set[str] | None:
    """The rows of `data` that the run held out, when `data` is the run's own training data; else None."""
    same = data == config.data or (Path(data).expanduser().is_file() and Path(config.data).expanduser().is_file()
                                   and Path(data).expanduser().resolve() == Path(config.data).expanduser().resolve())
    if not same:
        return None
    return {e.source for e in load_feedback(data, config.eval_fraction, config.seed)[1]}


def check_output(output: Path, data: str, overwrite: bool) -> None:
    if output.exists() and Path(data).expanduser().exists() and output.resolve() == Path(data).expanduser().resolve():
        raise QbcoError(f"{output}: the output would replace the input; choose another -o")
    if output.is_dir():
        raise QbcoError(f"{output} is a folder; -o takes a .jsonl file")
    if output.exists() and not overwrite:
        raise QbcoError(f"{output} exists; pass --overwrite to replace it")


def score_file(target: str | Path, data: str, output: str | Path, batch_size: int | None = None, overwrite: bool = False,
               progress=None, log=print) -> dict:
    """Score every row of `data` with `target`; write one JSON line per row to `output` and, with labels,
    the classifier's figures to OUTPUT.summary.json. Every check of the input comes before the model loads,
    and both files appear whole or not at all. `progress` (the CLI's rich Progress, or None) shows the scoring."""
    output = Path(output).expanduser()
    check_output(output, data, overwrite)
    examples, described = read_rows_to_score(data)
    scorer = Scorer.load(target, batch_size=batch_size)
    log(f"{len(examples)} rows of {described}; {scorer.kind}; calibration: {scorer.calibration.describe()}")
    held = held_out_sources(data, scorer.config)
    encoded = scorer.encode_examples(examples)
    scores = scorer.score_encoded(encoded, Wait(progress, "scoring: policy, then reference", 2 * len(encoded)))

    lines = []
    for i, e in enumerate(examples):
        line = {"source": e.source, "label": e.label, **({"held_out": e.source in held} if held is not None else {}),
                **scores.row(i), "completion_cut": encoded[i].completion_cut}
        lines.append(json.dumps({**line, **{k: v for k, v in e.extra.items() if k not in line}}, ensure_ascii=False) + "\n")
    summary = summarise(examples, scores, held, scorer, described, str(target))
    output.parent.mkdir(parents=True, exist_ok=True)
    temps = [write_temp(output, lines)]
    try:
        files = [output]
        if summary["figures"]:
            temps.append(write_temp(summary_path(output), [json.dumps(summary, indent=2, allow_nan=False) + "\n"]))
            files.append(summary_path(output))
        for tmp, dst in zip(temps, files):
            os.replace(tmp, dst)
        if overwrite and not summary["figures"]:
            summary_path(output).unlink(missing_ok=True)  # a replaced OUTPUT's summary would describe other rows
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    summary["files"] = [str(f) for f in files]
    return summary


def labelled_figures(scores: Scores, labels: list, delta: float, index: list[int]) -> dict | None:
    """qbco eval's binary figures of p(up) = sigmoid(r - delta) on the labelled rows among `index`, with
    ECE, log-loss and Brier score of the calibrated p_up beside them; None without labelled rows."""
    rows = [i for i in index if labels[i] is not None]
    if not rows:
        return None
    y = np.array([labels[i] for i in rows], dtype=bool)
    binary = metrics.binary_figures(torch.from_numpy(scores.reward[rows]), y, delta)
    binary["calibrated"] = calib.figures(scores.p_up[rows], y)
    return binary


def summarise(examples, scores: Scores, held: set[str] | None, scorer: Scorer, described: str, target: str) -> dict:
    labels = [e.label for e in examples]
    everything = list(range(len(examples)))
    figures = {"all": labelled_figures(scores, labels, scorer.delta, everything)}
    if held is not None and figures["all"] is not None:
        figures["held_out"] = labelled_figures(scores, labels, scorer.delta, [i for i, e in enumerate(examples) if e.source in held])
    return {"target": target, "data": described, "kind": scorer.kind, "rows": len(examples),
            "labelled": sum(label is not None for label in labels), "beta": scorer.beta, "delta": scorer.delta,
            "calibration": {**scorer.calibration.to_dict(), "description": scorer.calibration.describe()},
            "figures": {k: v for k, v in figures.items() if v is not None}}
