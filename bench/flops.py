"""Model FLOPs of a training step and the machine's measured matmul peak: the MFU in bench results.

Model FLOPs are the matrix products the step's mathematics needs, counted the same for every tool whatever
it spends beyond them (a recomputed layer, a reference forward in every step, logits over every position):

    per row of L = P + C tokens (P prompt, C completion), with the base frozen and LoRA on every linear layer
      decoder linears   2 N L forward + 2 N L backward (the input's gradient only: W gets none)
      LoRA              2 N_lora L forward + 4 N_lora L backward (A's and B's gradients and the input's)
      attention         forward 2 L(L+1) q layers (QK^T and AV over the causal half; q = heads x head_dim),
                        backward twice that
      LM head           2 h V C forward at the positions that predict a completion token, 2 h V C backward

MFU = model FLOPs of the measured steps / their wall time / the measured peak. Standard library only where a
runner imports it; `matmul_peak` needs torch.

  .venv/bin/python bench/flops.py --peak [--threads 1] [--dtype fp32]   # the peak, as bench.py measures it
"""

from __future__ import annotations

import argparse
import json
import time


def config_numbers(hf: dict) -> dict:
    """What the count needs from a transformers config.json (a llama-style decoder)."""
    h, layers, inter = hf["hidden_size"], hf["num_hidden_layers"], hf["intermediate_size"]
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    hd = hf.get("head_dim") or h // heads
    shapes = [(h, heads * hd), (h, kv * hd), (h, kv * hd), (heads * hd, h), (h, inter), (h, inter), (inter, h)]
    return {"h": h, "layers": layers, "q": heads * hd, "vocab": hf["vocab_size"], "shapes": shapes,
            "linear": layers * sum(i * o for i, o in shapes)}


def step_flops(hf: dict, rows: list[tuple[int, int]], lora_r: int = 16) -> float:
    """Model FLOPs of one optimizer step over `rows`, each (prompt tokens, completion tokens)."""
    c = config_numbers(hf)
    lora = c["layers"] * sum(lora_r * (i + o) for i, o in c["shapes"])
    total = 0.0
    for p, comp in rows:
        length = p + comp
        total += 4 * c["linear"] * length + 6 * lora * length
        total += 3 * 2 * length * (length + 1) * c["q"] * c["layers"]
        total += 4 * c["h"] * c["vocab"] * comp
    return total


def matmul_peak(dtype: str = "fp32", device: str = "cpu", sizes=(1024, 2048, 3072), reps: int = 5) -> dict:
    """The best FLOP/s of square torch.mm products (median of `reps` each, after a warm-up) on this device.
    On a CPU also per CPU-second of the process (`peak_flops_per_cpu_s`): on a machine shared with other jobs
    the wall clock counts the time the thread waited for a core, the CPU time does not."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    best, best_cpu, per_size = 0.0, 0.0, {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        out = torch.empty(n, n, device=device, dtype=dt)
        inner = 1 if device == "cpu" else 20
        torch.mm(a, b, out=out)
        times, cpu_times = [], []
        for _ in range(reps):
            if device != "cpu":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            for _ in range(inner):
                torch.mm(a, b, out=out)
            if device != "cpu":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) / inner)
            cpu_times.append((time.process_time() - c) / inner)
        times.sort()
        cpu_times.sort()
        rate = 2 * n**3 / times[len(times) // 2]
        per_size[n] = rate
        best = max(best, rate)
        best_cpu = max(best_cpu, 2 * n**3 / cpu_times[len(cpu_times) // 2])
    out = {"dtype": dtype, "device": device, "threads": torch.get_num_threads(), "peak_flops": best, "per_size": per_size}
    if device == "cpu":
        out["peak_flops_per_cpu_s"] = best_cpu
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peak", action="store_true", help="measure the matmul peak and print it as JSON")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.peak:
        import torch

        torch.set_num_threads(args.threads)
        sizes = (1024, 2048, 3072) if args.device == "cpu" else (4096, 8192)
        print("RESULT " + json.dumps(matmul_peak(args.dtype, args.device, sizes)), flush=True)


if __name__ == "__main__":
    main()
