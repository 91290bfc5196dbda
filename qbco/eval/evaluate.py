"""`qbco eval`: score feedback rows with a finished run (one no-grad pass of the policy, one of the
reference) and write metrics.json, reliability.png and scores.jsonl (one line per row) into RUN/eval/ (the
run's held-out rows) or RUN/eval-NAME/ (`--data NAME`). With --generate also answer the rows' prompts with base
and tuned and write generations.jsonl there: how the answers changed, their rewards under the run and, where
rows carry a check (qbco.tasks), task success."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import torch

from qbco import calibration as calib
from qbco import metrics
from qbco.data import Example, encode_all, load_feedback, prompt_pairs, rows_to_examples
from qbco.errors import QbcoError
from qbco.loss import implicit_rewards
from qbco.reader import read_rows
from qbco.run_folder import atomic_folder
from qbco.shift import RewardShift


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


def run_delta(run_dir: Path, config) -> float:
    """The delta of p(up) = sigmoid(r - delta): the run's final reward shift for bco, 0 otherwise (bce)."""
    if config.loss != "bco":
        return 0.0
    path = run_dir / "adapter" / "reward_shift.json"
    if not path.is_file():
        raise QbcoError(f"{path} is missing: a bco run saves its reward shift there; without it p(up) is unknown")
    shift = RewardShift()
    shift.load_state_dict(json.loads(path.read_text(encoding="utf-8")))
    return shift.delta


def evaluate(run_dir: str | Path, data: str | None = None, slice_by: str | None = None, batch_size: int | None = None, log=print,
             progress=None, generate=None, max_prompts: int | None = None) -> dict:
    """Score the rows, compute every figure (overall and per slice), write RUN/eval/; returns the report.
    `progress` (the CLI's rich Progress, or None) shows the scoring. `generate`: a qbco.generate.Sampling to
    also answer the rows' prompts (the first `max_prompts` distinct ones, default all) with base and tuned
    (answers())."""
    from qbco.logprobs import dataset_logps, reference_logps
    from qbco.models import compute_dtype, load_run, resolve_model
    from qbco.plot import reliability_diagram
    from qbco.progress import Wait
    from qbco.refcache import cache_key

    run_dir = Path(run_dir)
    config, tokenizer, model = load_run(run_dir)
    delta = run_delta(run_dir, config)
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
        "calibration": {**calibration.to_dict(), "fit_on_these_rows": data is None},
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

    out = eval_folder(run_dir, data, described)
    records = None
    if generate is not None:
        records, kind = answers(run_dir, config, tokenizer, model, entries, delta, generate, size, log)
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
            _write_jsonl(tmp / "generations.jsonl", records)
        _write_json(tmp / "metrics.json", report)
    names = ["metrics.json", "reliability.png", "scores.jsonl"] + (["generations.jsonl"] if records is not None else [])
    report["files"] = [str(out / n) for n in names]
    if data is None:
        report["files"].append(str(calib.save(run_dir, calibration)))
    return report


# ---------------------------------------------------------------- --generate: what the model says


def distinct_prompts(examples: list[Example], slice_by: str | None) -> list[dict]:
    """One entry per distinct prompt, in the rows' order: the prompt, its first row's source, its slice value,
    and the check its rows carry (qbco.tasks.row_check: `check`, else `reference`, else None)."""
    from qbco.tasks import row_check

    seen: dict[str, dict] = {}
    for e in examples:
        entry = seen.setdefault(e.prompt_key, {"prompt": e.prompt, "source": e.source, "check": None})
        if slice_by is not None:
            entry.setdefault(slice_by, e.extra.get(slice_by))
        if entry["check"] is None:
            entry["check"] = row_check(e.extra, e.source)
    return list(seen.values())


def answers(run_dir: Path, config, tokenizer, model, entries: list[dict], delta: float, sampling, batch_size: int,
            log=print) -> tuple[list[dict], str]:
    """Base and tuned answers to every prompt of `entries` (distinct_prompts; qbco.generate: on a CPU the fp32
    twin of the 4-bit run), each scored under the run with the same passes as the rows (reward, p_up) and,
    where the prompt has a check, judged (success). One record per prompt, as generations.jsonl holds them;
    and what answered (RunModels.kind)."""
    import gc

    from qbco.generate import RunModels, answer_both
    from qbco.logprobs import dataset_logps, reference_logps
    from qbco.tasks import passes

    sampling.validate()
    device = next(model.parameters()).device
    started = time.perf_counter()
    run = RunModels(run_dir, device)
    log(f"answering {len(entries)} prompts with base and tuned ({run.kind.removeprefix('run: ')}; {sampling.describe()})")
    base, tuned = answer_both(run, [e["prompt"] for e in entries], sampling, device)
    kind = run.kind
    del run
    gc.collect()
    log(f"answered in {time.perf_counter() - started:.1f}s")

    # Scored as training scores a row: the answer as a completion ended by EOS, whole (not cut at max_completion_length).
    said = [Example(e["prompt"], text, False, e["source"]) for e, pair in zip(entries, zip(base, tuned)) for text in pair]
    encoded = encode_all(said, tokenizer, config.max_prompt_length, max(config.max_completion_length, sampling.max_new_tokens + 1))
    pad = tokenizer.pad_token_id
    policy = dataset_logps(model, encoded, batch_size, pad, device, config.logprob_chunk)
    reference = reference_logps(model, encoded, batch_size, pad, device, config.logprob_chunk)
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
                "success": passes(text, entry["check"]) if entry["check"] is not None else None,
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


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def eval_folder(run_dir: Path, data: str | None, described: str) -> Path:
    """RUN/eval/ for the run's own held-out rows; RUN/eval-NAME/ for --data NAME or FILE (NAME-2, -3, ... when
    that name already holds the figures of other rows), so no evaluation writes over another."""
    if data is None:
        return run_dir / "eval"
    name = Path(data).expanduser().stem if Path(data).expanduser().is_file() else data
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "data"
    folder, n = run_dir / f"eval-{slug}", 1
    while (folder / "metrics.json").is_file() and json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("data") != described:
        n += 1
        folder = run_dir / f"eval-{slug}-{n}"
    return folder


def calibrate_or_load(run_dir: Path, data: str | None, margins, labels, described: str) -> calib.Calibration:
    """On the run's own held-out rows (no --data) the Platt scale is fit again (evaluate stores it in
    RUN/calibration.json once RUN/eval/ is written; a run trained before qbco calibrated gets one this way); on
    other rows the stored one is applied, so its 'after' figures are measured on rows it did not see."""
    if data is None:
        return calib.calibrate(margins, labels, described)
    return calib.load(run_dir)


def _write_json(path: Path, value: dict) -> None:
    """Written beside and renamed: a reader never sees half a file. NaN is refused (not JSON)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- the table `qbco eval` prints


def _f(value, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _rows(figures: dict) -> list[tuple[str, str]]:
    b, p, d = figures["binary"], figures["pairs"], figures["drift"]
    half, best = b["at_0.5"], b["at_best_f1"]
    rows = [
        ("rows (thumbs-up share)", f"{b['rows']} ({b['thumbs_up_share']:.0%})"),
        ("ROC-AUC", _f(b["roc_auc"])),
        ("PR-AUC (average precision)", _f(b["pr_auc"])),
        ("accuracy @ p>0.5", _f(half["accuracy"])),
        ("precision / recall / F1 @ p>0.5", f"{_f(half['precision'])} / {_f(half['recall'])} / {_f(half['f1'])}"),
        ("F1-best threshold p (r - delta)", f"{_f(best['threshold'])} ({_f(best['reward_margin'], signed=True)})" if best else "-"),
        ("accuracy @ best", _f(best["accuracy"]) if best else "-"),
        ("precision / recall / F1 @ best", f"{_f(best['precision'])} / {_f(best['recall'])} / {_f(best['f1'])}" if best else "-"),
        ("log-loss (BCE of p, nats)", _f(b["log_loss"], 4)),
        ("Brier score", _f(b["brier"], 4)),
        ("ECE (10 bins)", _f(b["ece"], 4)),
        ("ECE, calibrated p_up", _f(b["calibrated"]["ece"], 4)),
        ("log-loss, calibrated p_up", _f(b["calibrated"]["log_loss"], 4)),
        ("BCO loss (per-class means)", _f(b["bco_loss"], 4)),
    ]
    if p:
        rows += [
            ("pairs", str(p["pairs"])),
            ("pair reward accuracy", _f(p["reward_accuracy"])),
            ("pair mean margin r_w - r_l", _f(p["mean_margin"], 4, signed=True)),
            ("DPO loss / BCE loss on pairs", f"{_f(p['dpo_loss'], 4)} / {_f(p['bce_loss'], 4)}"),
            ("BCE - DPO (Theorem 1: >= 0)", _f(p["bce_minus_dpo"], 4, signed=True)),
        ]
    else:
        rows.append(("pairs", "none"))
    rows += [
        ("log-ratio per token (nats)", _f(d["log_ratio_per_token"], 4, signed=True)),
        ("log-ratio per sequence (nats)", _f(d["log_ratio_per_sequence"], 4, signed=True)),
        ("mean reward beta * log-ratio", _f(d["mean_reward"], 4, signed=True)),
    ]
    return rows


def summary_table(report: dict):
    """A rich Table: one row per figure, a column for all rows and one per slice value."""
    from rich.table import Table

    columns = {"all": report["overall"]}
    if report["slices"]:
        columns.update({f"{report['slices']['column']}={v}": f for v, f in report["slices"]["values"].items()})
    cal = report["calibration"]
    seen = " (fit on these rows: 'calibrated' is optimistic)" if cal["fit_on_these_rows"] and cal["method"] != "identity" else ""
    table = Table(title=f"qbco eval: {report['run']}\n{report['data']}; {report['loss']}, beta {report['beta']}, delta {report['delta']:+.4f}"
                        f"\ncalibration: {calib.Calibration.from_dict(cal).describe()}{seen}")
    table.add_column("figure")
    for name in columns:
        table.add_column(name, justify="right")
    per_column = [_rows(f) for f in columns.values()]
    names = [name for name, _ in per_column[0]]
    for name in names:
        table.add_row(name, *[dict(rows).get(name, "-") for rows in per_column])
    return table


def _success(figures: dict) -> tuple[str, str]:
    if not figures["success"]:
        return "-", "-"
    n, counts = figures["checked"], figures["success_counts"]
    return tuple(f"{counts[w]}/{n} ({figures['success'][w]:.0%})" for w in ("base", "tuned"))


def generation_table(report: dict):
    """A rich Table of report['generation']: base vs tuned answers, a column for all prompts and one per slice."""
    from rich.table import Table

    gen = report["generation"]
    columns = {"all": gen["overall"]}
    if gen["slices"]:
        columns.update({f"{gen['slices']['column']}={v}": f for v, f in gen["slices"]["values"].items()})
    table = Table(title=f"qbco eval --generate: {report['run']}\n{report['generation_kind']}; {report['sampling']}")
    table.add_column("answers")
    for name in columns:
        table.add_column(name, justify="right")
    rows = [
        ("prompts", lambda f: str(f["prompts"])),
        ("tuned answer differs from base", lambda f: f"{f['changed']:.0%}"),
        ("mean tokens base -> tuned", lambda f: f"{f['tokens']['base']:.1f} -> {f['tokens']['tuned']:.1f}"),
        ("mean reward base -> tuned", lambda f: f"{f['reward']['base']:+.3f} -> {f['reward']['tuned']:+.3f}"),
        ("tuned reward above base's", lambda f: f"{f['tuned_reward_higher']:.0%}"),
        ("task success: base", lambda f: _success(f)[0]),
        ("task success: tuned", lambda f: _success(f)[1]),
    ]
    for name, cell in rows:
        table.add_row(name, *[cell(f) for f in columns.values()])
    return table
