"""Measure qbco.model.logprobs' grouping overhead on this machine: what one more decoder call costs, in positions.

length_groups splits a batch's rows into decoder calls of like length when the padding saved outweighs
`overhead` positions a call. That figure was measured on a CPU (GROUP_OVERHEAD, 64); a GPU's differs
(GROUP_OVERHEAD_CUDA, set from arithmetic until this script has run on one). It times the training step's work
for one micro-batch, completion_logps forward and backward with LoRA and checkpointing on, for one call over B
rows of L tokens at several (B, L), and fits  t = a + b * B * L  by least squares: a is a call's fixed cost,
b a position's, a / b the overhead in positions.

    .venv/bin/python bench/group_overhead.py --model smollm2-135m                      # the CPU figure
    .venv/bin/python bench/group_overhead.py --model qwen2.5-3b --device cuda          # on a GPU (bf16 or fp16)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qbco.model.loading import load_policy
from qbco.model.logprobs import completion_logps
from qbco.run.config import build_config


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(model, rows: int, length: int, vocab: int, device: torch.device, reps: int) -> float:
    """Median seconds of one decoder call (forward and backward) over rows x length tokens, half completion."""
    g = torch.Generator().manual_seed(rows * 1000 + length)
    ids = torch.randint(3, vocab, (rows, length), generator=g).to(device)
    attn = torch.ones_like(ids)
    comp = torch.zeros_like(ids)
    comp[:, length // 2 :] = 1
    times = []
    for _ in range(reps + 1):  # the first is a warm-up
        sync(device)
        start = time.perf_counter()
        completion_logps(model, ids, attn, comp).sum().backward()
        sync(device)
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) of the least-squares line t = a + b * positions."""
    n = len(points)
    mx = sum(p for p, _ in points) / n
    my = sum(t for _, t in points) / n
    b = sum((p - mx) * (t - my) for p, t in points) / sum((p - mx) ** 2 for p, _ in points)
    return my - b * mx, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--no-4bit", action="store_true")
    parser.add_argument("--rows", default="1,2,4,8", help="batch sizes B")
    parser.add_argument("--lengths", default="128,256,512,1024", help="row lengths L (tokens)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    device = torch.device(args.device)
    config = build_config(model=args.model, dtype=args.dtype, load_in_4bit=not args.no_4bit)
    _, model, _ = load_policy(config, device)
    vocab = model.get_base_model().get_output_embeddings().weight.shape[0]
    points = []
    for rows in (int(r) for r in args.rows.split(",")):
        for length in (int(n) for n in args.lengths.split(",")):
            seconds = time_call(model, rows, length, vocab, device, args.reps)
            points.append((rows * length, seconds))
            print(f"B={rows:3d} L={length:5d}: {seconds * 1000:9.1f} ms", flush=True)
    a, b = fit(points)
    result = {"model": args.model, "device": device.type, "dtype": args.dtype, "4bit": not args.no_4bit,
              "call_s": a, "position_s": b, "overhead_positions": a / b if b > 0 else None,
              "points": [{"positions": p, "seconds": t} for p, t in points],
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    overhead = f"{a / b:.0f} positions" if b > 0 else "not measurable (no growth with positions)"
    print(f"a call {a * 1000:.1f} ms, a position {b * 1e6:.1f} us: overhead {overhead}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
