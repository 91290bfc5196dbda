#!/usr/bin/env python3
"""Rebuild the measured tables from their committed results files: docs/results.md's family table from
docs/results/families.json (scripts/families.py: one row per family and candidate, base and tuned task success as
the mean and the spread over seeds, the gain in points, the gain in every seed, the held-out ROC-AUC), and
docs/score.md's best-of ranking table from docs/results/best_of.json (scripts/measure_score.py).

    .venv/bin/python scripts/results_table.py            # rewrites the part between the markers in docs/results.md
    .venv/bin/python scripts/results_table.py --print    # prints it instead
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "families.json"
DOC = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- families: begin (scripts/results_table.py) -->", "<!-- families: end -->"
# Which families chose the defaults and which only confirmed them (docs/results.md says how).
ROLES = {"demo": "chosen on", "constraints": "chosen on", "refusal": "confirmation", "distractors": "confirmation"}


def spread(values: list[float], digits: int = 1) -> str:
    """'mean ± sd' over seeds (sd with n - 1; '± 0' for one seed, which is a hint, not a result)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def rows(results: dict) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for run in results["runs"]:
        groups.setdefault((run["family"], run["candidate"]), []).append(run)
    out = []
    for (family, candidate), runs in groups.items():
        runs.sort(key=lambda r: r["seed"])
        base = [100 * r["success"]["base"] / r["checked"] for r in runs]
        tuned = [100 * r["success"]["tuned"] / r["checked"] for r in runs]
        gains = [t - b for t, b in zip(tuned, base)]
        out.append({"family": family, "candidate": candidate, "role": ROLES.get(family, "?"), "seeds": [r["seed"] for r in runs],
                    "prompts": runs[0]["checked"], "steps": runs[0]["steps"], "base": spread(base), "tuned": spread(tuned),
                    "gain": statistics.fmean(gains), "gains": gains, "auc": spread([r["roc_auc"] for r in runs], 3),
                    "auc_min": min(r["roc_auc"] for r in runs),
                    "tokens": (statistics.fmean(r["tokens"]["base"] for r in runs), statistics.fmean(r["tokens"]["tuned"] for r in runs))})
    order = list(ROLES)
    out.sort(key=lambda r: (order.index(r["family"]) if r["family"] in order else 99, r["candidate"] != "defaults", r["candidate"]))
    return out


def table(results: dict) -> str:
    lines = [
        "| family | role | candidate | seeds | held-out prompts | steps | base success % | tuned success % | gain (points) | "
        "gain per seed | held-out ROC-AUC | answer tokens base -> tuned |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(results):
        lines.append(f"| {r['family']} | {r['role']} | {r['candidate']} | {', '.join(map(str, r['seeds']))} | {r['prompts']} | "
                     f"{r['steps']} | {r['base']} | {r['tuned']} | {r['gain']:+.1f} | "
                     f"{', '.join(f'{g:+.0f}' for g in r['gains'])} | {r['auc']} | {r['tokens'][0]:.0f} -> {r['tokens'][1]:.0f} |")
    return "\n".join(lines)


def task_table(results: dict) -> str:
    """Per task of each family: right answers of base and tuned, summed over the seeds (prompts x seeds)."""
    lines = ["| family | candidate | task | base right | tuned right |", "|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for run in results["runs"]:
        groups.setdefault((run["family"], run["candidate"]), []).append(run)
    order = list(ROLES)
    for (family, candidate), runs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 99, kv[0][1])):
        for task in sorted(runs[0]["task_success"]):
            n = sum(r["task_checked"][task] for r in runs)
            base, tuned = (sum(r["task_success"][task][w] for r in runs) for w in ("base", "tuned"))
            lines.append(f"| {family} | {candidate} | {task} | {base}/{n} ({100 * base / n:.0f}%) | {tuned}/{n} ({100 * tuned / n:.0f}%) |")
    return "\n".join(lines)


BEST_OF = ROOT / "docs" / "results" / "best_of.json"
SCORE_DOC = ROOT / "docs" / "score.md"
BEST_BEGIN, BEST_END = "<!-- ranking: begin (scripts/results_table.py) -->", "<!-- ranking: end -->"


def best_of_table(best: dict) -> str:
    """Best-of-N ranked by r (sum) and by r per token, from scripts/measure_score.py's figures."""
    lines = ["| answers of | greedy | random of 4 | best of 4 by r | best of 4 by r per token | random of 8 | "
             "best of 8 by r | best of 8 by r per token | any of 8 | prompts where the two picks differ (N = 8) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, model in best["models"].items():
        f = model["figures"]
        differ = sum(_pick(p, False) != _pick(p, True) for p in model["per_prompt"])
        lines.append(f"| {name} | {f['greedy']:.3f} | {f['random_of_4']:.3f} | {f['best_of_4']:.3f} | {f['best_of_4_per_token']:.3f} | "
                     f"{f['random_of_8']:.3f} | {f['best_of_8']:.3f} | {f['best_of_8_per_token']:.3f} | {f['any_of_8']:.3f} | "
                     f"{differ} of {len(model['per_prompt'])} |")
    return "\n".join(lines)


def _pick(prompt: dict, per_token: bool) -> int:
    """The arg-max (first on a tie) of r or r / tokens: qbco.eval.generate.pick_best, restated without torch."""
    values = [r / max(1, n) for r, n in zip(prompt["rewards"], prompt["tokens"])] if per_token else prompt["rewards"]
    return max(range(len(values)), key=lambda i: (values[i], -i))


def rewrite(doc: Path, begin: str, end: str, text: str) -> None:
    content = doc.read_text(encoding="utf-8")
    if begin not in content or end not in content:
        raise SystemExit(f"{doc}: no {begin} ... {end} markers")
    head, rest = content.split(begin, 1)
    doc.write_text(head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1], encoding="utf-8")
    print(f"rewrote the table in {doc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--print", action="store_true")
    args = ap.parse_args()
    results = json.loads(args.results.read_text(encoding="utf-8"))
    text = table(results) + "\n\nPer task (right answers over all seeds' held-out prompts):\n\n" + task_table(results)
    ranking = best_of_table(json.loads(BEST_OF.read_text(encoding="utf-8")))
    if args.print:
        print(text + "\n\n" + ranking)
        return
    rewrite(args.doc, BEGIN, END, text)
    rewrite(SCORE_DOC, BEST_BEGIN, BEST_END, ranking)


if __name__ == "__main__":
    main()
