"""Every table the command line prints, from the values the library returns (the library itself builds none)."""

from __future__ import annotations

from rich.table import Table

from qbco.data.binarize import format_scale


def binarize_table(summary):
    """`qbco binarize`'s summary (a qbco.data.binarize.Summary)."""
    table = Table(title=f"qbco binarize: {summary.output or summary.input}", show_header=False)
    share = f"{summary.up_share:.1%}" if summary.up_share is not None else "-"
    rows = [
        ("layout", f"{summary.layout}: {summary.rule}" if summary.layout else "-"),
        ("mode", summary.mode + (f" ({summary.passes} passes over the input)" if summary.passes > 1 else "")),
        ("columns", ", ".join(f"{k}={v}" for k, v in summary.columns.items()) or "as published"),
    ]
    if summary.threshold is not None:
        rows.append(("thumbs-up when", f"{summary.columns.get('score')} >= {summary.threshold:g}"))
    if summary.scale is not None:
        rows.append(("scale", f"{format_scale(summary.scale)} ({summary.scale_source})"))
    rows += [
        ("rows read", str(summary.rows_read)),
        ("rows written", str(summary.rows_written)),
        ("prompts", f"{summary.prompts} ({summary.multi_turn_prompts} multi-turn)"),
        ("thumbs-up", f"{summary.thumbs_up} ({share})"),
        ("thumbs-down", str(summary.thumbs_down)),
        ("dropped", str(summary.dropped_total)),
    ]
    rows += [(f"  {reason}", str(count)) for reason, count in sorted(summary.dropped.items())]
    rows += [("warning", w) for w in summary.warnings]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _f(value, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _rows_cell(b: dict) -> str:
    """The rows figured on and their thumbs-up share; rows whose reward is not finite are named apart."""
    share = "-" if b["thumbs_up_share"] is None else f"{b['thumbs_up_share']:.0%}"
    apart = f"; {b['non_finite']} more with a non-finite reward, left out" if b.get("non_finite") else ""
    return f"{b['rows']} ({share}){apart}"


def _rows(figures: dict) -> list[tuple[str, str]]:
    b, p, d = figures["binary"], figures["pairs"], figures["drift"]
    half, best = b["at_0.5"], b["at_best_f1"]
    rows = [
        ("rows (thumbs-up share)", _rows_cell(b)),
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


def eval_table(report: dict):
    """`qbco eval`'s figures: one row per figure, a column for all rows and one per slice value."""
    columns = {"all": report["overall"]}
    if report["slices"]:
        columns.update({f"{report['slices']['column']}={v}": f for v, f in report["slices"]["values"].items()})
    cal = report["calibration"]
    seen = " (fit on these rows: 'calibrated' is optimistic)" if cal["fit_on_these_rows"] and cal["method"] != "identity" else ""
    table = Table(title=f"qbco eval: {report['run']}\n{report['data']}; {report['loss']}, beta {report['beta']}, delta {report['delta']:+.4f}"
                        f"\ncalibration: {cal['description']}{seen}")
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
    """`qbco eval --generate`'s report['generation']: base vs tuned answers, a column for all prompts and one per slice."""
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


def score_table(summary: dict):
    """`qbco score`'s figures as a rich Table: a column for all labelled rows, one for the run's held-out rows."""
    table = Table(title=f"qbco score: {summary['target']}\n{summary['data']}; delta {summary['delta']:+.4f}; "
                        f"calibration: {summary['calibration']['description']}")
    table.add_column("figure")
    names = {"all": f"labelled rows ({summary['labelled']})", "held_out": "held-out rows of the run"}
    columns = summary["figures"]
    for key in columns:
        table.add_column(names[key], justify="right")

    def f(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [
        ("rows (thumbs-up share)", _rows_cell),
        ("ROC-AUC", lambda b: f(b["roc_auc"])),
        ("accuracy @ p>0.5", lambda b: f(b["at_0.5"]["accuracy"])),
        ("F1 @ p>0.5", lambda b: f(b["at_0.5"]["f1"])),
        ("ECE, sigmoid(r - delta)", lambda b: f(b["ece"], 4)),
        ("ECE, calibrated p_up", lambda b: f(b["calibrated"]["ece"], 4)),
        ("log-loss, sigmoid(r - delta)", lambda b: f(b["log_loss"], 4)),
        ("log-loss, calibrated p_up", lambda b: f(b["calibrated"]["log_loss"], 4)),
    ]
    for name, cell in rows:
        table.add_row(name, *[cell(b) for b in columns.values()])
    return table


def _held_out_cell(ev: dict) -> str:
    if not ev:
        return "no held-out rows"
    apart = f" ({ev['eval_non_finite']} of {ev['eval_rows']} rows with a non-finite reward, left out)" if ev.get("eval_non_finite") else ""
    return f"{_f(ev['eval_reward_accuracy'])}{apart}"


def train_table(result, config, allocator: str) -> Table:
    """`qbco train`'s summary (a qbco.train.loop.RunResult)."""
    table = Table(title=f"qbco train: {result.output}", show_header=False)
    rows = [
        ("steps", str(result.steps)),
        ("processes", result.processes),
        ("time", f"{result.elapsed_s:.1f} s"),
        ("tokens/s", f"{result.tokens_per_s:.0f}"),
        ("peak memory", f"{result.peak_memory_mb:.0f} MiB"),
        ("checkpointing", result.recompute.summary() if result.recompute else f"{config.gradient_checkpointing} (no estimate for this model)"),
        ("allocator", allocator),
        ("final loss", f"{result.final_loss:.4f}" if result.final_loss is not None else "-"),
        ("held-out reward accuracy", _held_out_cell(result.eval)),
        ("calibration", result.calibration.describe() if result.calibration else "-"),
        # Answering the held-out prompts costs minutes on a CPU (docs/results.md), so training leaves it to eval.
        ("the answers, base vs tuned", f"qbco eval {result.output} --generate"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def merge_table(result) -> Table:
    """`qbco merge`'s result (a qbco.export.merge.MergeResult)."""
    gap = result.gap
    table = Table(title=f"qbco merge: {result.output}", show_header=False)
    table.add_row("saved in", f"{result.dtype} ({result.size_bytes / 2**20:.0f} MiB of weights); the adapter merged in fp32")
    table.add_row("gap to the trained model", f"mean |delta log p| {gap.mean:.3g} nats/token, worst row "
                  f"{gap.worst_row:.3g}, max {gap.max:.3g} ({gap.tokens} tokens of {result.check_rows or f'{gap.rows} rows'}; "
                  f"limit {result.max_gap:g}): [green]passed[/]")
    if result.trained_vs_base is not None:
        table.add_row("trained model from its base", f"{result.trained_vs_base.mean:.3g} nats/token (adapters off; the "
                      "merge kept what training changed)")
    table.add_row("dtypes measured", ", ".join(f"{t.dtype} {t.mean:.3g}" for t in result.tried))
    return table


def gguf_table(result) -> Table:
    """`qbco merge --gguf`'s result (a qbco.export.gguf.GgufResult)."""
    gap = result.gap
    same, compared = result.tokenizer_rows
    table = Table(title=f"qbco merge --gguf {result.type}: {result.output}", show_header=False)
    table.add_row("file", f"{result.file.name} ({result.size_bytes / 2**20:.1f} MiB), Modelfile beside it (ollama create)")
    table.add_row("gap to the trained model", f"mean |delta log p| {gap.mean:.3g} nats/token, max {gap.max:.3g} "
                  f"({gap.tokens} tokens of {gap.rows} held-out rows, read back by transformers; limit "
                  f"{result.max_gap:g}): [green]passed[/]")
    table.add_row("tokenizer", f"the file's own encodes {same} of {compared} rows as the run's does")
    return table


def answers_table(answers, target, kind: str, sampling, compare: bool) -> Table:
    """`qbco generate`'s answers (qbco.eval.generate.Answer), with --compare the base's beside them."""
    table = Table(title=f"qbco generate: {target} ({kind})", caption=sampling.describe(), show_lines=True)
    table.add_column("prompt", overflow="fold", ratio=1)
    for column in (("base", "tuned") if compare else ("answer",)):
        table.add_column(column, overflow="fold", ratio=2)
    for answer in answers:
        table.add_row(prompt_label(answer.prompt), *((answer.base, answer.tuned) if compare else (answer.tuned,)))
    return table


def best_of_table(results, target, kind: str, sampling, n: int) -> Table:
    """`qbco generate --best-of N`: each prompt's best answer by the run's reward, and the others' p_up."""
    table = Table(title=f"qbco generate --best-of {n}: {target} ({kind})", caption=sampling.describe(), show_lines=True)
    for column, ratio in (("prompt", 1), ("best answer", 2), ("reward / p_up", 1), (f"other {n - 1}: p_up", 1)):
        table.add_column(column, overflow="fold", ratio=ratio)
    for r in results:
        others = ", ".join(f"{p:.2f}" for k, p in enumerate(r.p_up) if k != r.best)
        table.add_row(prompt_label(r.prompt), r.answers[r.best], f"{r.rewards[r.best]:+.3f} / {r.p_up[r.best]:.2f}", others)
    return table


def datasets_table(listing) -> Table:
    """`qbco datasets`: the names `qbco train --data` takes (qbco.data.registry.listing)."""
    table = Table(title="qbco datasets: qbco train --data NAME")
    for column in ("name", "source (splits)", "thumbs-up / down", "description"):
        table.add_column(column, no_wrap=column == "name", overflow="fold")
    for row in listing:
        table.add_row(*row)
    return table


def prompt_label(prompt) -> str:
    """A prompt as one line of text for a table: a chat prompt shows its last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]
