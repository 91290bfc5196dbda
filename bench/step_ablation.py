"""What each of qbco's speed-ups buys, one at a time: forward + backward of `completion_logps` on one W1 batch
(the first 8 rows of bench/out/w1.jsonl, SmolLM2 in NF4, LoRA r=16 on every linear layer, checkpointing, fp32,
one thread), each configuration in a process of its own, the configurations alternating for --reps rounds.

  .venv/bin/python bench/step_ablation.py --reps 1 --steps 3        # the table in docs/performance.md

Configurations, each adding one change to the one before:
  before     peft's LoRA forward, one decoder call per batch, LM-head chunks of 1024 tokens checkpointed (the
             code before these changes), glibc's malloc
  +groups    rows of unlike length in separate decoder calls (qbco.model.logprobs.length_groups)
  +fused     LoRA fused into the base layer's output (qbco.model.fused_lora)
  +head      the LM head's gradient taken in forward, chunks of 2^24 logits (qbco.model.logprobs.HeadLogps)
  +mimalloc  the allocator the qbco command runs under (qbco.cli.allocator): qbco as shipped
The runner is this file with --child; it prints one RESULT line (median step time of the steps after the first,
peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {  # name: (runner flags, extra environment)
    "before": (["--unfused", "--one-call", "--checkpoint-head", "--chunk", "1024"], {"QBCO_ALLOCATOR": "system"}),
    "+groups": (["--unfused", "--checkpoint-head", "--chunk", "1024"], {"QBCO_ALLOCATOR": "system"}),
    "+fused": (["--checkpoint-head", "--chunk", "1024"], {"QBCO_ALLOCATOR": "system"}),
    "+head": ([], {"QBCO_ALLOCATOR": "system"}),
    "+mimalloc": ([], "mimalloc"),
}


def child(args) -> None:
    import resource

    import torch

    torch.set_num_threads(1)
    import qbco.model.logprobs as ql
    from qbco.cli.allocator import active
    from qbco.data import encoding, feedback
    from qbco.model import loading as models
    from qbco.model.fused_lora import unfuse_lora
    from qbco.run.config import build_config

    smollm2 = Path(os.environ.get("QBCO_CACHE", Path.home() / ".cache" / "qbco")).expanduser() / "smollm2-135m-instruct"
    config = build_config(model=str(smollm2), data="demo", output="unused", dtype="fp32")
    tokenizer, model, _ = models.load_policy(config)
    if args.unfused:
        unfuse_lora(model)
    if args.one_call:
        ql.GROUP_OVERHEAD = 10**9
    if args.checkpoint_head:
        from torch.utils.checkpoint import checkpoint

        ql.HeadLogps.apply = lambda h, t, head, transform: checkpoint(ql.token_logps, head, h, t, transform, use_reentrant=False)
    rows = [json.loads(line) for line in (ROOT / "bench/out/w1.jsonl").read_text().splitlines()[:8]]
    encoded = encoding.encode_all(feedback.rows_to_examples(rows, "w1"), tokenizer, 256, 256)
    b = encoding.collate(encoded, list(range(8)), tokenizer.pad_token_id)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        ql.completion_logps(model, b.input_ids, b.attention_mask, b.completion_mask, args.chunk).sum().backward()
        times.append(time.perf_counter() - t)
    print("RESULT " + json.dumps({
        "step_s": times, "median_step_s": statistics.median(times[1:] or times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "allocator": active(),
        "tokens": int(b.attention_mask.sum()), "positions": int(b.attention_mask.numel()),
    }), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="steps per process; the first is left out of the median")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--unfused", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--one-call", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint-head", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    from qbco.cli.allocator import restart_environment

    mimalloc = {k: v for k, v in (restart_environment({}) or {}).items() if k in ("LD_PRELOAD", "MIMALLOC_PURGE_DELAY")}
    results = []
    for rep in range(args.reps):
        for name, (flags, env) in CONFIGS.items():
            env = mimalloc if env == "mimalloc" else env
            cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps), *flags]
            full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", **env}
            out = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=ROOT, check=False)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            r = {"config": name, "rep": rep, **json.loads(line[-1][7:])}
            results.append(r)
            print(f"{name:10s} rep {rep}: median step {r['median_step_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MiB, "
                  f"{r['allocator']}", flush=True)
    (ROOT / "bench/out/step_ablation.json").write_text(json.dumps(results, indent=1))
    base = statistics.median(r["median_step_s"] for r in results if r["config"] == "before")
    print("\n| configuration | median step (s) | speed-up over before | peak RSS (MiB) |\n|---|---|---|---|")
    for name in CONFIGS:
        rs = [r for r in results if r["config"] == name]
        step = statistics.median(r["median_step_s"] for r in rs)
        rss = statistics.median(r["peak_rss_mb"] for r in rs)
        print(f"| {name} | {step:.2f} | {base / step:.2f}x | {rss:.0f} |")


if __name__ == "__main__":
    main()
