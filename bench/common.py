"""What both runners share, standard library only (each runs in its own venv): arguments, the row subset,
the training order, memory readings and the one JSON line they print."""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import statistics
import sys
import time
from pathlib import Path

T_START = time.perf_counter()  # the process's start, as near as Python gets


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="a local model folder")
    p.add_argument("--data", required=True, help="a .jsonl of prompt / completion / label rows")
    p.add_argument("--rows", default=None, help="START:END, the rows of --data this run is given (default: all)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps (warm-up included)")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the step-time figures")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--max-completion", type=int, default=256)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches of --batch rows per optimizer step")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                   help="compute dtype (fp32 on a CPU; bf16 on CUDA, TRL then runs with bf16=True as by default)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="default", help="a label written into the result")
    p.add_argument("--precompute", action="store_true", help="TRL: precompute_ref_log_probs=True")
    p.add_argument("--no-4bit", action="store_true", help="a float base instead of NF4")
    p.add_argument("--gradient-checkpointing", default=None, choices=("auto", "on", "off"),
                   help="default: each tool's own (qbco auto, TRL on); TRL takes on or off")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="qbco: checkpoint every k-th layer whatever the budget (the estimate-against-peak table)")
    p.add_argument("--memory-budget", type=float, default=None, help="qbco: --memory-budget GiB")
    p.add_argument("--logprob-chunk", type=int, default=None, help="qbco: completion tokens per LM-head chunk (default: qbco's)")
    return p.parse_args()


def read_rows(path: str, span: str | None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if span:
        start, end = (int(x) for x in span.split(":"))
        rows = rows[start:end]
    return rows


def training_order(n: int, batch: int, seed: int) -> list[int]:
    """qbco's first-epoch order (qbco.data.feedback.epoch_order with epoch 0), copied so the TRL venv needs no qbco.
    TRL's BCOTrainer reads its dataset sequentially, so handing it the rows in this order gives both tools
    the same batches, step for step."""
    order = list(range(n))
    random.Random(seed * 100_003 + 0).shuffle(order)
    return order


def reset_peak_rss() -> float:
    """The peak RSS so far (MiB), then reset it to the current RSS (Linux: /proc/self/clear_refs 5), so a
    later reading is the peak of what followed: training, not loading."""
    before = peak_rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return before


def gpu_memory() -> dict:
    """The process's peak CUDA memory (torch's allocator: allocated and reserved), where torch has CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    return {"device": torch.cuda.get_device_name(), "peak_gpu_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
            "peak_gpu_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def current_rss_mb() -> float:
    m = re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) / 1024 if m else float("nan")


def allocator() -> str:
    """The malloc this process runs under, read off its mapped libraries."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    return "mimalloc" if "libmimalloc" in maps else "jemalloc" if "libjemalloc" in maps else "glibc"


def report(args, tool: str, step_seconds: list[float], step_tokens: list[int], losses: list[float],
           load_peak_mb: float, train_start_rss_mb: float, ref_s: float, whole_s: float, import_s: float,
           step_cpu: list[float], extra: dict | None = None) -> dict:
    """The one JSON line a runner prints. Step figures leave out the first --warmup steps."""
    measured_s, measured_tok = step_seconds[args.warmup:], step_tokens[args.warmup:]
    measured_cpu = step_cpu[args.warmup:len(step_seconds)]
    train_peak = peak_rss_mb()
    result = {
        "tool": tool,
        "config": args.config,
        "model": Path(args.model).name,
        "data": Path(args.data).name,
        "rows": args.rows,
        "batch": args.batch,
        "steps": len(step_seconds),
        "measured_steps": len(measured_s),
        "median_step_s": statistics.median(measured_s) if measured_s else None,
        "tokens_per_s": sum(measured_tok) / sum(measured_s) if measured_s else None,
        "tokens_per_cpu_s": sum(measured_tok) / sum(measured_cpu) if measured_cpu else None,
        "step_s": step_seconds,
        "step_cpu_s": step_cpu,
        "step_tokens": step_tokens,
        "losses": losses,
        "peak_rss_mb": max(load_peak_mb, train_peak),  # the process's peak (resource.getrusage)
        "load_peak_rss_mb": load_peak_mb,  # peak while loading model and data
        "train_peak_rss_mb": train_peak,  # peak from the reference pass / first step on
        "train_start_rss_mb": train_start_rss_mb,
        "ref_precompute_s": ref_s,
        "whole_run_s": whole_s,  # model load + data preparation + reference precompute + every step
        "import_s": import_s,
        "allocator": allocator(),
        "dtype": args.dtype,
        "grad_accum": args.grad_accum,
        **gpu_memory(),
        **(extra or {}),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return result
