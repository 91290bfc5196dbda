"""Which objective makes the tuned model *answer* better, not only classify: candidate objectives and settings
trained on the demo feedback, each followed by `qbco eval --generate` on the held-out prompts (greedy; task
success by the rows' checks, base vs tuned), the classifier figures beside it. Writes the candidates table
and the reward curves into docs/results.md (between its answers markers) and docs/answers.png.

    .venv/bin/python scripts/answers_ablation.py --out runs/answers                     # every candidate
    .venv/bin/python scripts/answers_ablation.py --out runs/answers --candidates bco bco+sft1

A finished run already in OUT/NAME (say, a copy of a `qbco train` run with today's defaults as OUT/bco) is
evaluated, not retrained. Candidates that are not qbco options (DPOP) are objectives defined here and
registered for the run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qbco.eval.evaluate import evaluate
from qbco.eval.generate import Sampling
from qbco.reward.loss import LossOutput, implicit_rewards
from qbco.reward.objectives import BCO, OBJECTIVES
from qbco.run.config import build_config
from qbco.run.folder import RunFolder
from qbco.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- answers ablation: begin (scripts/answers_ablation.py) -->", "<!-- answers ablation: end -->"


class BCODPOP(BCO):
    """BCO with DPO-Positive's penalty (Pal et al. 2024, "Smaug", arXiv 2402.13228) on the thumbs-up term: a
    thumbs-up row whose reward r = beta * log(pi / pi_ref) is below 0 is pushed up inside the sigmoid,

        up term: -log sigmoid(r - delta - lambda * max(0, -r))

    the thumbs-down term as in BCO. lambda = 5 (reward units)."""

    lam = 5.0

    def loss(self, batch, window) -> LossOutput:
        labels = batch.labels.bool()
        r = implicit_rewards(batch.policy, batch.reference, self.beta)
        shifted = r - window.delta
        up = -F.logsigmoid(shifted - self.lam * torch.relu(-r))[labels].sum()
        down = -F.logsigmoid(-shifted)[~labels].sum()
        loss = (up / window.n_up if window.n_up else 0.0) + (down / window.n_down if window.n_down else 0.0)
        return self.with_sft(LossOutput(loss=loss, rewards=r.detach()), batch, window)


class SFTOnly(BCO):
    """No preference term at all: only --sft-weight times the per-token NLL of the thumbs-up rows, i.e.
    supervised fine-tuning on the thumbs-up completions (the reference point for what BCO adds). delta is
    still tracked, so p(up) = sigmoid(r - delta) stays defined for the classifier figures."""

    def loss(self, batch, window) -> LossOutput:
        r = implicit_rewards(batch.policy, batch.reference, self.beta)
        return self.with_sft(LossOutput(loss=batch.policy.new_zeros(()), rewards=r.detach()), batch, window)


OBJECTIVES["bco-dpop"] = BCODPOP
OBJECTIVES["sft-only"] = SFTOnly

# name: TrainConfig overrides (its defaults otherwise). "bco" is the paper's BCO at TrainConfig's defaults (the demo recipe before issue 12).
CANDIDATES = {
    "bco": {},
    "bco+sft1": {"sft_weight": 1.0},
    "bco+sft0.3": {"sft_weight": 0.3},
    "bco+sft1+lr1e-4": {"sft_weight": 1.0, "lr": 1e-4},
    "bco+dpop5": {"loss": "bco-dpop"},
    "bce+sft1": {"loss": "bce", "sft_weight": 1.0},
    "bco+lr1e-4": {"lr": 1e-4},
    "bco+sft1+2ep": {"sft_weight": 1.0, "epochs": 2.0},
    "bco+sft1+beta0.3": {"sft_weight": 1.0, "beta": 0.3},
    "bco+sft3": {"sft_weight": 3.0},
    "bco+sft1+lr1e-3": {"sft_weight": 1.0, "lr": 1e-3},
    "sft-only": {"loss": "sft-only", "sft_weight": 1.0},
    "bco+lr1e-3": {"lr": 1e-3},
    "bco+sft1+lr3e-3": {"sft_weight": 1.0, "lr": 3e-3},
    "bco+sft3+lr1e-3": {"sft_weight": 3.0, "lr": 1e-3},
    "bco+sft5+lr1e-3": {"sft_weight": 5.0, "lr": 1e-3},
    "bco+sft2+lr1e-3": {"sft_weight": 2.0, "lr": 1e-3},
    "bco+sft3+lr5e-4": {"sft_weight": 3.0, "lr": 5e-4},
    "bco+sft3+lr1e-3+2ep": {"sft_weight": 3.0, "lr": 1e-3, "epochs": 2.0},
    "bco+sft3+lr1e-3+1.5ep": {"sft_weight": 3.0, "lr": 1e-3, "epochs": 1.5},
    "bco+sft1+lr1e-3+beta0.3": {"sft_weight": 1.0, "lr": 1e-3, "beta": 0.3},
}


def fmt(value, digits=3, signed=False):
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def tail_mean(steps: list[dict], key: str, n: int = 10) -> float | None:
    values = [m[key] for m in steps[-n:] if m.get(key) is not None]
    return statistics.fmean(values) if values else None


def measure(name: str, run: Path, max_new_tokens: int) -> dict:
    metrics = RunFolder(run).metrics()
    report = evaluate(run, slice_by="task", log=lambda m: print(f"[{name}] {m}", flush=True),
                      generate=Sampling(max_new_tokens=max_new_tokens))
    overall, gen = report["overall"], report["generation"]
    drift = overall["drift"]
    return {
        "name": name,
        "config": json.loads(json.dumps(CANDIDATES.get(name, {}))),
        "steps": len(metrics.steps),
        "seconds": metrics.steps[-1]["elapsed_s"],
        "roc_auc": overall["binary"]["roc_auc"],
        "task_auc": {t: f["binary"]["roc_auc"] for t, f in report["slices"]["values"].items()},
        "pair_accuracy": (overall["pairs"] or {}).get("reward_accuracy"),
        "accuracy": overall["binary"]["at_0.5"]["accuracy"],
        "drift_up": drift["thumbs_up"]["log_ratio_per_token"] if drift.get("thumbs_up") else None,
        "drift_down": drift["thumbs_down"]["log_ratio_per_token"] if drift.get("thumbs_down") else None,
        "reward_up": tail_mean(metrics.steps, "reward_up"),
        "reward_down": tail_mean(metrics.steps, "reward_down"),
        "delta": report["delta"],
        "success": gen["overall"]["success"],
        "counts": gen["overall"]["success_counts"],
        "checked": gen["overall"]["checked"],
        "task_success": {t: f["success"] for t, f in gen["slices"]["values"].items()},
        "changed": gen["overall"]["changed"],
        "tokens": gen["overall"]["tokens"],
        "curve": [[m["step"], m.get("reward_up"), m.get("reward_down"), m.get("delta")] for m in metrics.steps],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / f"answers-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap every candidate's steps (a quick screen)")
    parser.add_argument("--doc-only", action="store_true", help="only rewrite the doc and the plot from OUT/results.json")
    args = parser.parse_args()
    if args.doc_only:
        results = json.loads((args.out / "results.json").read_text())
        ordered = [results[n] for n in CANDIDATES if n in results]
        plot_curves(ordered, args.doc.parent / "answers.png")
        write_doc(ordered, args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for name in args.candidates:
        run = args.out / name
        if not (run / "adapter").is_dir():
            config = build_config(output=str(run), max_steps=args.max_steps, **CANDIDATES[name])
            train(config, log=lambda m, name=name: print(f"[{name}] {m}", flush=True))
        results[name] = measure(name, run, args.max_new_tokens)
        args.out.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=1))
        r = results[name]
        print(f"[{name}] success base {r['success']['base']:.3f} tuned {r['success']['tuned']:.3f}, "
              f"ROC-AUC {r['roc_auc']:.3f}, reward_up {fmt(r['reward_up'], signed=True)}", flush=True)
    ordered = [results[n] for n in CANDIDATES if n in results]
    plot_curves(ordered, args.doc.parent / "answers.png")
    write_doc(ordered, args)


def plot_curves(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.8))
    FigureCanvasAgg(fig)
    ax_up, ax_down, ax_delta = fig.subplots(1, 3)

    def smooth(values, k=5):
        out = []
        for i in range(len(values)):
            window = [v for v in values[max(0, i - k + 1): i + 1] if v is not None]
            out.append(sum(window) / len(window) if window else float("nan"))
        return out

    for r in rows:
        x = [c[0] for c in r["curve"]]
        ax_up.plot(x, smooth([c[1] for c in r["curve"]]), label=r["name"])
        ax_down.plot(x, smooth([c[2] for c in r["curve"]]), label=r["name"])
        ax_delta.plot(x, [c[3] for c in r["curve"]], label=r["name"])
    for ax, title in ((ax_up, "reward_up (batch mean, 5-step average)"), (ax_down, "reward_down (5-step average)"),
                      (ax_delta, "delta")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.axhline(0, color="grey", lw=0.5)
    ax_up.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_doc(rows: list[dict], args) -> None:
    tasks = sorted(rows[0]["task_success"])
    base = rows[0]
    lines = [
        BEGIN,
        "## What the tuned model answers: task success, base vs tuned",
        "",
        "Each candidate trains on the demo feedback with TrainConfig's defaults (the paper's BCO, lr 3e-4, one epoch)",
        "except what its name says (one seed,",
        "seed 0, one run per row), then `qbco eval RUN --generate --slice-by task` answers the "
        f"{base['checked']} held-out",
        f"prompts greedily with base and tuned (up to {args.max_new_tokens} new tokens) and checks every answer",
        "with the prompt's check (qbco/eval/tasks.py: the number, the word, the exact text, the list format). The base's",
        f"success is the same for every row: {base['counts']['base']}/{base['checked']} "
        f"({base['success']['base']:.1%}). ROC-AUC and pair accuracy are the classifier figures of the same eval",
        "(149 held-out rows, 83 pairs); drift is log pi_theta - log pi_ref per completion token on the held-out",
        "thumbs-up / thumbs-down rows; reward_up / reward_down are the mean of the last 10 training steps.",
        "",
        "Reproduce:",
        "",
        f"    .venv/bin/python scripts/answers_ablation.py --out runs/answers --candidates {' '.join(r['name'] for r in rows)}",
        "",
        "| candidate | tuned success | vs base | ROC-AUC | pair acc. | drift up / down (nats/token) "
        "| reward_up / reward_down (last 10 steps) | delta | answers changed | tokens base -> tuned | steps | train time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["success"]
        lines.append(
            f"| {r['name']} | {r['counts']['tuned']}/{r['checked']} ({s['tuned']:.1%}) | "
            f"{100 * (s['tuned'] - s['base']):+.1f} pts | {fmt(r['roc_auc'])} | {fmt(r['pair_accuracy'])} | "
            f"{fmt(r['drift_up'], 2, True)} / {fmt(r['drift_down'], 2, True)} | "
            f"{fmt(r['reward_up'], 2, True)} / {fmt(r['reward_down'], 2, True)} | {fmt(r['delta'], 2, True)} | "
            f"{r['changed']:.0%} | {r['tokens']['base']:.0f} -> {r['tokens']['tuned']:.0f} | {r['steps']} | {r['seconds']:.0f} s |"
        )
    lines += [
        "",
        "Task success per task (tuned; base in the first line):",
        "",
        "| candidate | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
        "| base | " + " | ".join(f"{base['task_success'][t]['base']:.0%}" for t in tasks) + " |",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r['task_success'][t]['tuned']:.0%}" for t in tasks) + " |")
    lines += [
        "",
        "Held-out ROC-AUC per task:",
        "",
        "| candidate | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(fmt(r['task_auc'].get(t)) for t in tasks) + " |")
    lines += ["", "Curves: [answers.png](answers.png).", "", "<!-- observations on the answers, by hand, below -->", END]
    section = "\n".join(lines) + "\n"
    text = args.doc.read_text() if args.doc.exists() else ""
    if BEGIN in text:
        before, rest = text.split(BEGIN, 1)
        old = rest.split(END, 1)
        kept = old[0].split("<!-- observations on the answers, by hand, below -->", 1)
        observations = kept[1] if len(kept) == 2 else "\n"
        section = section.replace("<!-- observations on the answers, by hand, below -->\n" + END,
                                  "<!-- observations on the answers, by hand, below -->" + observations + END)
        text = before + section + (old[1] if len(old) == 2 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    args.doc.write_text(text)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
