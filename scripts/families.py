#!/usr/bin/env python3
"""Train and judge qbco on the task families (scripts/make_families.py) and the demo, several seeds each, the way
a user would: `qbco train --data FILE --output RUN --seed S` (plus a candidate's flags, none for the defaults),
then `qbco eval RUN --generate --slice-by task` (greedy base and tuned answers to the held-out prompts, judged by
qbco.eval.tasks.passes). One compact record per run goes into a results file (JSON, committed); the run folders
stay under --out (not committed). scripts/results_table.py rebuilds docs/results.md's tables from that file.

    .venv/bin/python scripts/families.py --families refusal distractors --seeds 0 1 2 --candidate defaults
    .venv/bin/python scripts/families.py --families demo constraints --seeds 0 --candidate sft3-1.5ep -- --epochs 1.5

A finished run already in OUT is judged again, not retrained; a record already in the results file is kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILY_FILES = {"demo": "demo", **{n: str(ROOT / "families" / f"{n}.jsonl") for n in ("constraints", "refusal", "distractors")}}
RESULTS = ROOT / "docs" / "results" / "families.json"


def train(family: str, seed: int, run: Path, flags: list[str]) -> float:
    argv = [sys.executable, "-c", "from qbco.cli.main import app; app()", "train", "--quiet", "--output", str(run), "--seed", str(seed), *flags]
    if family != "demo":
        argv += ["--data", FAMILY_FILES[family]]
    started = time.perf_counter()
    subprocess.run(argv, check=True, cwd=ROOT)
    return time.perf_counter() - started


def judge(run: Path) -> dict:
    from qbco.eval.evaluate import evaluate
    from qbco.eval.generate import Sampling
    from qbco.run.folder import RunFolder

    report = evaluate(run, slice_by="task", log=lambda m: print(f"  {m}", flush=True), generate=Sampling())
    steps = RunFolder(run).metrics().steps
    gen = report["generation"]
    records = [json.loads(line) for line in (run / "eval" / "generations.jsonl").read_text().splitlines()]
    tail = steps[-10:]
    return {
        "steps": len(steps),
        "train_seconds": steps[-1]["elapsed_s"],
        "roc_auc": report["overall"]["binary"]["roc_auc"],
        "success": gen["overall"]["success_counts"],
        "checked": gen["overall"]["checked"],
        "tokens": gen["overall"]["tokens"],
        "task_success": {t: f["success_counts"] for t, f in gen["slices"]["values"].items()},
        "task_checked": {t: f["checked"] for t, f in gen["slices"]["values"].items()},
        "reward_up": statistics.fmean(m["reward_up"] for m in tail if m.get("reward_up") is not None),
        "reward_down": statistics.fmean(m["reward_down"] for m in tail if m.get("reward_down") is not None),
        "answers": [{"prompt": r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"],
                     "base": r["base"]["answer"][:160], "tuned": r["tuned"]["answer"][:160],
                     "ok": [r["base"]["success"], r["tuned"]["success"]]} for r in records],
    }


def rejudge(record: dict, run: Path) -> dict:
    """The record's task success judged again from the run's generations.jsonl with today's checker (the answers
    are not regenerated): what a change to qbco.eval.tasks does to figures already measured."""
    from qbco.eval.tasks import passes

    records = [json.loads(line) for line in (run / "eval" / "generations.jsonl").read_text().splitlines()]
    ok = [[passes(r[w]["answer"], r["check"], r["prompt"]) for w in ("base", "tuned")] for r in records]
    tasks = sorted({r["task"] for r in records})
    record["success"] = {w: sum(o[i] for o in ok) for i, w in enumerate(("base", "tuned"))}
    record["task_success"] = {t: {w: sum(o[i] for o, r in zip(ok, records) if r["task"] == t)
                                  for i, w in enumerate(("base", "tuned"))} for t in tasks}
    for answer, o in zip(record["answers"], ok):
        answer["ok"] = o
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(FAMILY_FILES), choices=list(FAMILY_FILES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--candidate", default="defaults", help="a name for the flags after --")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "families")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--rejudge", action="store_true", help="judge every record's answers again (today's checker) and stop")
    ap.add_argument("flags", nargs="*", help="qbco train flags of the candidate (after --)")
    args = ap.parse_args()
    results = json.loads(args.results.read_text()) if args.results.is_file() else {"runs": []}
    if args.rejudge:
        for record in results["runs"]:
            rejudge(record, args.out / record["candidate"] / f"{record['family']}-{record['seed']}")
        args.results.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
        return
    for family in args.families:
        for seed in args.seeds:
            key = {"family": family, "candidate": args.candidate, "seed": seed}
            if any(all(r[k] == v for k, v in key.items()) for r in results["runs"]):
                continue
            run = args.out / args.candidate / f"{family}-{seed}"
            if not (run / "adapter").is_dir():
                print(f"[{family} seed {seed} {args.candidate}] training", flush=True)
                train(family, seed, run, args.flags)
            record = {**key, "flags": args.flags, **judge(run)}
            results["runs"].append(record)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
            s, n = record["success"], record["checked"]
            print(f"[{family} seed {seed} {args.candidate}] base {s['base']}/{n} tuned {s['tuned']}/{n} "
                  f"ROC-AUC {record['roc_auc']:.3f} steps {record['steps']}", flush=True)


if __name__ == "__main__":
    main()
