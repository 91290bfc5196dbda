#!/usr/bin/env python3
"""Rebuild docs/results.md's family tables from the committed results file (docs/results/families.json, written by
scripts/families.py): one row per family and candidate, base and tuned task success as the mean and the spread
over seeds, the gain in points, the gain in every seed, and the held-out ROC-AUC.

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


def spread(values: list[float]) -> str:
    """'mean ± sd' over seeds (sd with n - 1; '± 0' for one seed, which is a hint, not a result)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {sd:.1f}"


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
                    "gain": statistics.fmean(gains), "gains": gains, "auc": spread([r["roc_auc"] for r in runs]),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--print", action="store_true")
    args = ap.parse_args()
    text = table(json.loads(args.results.read_text(encoding="utf-8")))
    if args.print:
        print(text)
        return
    doc = args.doc.read_text(encoding="utf-8")
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{args.doc}: no {BEGIN} ... {END} markers")
    head, rest = doc.split(BEGIN, 1)
    args.doc.write_text(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1], encoding="utf-8")
    print(f"rewrote the family table in {args.doc}")


if __name__ == "__main__":
    main()
