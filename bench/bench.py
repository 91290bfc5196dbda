"""The benchmark driver: qbco against TRL's BCOTrainer on the same work, each configuration in a process of its
own, alternating qbco / TRL default / TRL with precomputed reference log-probs for R repetitions; then the
scaling table. Writes bench/out/results.json (after every process, so a cut run keeps what it measured) and
prints markdown tables. Run from the repository root with the qbco venv (see bench/README.md):

  .venv/bin/python bench/bench.py                 # W1 + scaling, the figures in docs/performance.md
  .venv/bin/python bench/bench.py --tiny --reps 1 --w1-steps 2   # proves the harness in a few minutes
  .venv/bin/python bench/bench.py --report        # the tables again, from results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # common, flops
THREADS = 1  # torch threads per process (--threads)
EXTRA_ENV: dict[str, str] = {}  # --ld-preload
OUT = ROOT / "bench" / "out"
QBCO_PY = ROOT / ".venv" / "bin" / "python"
TRL_PY = ROOT / "bench" / ".venv-trl" / "bin" / "python"
SMOLLM2 = Path(os.environ.get("QBCO_CACHE", Path.home() / ".cache" / "qbco")).expanduser() / "smollm2-135m-instruct"
TOOLS = {  # name: (python, script, extra flags, extra environment); W1 runs these by default, in this order
    "qbco": (QBCO_PY, "run_qbco.py", [], {}),
    "trl-default": (TRL_PY, "run_trl.py", [], {}),
    "trl-precompute": (TRL_PY, "run_trl.py", ["--precompute"], {}),
}
# The scaling table: model, batch size, tools. SmolLM2 runs batch 1 to keep 2,048-token steps affordable on a CPU.
SCALE = "qwenvocab:2:qbco+qbco-chunk1024+trl-default,smollm2:1:qbco+trl-default"


def _mimalloc_env() -> dict:
    """The allocator qbco runs under (qbco.cli.allocator), for a peer: fairness rows in W1."""
    from qbco.cli.allocator import restart_environment

    env = restart_environment({}) or {}
    return {k: env[k] for k in ("LD_PRELOAD", "MIMALLOC_PURGE_DELAY") if k in env}


EXTRA_TOOLS = {  # by name in --w1-tools or --scale
    # qbco with k fixed (every k-th layer checkpointed; off: none): the estimate against the measured peak
    "qbco-k1": (QBCO_PY, "run_qbco.py", ["--checkpoint-every", "1"], {}),
    "qbco-k2": (QBCO_PY, "run_qbco.py", ["--checkpoint-every", "2"], {}),
    "qbco-k4": (QBCO_PY, "run_qbco.py", ["--checkpoint-every", "4"], {}),
    "qbco-off": (QBCO_PY, "run_qbco.py", ["--gradient-checkpointing", "off"], {}),
    # TRL checkpoints every layer by default (BCOConfig's gradient_checkpointing=True); without it, for fairness
    "trl-default-nockpt": (TRL_PY, "run_trl.py", ["--gradient-checkpointing", "off"], {}),
    "trl-precompute-nockpt": (TRL_PY, "run_trl.py", ["--precompute", "--gradient-checkpointing", "off"], {}),
    "qbco-chunk256": (QBCO_PY, "run_qbco.py", ["--logprob-chunk", "256"], {}),
    "qbco-chunk1024": (QBCO_PY, "run_qbco.py", ["--logprob-chunk", "1024"], {}),
    "qbco-glibc": (QBCO_PY, "run_qbco.py", [], {"QBCO_ALLOCATOR": "system"}),  # qbco without its allocator
    "trl-default-mimalloc": (TRL_PY, "run_trl.py", [], "mimalloc"),  # TRL under qbco's allocator
    "trl-precompute-mimalloc": (TRL_PY, "run_trl.py", ["--precompute"], "mimalloc"),
}
PEERS = ("trl-default", "trl-precompute", "trl-default-nockpt", "trl-precompute-nockpt", "trl-default-mimalloc",
         "trl-precompute-mimalloc")
QUIET = {"load": 1.2, "checks": 3, "every_s": 30.0, "max_wait_s": 7200.0, "waited_s": 0.0}  # --quiet-load: wait_quiet


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(),
            "platform": platform.platform()}


def wait_quiet(log) -> float:
    """Wait until the 1-minute load average has stayed under QUIET['load'] for QUIET['checks'] readings in a
    row (QUIET['every_s'] apart), at most QUIET['max_wait_s'] over the whole benchmark; returns the seconds
    waited."""
    if QUIET["load"] <= 0:
        return 0.0
    t, below = time.perf_counter(), 0
    while below < QUIET["checks"]:
        below = below + 1 if os.getloadavg()[0] < QUIET["load"] else 0
        if below < QUIET["checks"]:
            if QUIET["waited_s"] + time.perf_counter() - t > QUIET["max_wait_s"]:
                log(f"  load {os.getloadavg()[0]:.2f}: the {QUIET['max_wait_s']:.0f} s of waiting are spent, measuring anyway")
                break
            time.sleep(QUIET["every_s"])
    waited = time.perf_counter() - t
    QUIET["waited_s"] += waited
    if waited > QUIET["every_s"] * QUIET["checks"] + 1:
        log(f"  waited {waited:.0f} s for a quiet machine")
    return waited


def step_rows(model: Path, data: Path, rows: str | None, steps: int, batch: int, max_prompt: int,
              max_completion: int, seed: int = 0) -> list[list[tuple[int, int]]]:
    """(prompt, completion) token counts of every row of every step, in the order both tools train on (qbco's
    first epoch; run_trl.py hands BCOTrainer the rows in that order), tokenized as qbco encodes them."""
    import tempfile

    import common

    from qbco.data.encoding import encode_all, epoch_order
    from qbco.data.feedback import load_feedback
    from qbco.model.loading import load_tokenizer

    picked = common.read_rows(str(data), rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in picked), encoding="utf-8")
        train_rows, _ = load_feedback(str(path), 0.0, seed)
        enc = encode_all(train_rows, load_tokenizer(str(model)), max_prompt, max_completion)
    return [[(len(enc[i].prompt_ids), len(enc[i].completion_ids)) for i in b] for b in epoch_order(len(enc), batch, seed, 0)][:steps]


def add_mfu(result: dict, model: Path, shapes: list[list[tuple[int, int]]], peak: float | None, warmup: int) -> None:
    """Model FLOPs per step (bench/flops.py), the achieved model FLOP/s of the measured steps and, with a
    measured peak, the MFU. The token counts must be the tool's own: a check that both trained the same rows."""
    from flops import step_flops

    hf = json.loads((model / "config.json").read_text())
    flops = [step_flops(hf, rows) for rows in shapes]
    counted = [sum(p + c for p, c in rows) for rows in shapes]
    result["step_flops"] = flops
    result["tokens_match"] = counted[: len(result["step_tokens"])] == result["step_tokens"]
    measured = result["step_s"][warmup:]
    if measured and len(flops) >= len(result["step_s"]):
        result["model_flops_per_s"] = sum(flops[warmup: len(result["step_s"])]) / sum(measured)
        if peak:
            result["mfu"] = result["model_flops_per_s"] / peak


def run_one(tool: str, model: Path, data: Path, rows: str | None, steps: int, warmup: int, batch: int,
            max_prompt: int, max_completion: int, config: str, log) -> dict:
    python, script, extra, tool_env = {**TOOLS, **EXTRA_TOOLS}[tool]
    tool_env = _mimalloc_env() if tool_env == "mimalloc" else tool_env
    cmd = [str(python), str(ROOT / "bench" / script), "--model", str(model), "--data", str(data),
           "--steps", str(steps), "--warmup", str(warmup), "--batch", str(batch), "--max-prompt", str(max_prompt),
           "--max-completion", str(max_completion), "--config", config, *extra]
    if rows:
        cmd += ["--rows", rows]
    waited = wait_quiet(log)
    load_before = os.getloadavg()[0]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), **EXTRA_ENV, **tool_env}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    wall = time.perf_counter() - t
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        log(f"  {tool} {config}: FAILED (exit {proc.returncode})\n{tail}")
        return {"tool": tool, "config": config, "error": tail, "process_wall_s": wall}
    result = json.loads(lines[-1][len("RESULT "):])
    result["tool"] = tool  # the variant's name (qbco-glibc, trl-precompute-mimalloc), not the runner's
    result.update(process_wall_s=wall, load_avg_before=load_before, load_avg_after=os.getloadavg()[0], waited_s=waited)
    plan = f"  [{result['checkpointing']}]" if "checkpointing" in result and isinstance(result["checkpointing"], str) else ""
    log(f"  {tool:15s} {config:22s} median step {result['median_step_s']:.2f}s  {result['tokens_per_s']:.1f} tok/s  "
        f"peak RSS {result['peak_rss_mb']:.0f} MiB (training {result['train_peak_rss_mb']:.0f})  "
        f"ref {result['ref_precompute_s']:.1f}s  whole {result['whole_run_s']:.1f}s  [{wall:.0f}s, load {load_before:.1f}]{plan}")
    return result


def measure_peak(log) -> dict:
    """This machine's fp32 matmul peak at the processes' thread count (bench/flops.py --peak), in a process
    of its own as the tools run, after waiting for quiet like them."""
    wait_quiet(log)
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    proc = subprocess.run([str(QBCO_PY), str(ROOT / "bench" / "flops.py"), "--peak", "--threads", str(THREADS)],
                          capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    peak = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1][len("RESULT "):])
    peak["load_avg"] = os.getloadavg()[0]
    log(f"fp32 matmul peak: {peak['peak_flops'] / 1e9:.1f} GFLOP/s on {THREADS} thread(s) "
        f"({', '.join(f'{n}: {v / 1e9:.1f}' for n, v in peak['per_size'].items())}; load {peak['load_avg']:.2f})")
    return peak


def save(results: dict) -> None:
    OUT.mkdir(exist_ok=True)
    name = results["name"]  # a harness check or a variant never overwrites the main figures
    tmp = OUT / (name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1), encoding="utf-8")
    tmp.replace(OUT / name)


# ---------------------------------------------------------------- tables


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def cpu_mfu(r: dict, peak: dict) -> float | None:
    """Model FLOPs of the measured steps per CPU-second of the process, over the matmul peak per CPU-second:
    the MFU the wall clock of a shared machine cannot disturb (one thread per process)."""
    per_cpu = peak.get("peak_flops_per_cpu_s")
    flops, cpu = r.get("step_flops"), r.get("step_cpu_s")
    if not (per_cpu and flops and cpu):
        return None
    w, n = r["steps"] - r["measured_steps"], r["steps"]
    return sum(flops[w:n]) / sum(cpu[w:n]) / per_cpu


def w1_table(runs: list[dict], peak: dict | None = None) -> str:
    peak = peak or {}
    ok = [r for r in runs if "error" not in r]
    by = {t: [r for r in ok if r["tool"] == t] for t in dict.fromkeys(r["tool"] for r in ok)}
    fig = {}
    for tool, rs in by.items():
        if not rs:
            continue
        fig[tool] = {
            "n": len(rs),
            "step": med([r["median_step_s"] for r in rs]),
            "tps": med([r["tokens_per_s"] for r in rs]),
            "cpu_tps": med([r.get("tokens_per_cpu_s") for r in rs]),
            "rss": med([r["peak_rss_mb"] for r in rs]),
            "train_rss": med([r["train_peak_rss_mb"] for r in rs]),
            "growth": med([r["train_peak_rss_mb"] - r["train_start_rss_mb"] for r in rs]),
            "ref": med([r["ref_precompute_s"] for r in rs]),
            "whole": med([r["whole_run_s"] for r in rs]),
            "whole_tps": med([sum(r["step_tokens"]) / r["whole_run_s"] for r in rs]),
            "mfu": med([r.get("mfu") for r in rs]),
            "mfu_cpu": med([cpu_mfu(r, peak) for r in rs]),
            "gflops": med([r.get("model_flops_per_s") for r in rs]) / 1e9,
            "ckpt": "; ".join(sorted({str(r.get("checkpointing", "?")) for r in rs})),
            "est": med([r.get("estimate_gib") for r in rs]) * 1024,
            "load": max(max(r.get("load_avg_before", 0), r.get("load_avg_after", 0)) for r in rs),
        }
    columns = ["tool", "checkpointing", "runs", "median step (s)", "tokens/s", "tokens per CPU-second", "model GFLOP/s", "MFU",
               "MFU per CPU-second",
               "peak RSS (MiB)", "qbco's estimate (MiB)", "training-phase peak RSS (MiB)", "growth over the loaded model (MiB)",
               "reference precompute (s)", "whole run (s)", "whole-run tokens/s", "highest load"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for tool, f in fig.items():
        lines.append(f"| {tool} | {f['ckpt']} | {f['n']} | {f['step']:.2f} | {f['tps']:.1f} | {f['cpu_tps']:.1f} | {f['gflops']:.1f} | "
                     f"{f['mfu']:.0%} | {f['mfu_cpu']:.0%} | {f['rss']:.0f} | {f['est']:.0f} | {f['train_rss']:.0f} | {f['growth']:.0f} | "
                     f"{f['ref']:.1f} | {f['whole']:.1f} | {f['whole_tps']:.1f} | {f['load']:.2f} |")
    if "qbco" in fig:
        lines += ["", "| qbco / peer | tokens/s | tokens per CPU-second | median step time | peak RSS | training-phase peak RSS | growth | whole-run time |",
                  "|---|---|---|---|---|---|---|---|"]
        q = fig["qbco"]
        for peer in PEERS:
            if peer in fig:
                p = fig[peer]
                lines.append(f"| vs {peer} | {q['tps'] / p['tps']:.2f}x | {q['cpu_tps'] / p['cpu_tps']:.2f}x | {q['step'] / p['step']:.2f}x | "
                             f"{q['rss'] / p['rss']:.2f}x | {q['train_rss'] / p['train_rss']:.2f}x | "
                             f"{q['growth'] / p['growth']:.2f}x | {q['whole'] / p['whole']:.2f}x |")
        reps = sorted({r["config"] for r in ok})
        for key, what in (("tokens_per_s", "tokens/s"), ("tokens_per_cpu_s", "tokens per CPU-second")):
            per_rep = []
            for peer in PEERS:
                ratios = []
                for rep in reps:
                    a = [r for r in ok if r["config"] == rep and r["tool"] == "qbco"]
                    b = [r for r in ok if r["config"] == rep and r["tool"] == peer]
                    if a and b and a[0].get(key) and b[0].get(key):
                        ratios.append(a[0][key] / b[0][key])
                if ratios:
                    per_rep.append(f"{peer}: " + ", ".join(f"{x:.2f}x" for x in ratios))
            if per_rep:
                lines += ["", f"{what} ratio qbco / peer within each repetition: " + "; ".join(per_rep)]
    return "\n".join(lines)


def scale_table(runs: list[dict]) -> str:
    ok = [r for r in runs if "error" not in r]
    lines = ["| model | length | batch | tool | tokens/s | tokens per CPU-second | peak RSS (MiB) | training-phase peak (MiB) | growth over the loaded model (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(ok, key=lambda r: (r["model"], int(r["config"].split("-L")[-1]), r["tool"])):
        lines.append(f"| {r['model']} | {r['config'].split('-L')[-1]} | {r['batch']} | {r['tool']} | {r['tokens_per_s']:.1f} | "
                     f"{r.get('tokens_per_cpu_s') or float('nan'):.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['train_peak_rss_mb']:.0f} | {r['train_peak_rss_mb'] - r['train_start_rss_mb']:.0f} |")
    failed = [r for r in runs if "error" in r]
    for r in failed:
        lines.append(f"| {r['config']} | | {r['tool']} | failed: {r['error'].splitlines()[-1][:80]} | | | | | |")
    return "\n".join(lines)


def report(results: dict) -> str:
    peak = results.get("matmul_peak") or {}
    parts = [f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, {results['machine']['memory']}; "
             f"{results.get('threads', '?')} torch thread(s) per process; started {results['started']}"
             + (f"; measured {peak['dtype']} matmul peak {peak['peak_flops'] / 1e9:.1f} GFLOP/s" if peak else "")
             + (f" ({peak['peak_flops_per_cpu_s'] / 1e9:.1f} per CPU-second)" if peak.get("peak_flops_per_cpu_s") else "")
             + (f"; LD_PRELOAD={results['ld_preload']}" if results.get("ld_preload") else "")]
    if results.get("w1"):
        parts += ["", "### W1", "", w1_table(results["w1"], results.get("matmul_peak"))]
    if results.get("scale"):
        parts += ["", "### Scaling", "", scale_table(results["scale"])]
    return "\n".join(parts)


# ---------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=2, help="W1 repetitions (each runs all three tools)")
    p.add_argument("--w1-steps", type=int, default=3, help="optimizer steps per W1 process, warm-up included")
    p.add_argument("--w1-tools", default=",".join(TOOLS), help=f"W1 tools in the order run (default {','.join(TOOLS)}; "
                   f"also {', '.join(EXTRA_TOOLS)})")
    p.add_argument("--name", default=None, help="results file in bench/out (default results.json)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--scale", default=SCALE, help="MODEL:BATCH:TOOL+TOOL,... for the scaling table, or none "
                   f"(default {SCALE})")
    p.add_argument("--scale-lengths", default="256,512,1024,2048")
    p.add_argument("--scale-steps", type=int, default=2)
    p.add_argument("--phases", default="w1,scale")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process. 1 by default: on a machine shared with other jobs a 2-thread "
                        "step waits at every parallel region for its descheduled thread and identical runs differed "
                        "7x; one thread's CPU time per step is steady (see docs/performance.md)")
    p.add_argument("--tiny", action="store_true", help="harness check: the tiny large-vocabulary model, short rows")
    p.add_argument("--ld-preload", default=None,
                   help="an allocator for every tool, e.g. /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 (apt install "
                        "libjemalloc2); results go to results-jemalloc.json")
    p.add_argument("--quiet-load", type=float, default=QUIET["load"],
                   help="before each process, wait until the 1-minute load average stays under this (0: never wait)")
    p.add_argument("--max-wait", type=float, default=QUIET["max_wait_s"], help="seconds to wait for quiet over the whole run")
    p.add_argument("--peak-now", action="store_true", help="with --report: measure the matmul peak again and keep it")
    p.add_argument("--report", action="store_true", help="print the tables from results.json (with --tiny: results-tiny.json) and stop")
    args = p.parse_args()

    global THREADS
    THREADS = args.threads
    QUIET.update(load=args.quiet_load, max_wait_s=args.max_wait)
    name = args.name or ("results-tiny.json" if args.tiny else "results-jemalloc.json" if args.ld_preload else "results.json")
    if args.ld_preload:
        EXTRA_ENV["LD_PRELOAD"] = args.ld_preload
    if args.report:
        results = json.loads((OUT / name).read_text())
        if args.peak_now:  # the peak again, e.g. on a quieter machine or by CPU time; saved with the results
            results["matmul_peak"] = measure_peak(lambda m: print(m, flush=True))
            save(results)
        print(report(results))
        return
    for python in (QBCO_PY, TRL_PY):
        if not python.exists():
            sys.exit(f"{python} is missing: run scripts/setup.sh and bench/setup_trl.sh first")
    if not (OUT / "w1.jsonl").is_file() or not (OUT / "tiny-qwen-vocab" / "config.json").is_file():
        sys.exit("bench/out has no data: run .venv/bin/python bench/make_data.py first")

    results = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:],
               "threads": args.threads, "tiny": args.tiny, "name": name,
               "ld_preload": args.ld_preload, "w1": [], "scale": []}
    log = lambda m: print(m, flush=True)
    tiny = OUT / "tiny-qwen-vocab"
    results["matmul_peak"] = measure_peak(log)
    save(results)
    phases = args.phases.split(",")

    if "w1" in phases:
        rows_per = args.w1_steps * (2 if args.tiny else 8)
        w1_tools = args.w1_tools.split(",")
        log(f"W1: {args.reps} repetitions x {w1_tools}, {args.w1_steps} steps ({args.warmup} warm-up) on {rows_per} rows each")
        for rep in range(args.reps):
            span = f"{rep * rows_per}:{(rep + 1) * rows_per}"
            if args.tiny:
                shapes = step_rows(tiny, OUT / "scale-qwenvocab-256.jsonl", f"0:{rows_per}", args.w1_steps, 2, 256, 256)
            else:
                shapes = step_rows(SMOLLM2, OUT / "w1.jsonl", span, args.w1_steps, 8, 256, 256)
            for tool in w1_tools:
                if args.tiny:
                    r = run_one(tool, tiny, OUT / "scale-qwenvocab-256.jsonl", f"0:{rows_per}", args.w1_steps,
                                args.warmup, 2, 256, 256, f"tiny-rep{rep}", log)
                else:
                    r = run_one(tool, SMOLLM2, OUT / "w1.jsonl", span, args.w1_steps, args.warmup, 8, 256, 256,
                                f"w1-rep{rep}", log)
                if "error" not in r:
                    add_mfu(r, tiny if args.tiny else SMOLLM2, shapes, results["matmul_peak"]["peak_flops"], args.warmup)
                    log(f"    model {r.get('model_flops_per_s', 0) / 1e9:.1f} GFLOP/s, MFU {r.get('mfu', 0):.0%}"
                        + ("" if r["tokens_match"] else "  (token counts differ from qbco's encoding!)"))
                results["w1"].append(r)
                save(results)

    if "scale" in phases and args.scale != "none":
        lengths = [int(x) for x in args.scale_lengths.split(",")]
        if args.tiny:
            lengths = lengths[:1]
        for spec in args.scale.split(","):
            name, batch, tools = spec.split(":")
            batch, tools = int(batch), tools.split("+")
            model = {"qwenvocab": tiny, "smollm2": SMOLLM2}[name]
            if args.tiny and name != "qwenvocab":
                continue
            rows = batch * args.scale_steps
            log(f"scaling: {name}, batch {batch}, {args.scale_steps} steps ({args.warmup} warm-up), {tools}")
            for length in lengths:
                for tool in tools:
                    r = run_one(tool, model, OUT / f"scale-{name}-{length}.jsonl", f"0:{rows}", args.scale_steps,
                                args.warmup, batch, length, length, f"{name}-L{length}", log)
                    results["scale"].append(r)
                    save(results)

    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save(results)
    print()
    print(report(results))


if __name__ == "__main__":
    main()
