"""`qbco eval`: score feedback rows with a finished run (one no-grad pass of the policy, one of the
reference) and write metrics.json, reliability.png and scores.jsonl (one line per row) into RUN/eval/ (the
run's held-out rows) or RUN/eval-NAME/ (`--data NAME`). With --generate also answer the rows' prompts with base
and tuned and write generations.jsonl there: how the answers changed, their rewards under the run and, where
rows carry a check (qbco.eval.tasks), task success."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch

from qbco.common.errors import QbcoError
from qbco.common.files import atomic_folder, write_text
from qbco.common.progress import Wait
from qbco.data.encoding import encode_all
from qbco.data.feedback import Example, load_feedback, prompt_pairs, rows_to_examples
from qbco.data.reader import read_rows
from qbco.eval.generate import RunModels, answer_both
from qbco.eval.plot import reliability_diagram
from qbco.eval.tasks import passes, row_check
from qbco.model.device import compute_dtype
from qbco.model.logprobs import dataset_logps, reference_logps
from qbco.model.names import resolve_model
from qbco.model.refcache import cache_key
from qbco.reward import calibration as calib
from qbco.reward import metrics
from qbco.reward.loss import implicit_rewards
from qbco.run.folder import RunFolder, load_run


def read_pairs(rows: list[dict], origin: str) -> tuple[list[Example], list[tuple[int, int]]]:
    """prompt / chosen / rejected rows as two examples each (chosen up, rejected down) and their pairs."""
    flat = []
    for i, row in enumerate(rows, start=1):
        missing = [c for c in ("prompt", "chosen", "rejected") if c not in row]
        if missing:
            raise QbcoError(f"{origin}: row {i}: missing column(s) {', '.join(missing)} (a pair file has prompt, chosen, rejected)")
        extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
        flat.append({**extra, "prompt": row["prompt"], "completion": row["chosen"], "label": True})
        flat.append({**extra, "prompt": row["prompt"], "completion": row["rejected"], "label": False})
    examples = rows_to_examples(flat, origin)
    return examples, [(2 * k, 2 * k + 1) for k in range(len(rows))]


def eval_examples(config, data: str | None) -> tuple[list[Example], list[tuple[int, int]], str]:
    """(rows, pairs, what they are). No `data`: the run's held-out part, split as training split it. A file:
    every row (prompt/completion/label, or prompt/chosen/rejected). A name (demo, registered): its held-out part.
    Without chosen/rejected columns, pairs are every (up, down) combination of rows sharing a prompt."""
    if data is None:
        _, examples = load_feedback(config.data, config.eval_fraction, config.seed)
        if not examples:
            raise QbcoError(f"the run held out no rows (eval_fraction {config.eval_fraction}); pass --data FILE")
        described = f"held-out part of {config.data}"
    elif Path(data).expanduser().is_file():
        path = Path(data).expanduser()
        rows = read_rows(path)
        if rows and isinstance(rows[0], dict) and {"chosen", "rejected"} <= rows[0].keys() and "label" not in rows[0]:
            examples, pairs = read_pairs(rows, str(path))
            return examples, pairs, f"{path} (all rows, chosen/rejected pairs)"
        examples = rows_to_examples(rows, str(path))
        described = f"{path} (all rows)"
    else:
        _, examples = load_feedback(data, None, config.seed)
        described = f"held-out part of {data}"
    return examples, prompt_pairs([e.prompt_key for e in examples], [e.label for e in examples]), described


def evaluate(run_dir: str | Path, data: str | None = None, slice_by: str | None = None, batch_size: int | None = None, log=print,
             progress=None, generate=None, max_prompts: int | None = None) -> dict:
    """Score the rows, compute every figure (overall and per slice), write RUN/eval/; returns the report.
    `progress` (the CLI's rich Progress, or None) shows the scoring. `generate`: a qbco.eval.generate.Sampling to
    also answer the rows' prompts (the first `max_prompts` distinct ones, default all) with base and tuned
    (answers())."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    config, tokenizer, model = load_run(run_dir)
    delta = folder.delta(config)
    if data is not None:
        folder.calibration()  # other rows apply the stored one: a damaged file is one line before any scoring
    examples, pairs, described = eval_examples(config, data)
    if slice_by is not None and not any(slice_by in e.extra for e in examples):
        found = sorted({k for e in examples for k in e.extra})
        raise QbcoError(f"--slice-by {slice_by}: no row has that column (extra columns: {', '.join(found) or 'none'})")
    entries = None
    if generate is not None:  # a malformed check fails here, before anything is scored or written
        entries = distinct_prompts(examples, slice_by)[:max_prompts]
    encoded = encode_all(examples, tokenizer, config.max_prompt_length, config.max_completion_length)
    device = next(model.parameters()).device
    size, pad = batch_size or config.batch_size, tokenizer.pad_token_id

    started = time.perf_counter()
    wait = Wait(progress, "scoring: policy, then reference", 2 * len(encoded))
    policy = dataset_logps(model, encoded, size, pad, device, config.logprob_chunk, wait)
    key = cache_key(resolve_model(config.model), config.load_in_4bit, compute_dtype(config.dtype, device), device, encoded)
    reference = reference_logps(model, encoded, size, pad, device, config.logprob_chunk, key, wait.after(len(encoded)))
    wait(2 * len(encoded))  # a cached reference needs no pass
    log(f"scored {len(encoded)} rows with policy and reference in {time.perf_counter() - started:.1f}s")

    labels = torch.tensor([e.label for e in examples])
    tokens = torch.tensor([len(e.completion_ids) for e in encoded])
    rewards = implicit_rewards(policy, reference, config.beta)
    margins = metrics.margins(rewards, delta).numpy()
    calibration = calibrate_or_load(run_dir, data, margins, labels.numpy(), described)
    calibrated = calibration.p_up(margins)
    report = {
        "run": str(run_dir),
        "data": described,
        "loss": config.loss,
        "beta": config.beta,
        "delta": delta,
        "p_up": "sigmoid(a (r - delta) + b) with the run's calibration; r = beta * (log pi_theta - log pi_ref) "
                "summed over completion tokens; the binary figures are those of sigmoid(r - delta)",
        "calibration": {**calibration.to_dict(), "description": calibration.describe(), "fit_on_these_rows": data is None},
        "truncated_completions": sum(e.completion_cut for e in encoded),
        "overall": metrics.all_figures(policy, reference, labels, tokens, pairs, config.beta, delta),
        "slices": None,
    }
    report["overall"]["binary"]["calibrated"] = calib.figures(calibrated, labels.numpy())
    if slice_by is not None:
        values = {}
        for value, idx in metrics.slice_indices([e.extra.get(slice_by) for e in examples]).items():
            ix = torch.tensor(idx)
            values[value] = metrics.all_figures(
                policy[ix], reference[ix], labels[ix], tokens[ix], metrics.subset(idx, pairs), config.beta, delta
            )
            values[value]["binary"]["calibrated"] = calib.figures(calibrated[idx], labels[ix].numpy())
        report["slices"] = {"column": slice_by, "values": values}

    out = folder.eval_folder(data, described)
    records = None
    if generate is not None:
        records, kind = answers(run_dir, config, tokenizer, model, entries, delta, generate, size, log, progress)
        report["generation"] = answer_figures(records, slice_by)
        report["generation_kind"], report["sampling"] = kind.removeprefix("run: "), generate.describe()
    binary = report["overall"]["binary"]
    after = binary["calibrated"] if calibration.method != "identity" else None
    probs = metrics.p_up(rewards, delta).tolist()
    with atomic_folder(out) as tmp:  # a rerun on the same rows replaces its own folder whole, never another's
        reliability_diagram(binary["reliability"], binary["ece"], tmp / "reliability.png", f"{run_dir.name}: {described}",
                            after=after and (after["reliability"], after["ece"], report["calibration"]["fit_on_these_rows"]))
        with open(tmp / "scores.jsonl", "w", encoding="utf-8") as f:
            for e, r, p, c, pol, ref, n in zip(examples, rewards.tolist(), probs, calibrated.tolist(), policy.tolist(),
                                               reference.tolist(), tokens.tolist()):
                f.write(json.dumps({"source": e.source, "label": e.label, "reward": r, "p_up": c, "p_up_uncalibrated": p,
                                    "policy_logp": pol, "reference_logp": ref, "completion_tokens": n}) + "\n")
        if records is not None:
            write_text(tmp / "generations.jsonl", (json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        write_text(tmp / "metrics.json", json.dumps(report, indent=2, allow_nan=False) + "\n")  # NaN is refused: not JSON
    names = ["metrics.json", "reliability.png", "scores.jsonl"] + (["generations.jsonl"] if records is not None else [])
    report["files"] = [str(out / n) for n in names]
    if data is None:
        report["files"].append(str(folder.save_calibration(calibration)))
    return report


# ---------------------------------------------------------------- --generate: what the model says


def distinct_prompts(examples: list[Example], slice_by: str | None) -> list[dict]:
    """One entry per distinct prompt, in the rows' order: the prompt, its first row's source, its slice value,
    and the check its rows carry (qbco.eval.tasks.row_check: `check`, else `reference`, else None)."""
    seen: dict[str, dict] = {}
    for e in examples:
        entry = seen.setdefault(e.prompt_key, {"prompt": e.prompt, "source": e.source, "check": None})
        if slice_by is not None:
            entry.setdefault(slice_by, e.extra.get(slice_by))
        if entry["check"] is None:
            entry["check"] = row_check(e.extra, e.source)
    return list(seen.values())


def answers(run_dir: Path, config, tokenizer, model, entries: list[dict], delta: float, sampling, batch_size: int,
            log=print, progress=None) -> tuple[list[dict], str]:
    """Base and tuned answers to every prompt of `entries` (distinct_prompts; qbco.eval.generate: on a CPU the fp32
    twin of the 4-bit run), each scored under the run with the same passes as the rows (reward, p_up) and,
    where the prompt has a check, judged (success). One record per prompt, as generations.jsonl holds them;
    and what answered (RunModels.kind)."""
    sampling.validate()
    device = next(model.parameters()).device
    started = time.perf_counter()
    run = RunModels(run_dir, device)
    log(f"answering {len(entries)} prompts with base and tuned ({run.kind.removeprefix('run: ')}; {sampling.describe()})")
    base, tuned = answer_both(run, [e["prompt"] for e in entries], sampling, device, progress=progress)
    kind = run.kind
    del run
    gc.collect()
    log(f"answered in {time.perf_counter() - started:.1f}s")

    # Scored as training scores a row: the answer as a completion ended by EOS, whole (not cut at max_completion_length).
    said = [Example(e["prompt"], text, False, e["source"]) for e, pair in zip(entries, zip(base, tuned)) for text in pair]
    encoded = encode_all(said, tokenizer, config.max_prompt_length, max(config.max_completion_length, sampling.max_new_tokens + 1))
    pad = tokenizer.pad_token_id
    wait = Wait(progress, "scoring the answers: policy, then reference", 2 * len(encoded))
    policy = dataset_logps(model, encoded, batch_size, pad, device, config.logprob_chunk, wait)
    reference = reference_logps(model, encoded, batch_size, pad, device, config.logprob_chunk, None, wait.after(len(encoded)))
    rewards = implicit_rewards(policy, reference, config.beta)
    probs = metrics.p_up(rewards, delta).tolist()
    records = []
    for k, entry in enumerate(entries):
        record = dict(entry)
        for j, who in enumerate(("base", "tuned")):
            i = 2 * k + j
            text = said[i].completion
            tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            record[who] = {
                "answer": text,
                "tokens": tokens,
                "reward": float(rewards[i]),
                "p_up": probs[i],
                "success": passes(text, entry["check"], entry["prompt"]) if entry["check"] is not None else None,
            }
        records.append(record)
    return records, kind


def answer_figures(records: list[dict], slice_by: str | None = None) -> dict:
    """How the tuned answers differ from the base's: share changed, length (tokens), reward under the run
    (mean, and the share of prompts where the tuned answer's reward is the higher) and task success where
    prompts have a check (rate over the prompts that do); per slice value too when slice_by is given."""

    def figures(rows: list[dict]) -> dict:
        checked = [r for r in rows if r["check"] is not None]
        out = {
            "prompts": len(rows),
            "changed": sum(r["base"]["answer"] != r["tuned"]["answer"] for r in rows) / len(rows),
            "tokens": {w: sum(r[w]["tokens"] for r in rows) / len(rows) for w in ("base", "tuned")},
            "reward": {w: sum(r[w]["reward"] for r in rows) / len(rows) for w in ("base", "tuned")},
            "tuned_reward_higher": sum(r["tuned"]["reward"] > r["base"]["reward"] for r in rows) / len(rows),
            "checked": len(checked),
            "success": None,
        }
        if checked:
            out["success"] = {w: sum(r[w]["success"] for r in checked) / len(checked) for w in ("base", "tuned")}
            out["success_counts"] = {w: sum(r[w]["success"] for r in checked) for w in ("base", "tuned")}
        return out

    report = {"overall": figures(records), "slices": None}
    if slice_by is not None:
        groups = metrics.slice_indices([r.get(slice_by) for r in records])
        report["slices"] = {"column": slice_by, "values": {v: figures([records[i] for i in idx]) for v, idx in groups.items()}}
    return report


def calibrate_or_load(run_dir: Path, data: str | None, margins, labels, described: str) -> calib.Calibration:
    """On the run's own held-out rows (no --data) the Platt scale is fit again (evaluate stores it in the run
    once RUN/eval/ is written; a run trained before qbco calibrated gets one this way); on other rows the stored
    one is applied, so its 'after' figures are measured on rows it did not see."""
    if data is None:
        return calib.calibrate(margins, labels, described)
    return RunFolder(run_dir).calibration()
