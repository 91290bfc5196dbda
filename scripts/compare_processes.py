"""One process against two, through the real launchers (docs/distributed.md, "Measured on this CPU").

    python scripts/compare_processes.py --out /tmp/procs [--data demo] [--steps 12] [--seed 3] [--launchers torchrun,accelerate]

Runs, one after another (never side by side: the machine is shared),
    qbco train --data DATA --batch-size 8 --max-steps STEPS --seed SEED
    torchrun --nproc-per-node 2 --no-python qbco train --data DATA --batch-size 4 ...
    accelerate launch --multi-gpu --num-processes 2 --no-python qbco train --data DATA --batch-size 4 ...
each into its own run folder under --out, then prints, step by step, the one-process loss and each launcher's
|difference|, and the wall time of every command (start to exit, so the model load and the reference pass are
in it: what a user waits for). Every run gets an empty reference cache of its own (QBCO_CACHE under --out,
the converted models linked from the usual cache), so every run does the same work. Exit status 1 when a
loss differs by more than --tolerance, a command fails, or a launcher writes more than one run folder.
Set OMP_NUM_THREADS yourself (1 on a loaded machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def command(launcher: str, args: list[str]) -> list[str]:
    qbco = [str(BIN / "qbco"), "train"]
    if launcher == "one":
        return qbco + args + ["--batch-size", "8"]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--no-python"] + qbco + args + ["--batch-size", "4"]
    # --multi-gpu: without it accelerate starts one process on a machine without GPUs (qbco refuses that)
    return [str(BIN / "accelerate"), "launch", "--multi-gpu", "--num-processes", "2", "--no-python"] + qbco + args + [
        "--batch-size", "4"]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", default="demo")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--launchers", default="torchrun,accelerate")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    usual = Path(os.environ.get("QBCO_CACHE", Path.home() / ".cache" / "qbco")).expanduser()
    runs, seconds, failed = {}, {}, False
    for launcher in ["one"] + a.launchers.split(","):
        folder = a.out / launcher
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        cache = folder / "cache"
        cache.mkdir()
        for model in (p for p in usual.iterdir() if p.is_dir() and p.name not in ("reference", "answers")):
            (cache / model.name).symlink_to(model)
        env = {**os.environ, "QBCO_CACHE": str(cache)}
        argv = command(launcher, ["--data", a.data, "--max-steps", str(a.steps), "--seed", str(a.seed), "--quiet",
                                  "--output", str(folder / "run")])
        print("$", " ".join(argv), flush=True)
        started = time.perf_counter()
        code = subprocess.call(argv, env=env, cwd=folder)
        seconds[launcher] = time.perf_counter() - started
        written = sorted(p.name for p in folder.iterdir() if p.name != "cache")
        print(f"  exit {code}, {seconds[launcher]:.1f} s, wrote {written}", flush=True)
        if code != 0 or written != ["run"]:
            failed = True
            continue
        runs[launcher] = losses(folder / "run")
    one = runs.get("one", [])
    others = [k for k in runs if k != "one"]
    print("step  loss(1 process)  " + "  ".join(f"|diff| {k}" for k in others))
    worst = {k: 0.0 for k in others}
    for i, loss in enumerate(one):
        diffs = []
        for k in others:
            d = abs(runs[k][i] - loss) if i < len(runs[k]) else float("inf")
            worst[k] = max(worst[k], d)
            diffs.append(f"{d:.2e}")
        print(f"{i + 1:4d}  {loss:.6f}        " + "  ".join(diffs))
    for k in others:
        ok = worst[k] <= a.tolerance and len(runs[k]) == len(one)
        failed |= not ok
        print(f"{k}: largest |diff| {worst[k]:.2e} over {len(runs[k])} steps ({'ok' if ok else 'FAILED'}); wall "
              f"{seconds[k]:.1f} s against {seconds['one']:.1f} s for one process (x{seconds[k] / seconds['one']:.2f})")
    (a.out / "summary.json").write_text(json.dumps({"losses": runs, "seconds": seconds}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
