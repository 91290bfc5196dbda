"""How fast a run answers on this machine, by path: the 4-bit model as trained (bitsandbytes NF4 + adapter),
its fp32 twin with the adapter apart (NF4 dequantized + peft's LoRA layers) and merged in (what `qbco
generate` and `qbco eval --generate` use on a CPU), one prompt at a time and in batches. Greedy answers to
the demo's held-out prompts; the paths take turns, `--repeats` rounds, and the medians are printed.

    .venv/bin/python scripts/generation_speed.py RUN [--prompts 16] [--tokens 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from qbco.data.feedback import read_demo
from qbco.eval.generate import RunModels, Sampling, complete_all

CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = list(dict.fromkeys(e.prompt for e in read_demo()[1]))[: args.prompts]
    sampling = Sampling(max_new_tokens=args.tokens)

    exact = RunModels(args.run, CPU, path="4bit")
    unmerged = RunModels(args.run, CPU, path="float")
    merged = RunModels(args.run, CPU, path="float")
    merged.tuned().__enter__()  # merges the adapter in place
    paths = {
        "4-bit + adapter, one at a time": (exact, 1),
        "fp32 twin, adapter apart, one at a time": (unmerged, 1),
        "fp32 twin, merged, one at a time": (merged, 1),
        "4-bit + adapter, batch 16": (exact, 16),
        "fp32 twin, merged, batch 16": (merged, 16),
    }
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    answers: dict[str, list[str]] = {}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, (models, batch) in paths.items():
            start = time.perf_counter()
            out = complete_all(models.model, models.tokenizer, prompts, sampling, CPU, batch_size=batch)
            seconds[name].append(time.perf_counter() - start)
            answers[name] = out
            tokens[name] = sum(len(models.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in out)
    first = next(iter(paths))
    slowest = statistics.median(seconds[first])
    print(f"{len(prompts)} prompts, greedy, up to {args.tokens} new tokens, {args.threads} thread(s), "
          f"{args.repeats} rounds (medians)")
    for name in paths:
        s = statistics.median(seconds[name])
        print(f"{name:42s} {s:7.1f} s  {s / tokens[name]:6.3f} s/token  x{slowest / s:4.1f}  "
              f"same answers as 4-bit: {answers[name] == answers[first]}")


if __name__ == "__main__":
    main()
