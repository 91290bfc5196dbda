"""The GPU check: qbco against TRL's BCOTrainer on a Qwen2.5-3B-shaped model with random weights, at prompt
1,536 + completion 512 tokens, a few optimizer steps each; tokens/s, peak GPU memory and MFU per tool.

bench/gpu/run.sh runs it on a bare GPU machine after installing the carried wheels (bench/gpu/README.md).
Everything it needs is made here: the model from bench/gpu/qwen2.5-3b.json (random bf16 weights, written
once to --work), a word-level tokenizer of Qwen2.5's 151,936 tokens, rows of exactly --prompt + --completion
tokens. Each tool runs in a process of its own (bench/run_qbco.py, bench/run_trl.py: the same runners as
the CPU benchmark, with --dtype bf16), under a deadline so that the whole check ends in time.

  python3 bench/gpu/gpu_bench.py --out DIR              # on the GPU machine (run.sh does this)
  .venv/bin/python bench/gpu/gpu_bench.py --dry-run --python-trl bench/.venv-trl/bin/python   # the CPU part, here
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))  # bench/: flops, make_data
T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {message}", flush=True)


def llama_config(shape: dict, dry_run: bool):
    """Qwen2.5's shape as a LlamaConfig: the same decoder (Qwen2 is llama with biased q/k/v projections;
    attention_bias here biases o_proj too, 2,048 parameters a layer). Not a qwen2 config because transformers
    then loads the folder's tokenizer as Qwen's BPE class and loses the word-level vocabulary. --dry-run: 2
    layers, hidden 256, the full vocabulary (the LM head is the part of Qwen's shape a CPU can still run)."""
    from transformers import LlamaConfig

    size = dict(hidden_size=256, intermediate_size=1376, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1) if dry_run else {}
    fields = {k: shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                    "num_key_value_heads", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                                    "vocab_size", "max_position_embeddings", "hidden_act", "initializer_range")}
    fields.update(size)
    return LlamaConfig(**fields, attention_bias=True, pad_token_id=0, eos_token_id=2, bos_token_id=None)


def build_model(folder: Path, dry_run: bool) -> Path:
    """Random weights in bf16 (fp32 for the dry run), made on the GPU where there is one, written once."""
    import torch
    from make_data import word_tokenizer
    from transformers import LlamaForCausalLM

    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    shape = json.loads((HERE / "qwen2.5-3b.json").read_text())
    config = llama_config(shape, dry_run)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(torch.float32 if dry_run else torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    word_tokenizer(config.vocab_size).save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    log(f"model: {n / 1e9:.2f} B parameters ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"vocabulary {config.vocab_size}) written to {folder}")
    return folder


def write_rows(path: Path, n: int, prompt: int, completion: int, vocab: int) -> None:
    """Rows of exactly `prompt` + `completion` tokens: without a chat template qbco's prompt is the text plus
    a blank line (nothing under whitespace splitting), and the completion gets the EOS."""
    rng = random.Random(0)
    rows = [{"prompt": " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(prompt)),
             "completion": " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(completion - 1)),
             "label": i % 2 == 0} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def run_tool(name: str, python: str, model: Path, data: Path, args, deadline: float) -> dict:
    script, extra = {
        "qbco": ("run_qbco.py", ["--memory-budget", str(args.budget)] if args.budget else []),
        "trl-default": ("run_trl.py", []),
        "trl-precompute": ("run_trl.py", ["--precompute"]),
    }[name]
    rows = args.batch * args.grad_accum * args.steps
    cmd = [python, str(ROOT / "bench" / script), "--model", str(model), "--data", str(data), "--rows", f"0:{rows}",
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch), "--grad-accum",
           str(args.grad_accum), "--max-prompt", str(args.prompt), "--max-completion", str(args.completion),
           "--dtype", args.dtype, "--config", "gpu-dry-run" if args.dry_run else "gpu", *extra]
    budget = deadline - time.perf_counter()
    if budget < 30:
        log(f"{name}: skipped, {budget:.0f} s left before the deadline")
        return {"tool": name, "error": "skipped: deadline"}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=min(args.tool_timeout, budget))
    except subprocess.TimeoutExpired as err:
        tail = ((err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or ""))[-2000:]
        log(f"{name}: timed out after {time.perf_counter() - t:.0f} s\n{tail}")
        return {"tool": name, "error": "timeout"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        log(f"{name}: FAILED (exit {proc.returncode})\n{tail}")
        return {"tool": name, "error": tail}
    result = json.loads(lines[-1][len("RESULT "):])
    result["tool"], result["process_wall_s"] = name, time.perf_counter() - t
    return result


def add_mfu(result: dict, hf: dict, args, peak: float) -> None:
    from flops import step_flops

    per_step = step_flops(hf, [(args.prompt, args.completion)] * (args.batch * args.grad_accum))
    measured = result["step_s"][args.warmup:]
    result["step_flops"] = per_step
    per_step_tokens = (args.prompt + args.completion) * args.batch * args.grad_accum
    result["tokens_match"] = all(t == per_step_tokens for t in result["step_tokens"])
    if measured:
        result["model_flops_per_s"] = per_step * len(measured) / sum(measured)
        result["mfu"] = result["model_flops_per_s"] / peak


def table(results: list[dict], peak: dict, args) -> str:
    gib = 2**30 / 2**20
    lines = [f"matmul peak ({peak['dtype']}, {peak['device']}): {peak['peak_flops'] / 1e12:.1f} TFLOP/s; "
             f"rows of {args.prompt} + {args.completion} tokens, batch {args.batch} x {args.grad_accum} accumulated, "
             f"{args.steps} steps ({args.warmup} warm-up)", "",
             "| tool | checkpointing | tokens/s | peak GPU allocated (GiB) | peak GPU reserved (GiB) | qbco's estimate (GiB) "
             "| model TFLOP/s | MFU | whole run (s) | same tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['tool']} | failed: {r['error'].splitlines()[-1][:100] if r['error'] else ''} | | | | | | | | |")
            continue
        alloc, reserved = r.get("peak_gpu_allocated_mb"), r.get("peak_gpu_reserved_mb")
        lines.append(
            f"| {r['tool']} | {r.get('checkpointing', '')} | {r['tokens_per_s']:.0f} | "
            f"{alloc / gib if alloc else float('nan'):.2f} | {reserved / gib if reserved else float('nan'):.2f} | "
            f"{r.get('estimate_gib') or float('nan'):.2f} | {r.get('model_flops_per_s', 0) / 1e12:.1f} | "
            f"{r.get('mfu', float('nan')):.1%} | {r['whole_run_s']:.1f} | {r.get('tokens_match')} |")
    ok = {r["tool"]: r for r in results if "error" not in r}
    if "qbco" in ok:
        q = ok["qbco"]
        lines.append("")
        alloc = q.get("peak_gpu_allocated_mb")
        if alloc:
            lines.append(f"target: qbco's peak <= 12 GiB: {alloc / gib:.2f} GiB -> {'met' if alloc / gib <= 12 else 'MISSED'}")
        for peer in ("trl-default", "trl-precompute"):
            if peer in ok:
                ratio = q["tokens_per_s"] / ok[peer]["tokens_per_s"]
                lines.append(f"target: qbco >= 1.5x {peer} tokens/s: {ratio:.2f}x -> {'met' if ratio >= 1.5 else 'MISSED'}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu"), help="where gpu-results.json goes")
    p.add_argument("--work", default="/tmp/qbco-gpu", help="where the model and the rows are written")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--prompt", type=int, default=1536)
    p.add_argument("--completion", type=int, default=512)
    p.add_argument("--budget", type=float, default=11.0,
                   help="qbco's --memory-budget GiB: a 12 GiB card less the CUDA context and the allocator's slack")
    p.add_argument("--tools", default="qbco,trl-default,trl-precompute")
    p.add_argument("--deadline", type=float, default=400.0, help="seconds from the start for everything")
    p.add_argument("--tool-timeout", type=float, default=150.0)
    p.add_argument("--python-qbco", default=sys.executable)
    p.add_argument("--python-trl", default=sys.executable)
    p.add_argument("--dry-run", action="store_true",
                   help="the CPU part: a 2-layer model with Qwen's vocabulary, fp32, rows of 96 + 32 tokens")
    args = p.parse_args()
    import torch
    from flops import matmul_peak

    deadline = T0 + args.deadline
    cuda = torch.cuda.is_available()
    if args.dry_run:
        args.prompt, args.completion, args.grad_accum, args.steps, args.budget = 96, 32, 2, 2, None
        args.work = args.work + "-dry-run"
    elif not cuda:
        sys.exit("no CUDA device: run with --dry-run for the CPU part")
    args.dtype = "fp32" if args.dry_run else "bf16"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device "
        f"{torch.cuda.get_device_name() if cuda else 'cpu'}")
    peak = matmul_peak("bf16", "cuda", (4096, 8192)) if cuda else matmul_peak("fp32", "cpu", (512, 1024), reps=3)
    log(f"matmul peak {peak['peak_flops'] / 1e12:.2f} TFLOP/s ({peak['dtype']})")
    work = Path(args.work)
    model = build_model(work / "model", args.dry_run)
    hf = json.loads((model / "config.json").read_text())
    data = work / f"rows-{args.prompt}-{args.completion}.jsonl"
    write_rows(data, args.batch * args.grad_accum * args.steps, args.prompt, args.completion, hf["vocab_size"])
    results = []
    for name in args.tools.split(","):
        python = args.python_qbco if name == "qbco" else args.python_trl
        log(f"{name}: running")
        r = run_tool(name, python, model, data, args, deadline)
        if "error" not in r:
            add_mfu(r, hf, args, peak["peak_flops"])
            log(f"{name}: {r['tokens_per_s']:.0f} tokens/s, peak GPU {r.get('peak_gpu_allocated_mb', 0) / 1024:.2f} GiB, "
                f"MFU {r.get('mfu', 0):.1%}, {r.get('checkpointing', '')}")
        results.append(r)
        (out / "gpu-results.json").write_text(json.dumps({"args": vars(args), "peak": peak, "results": results}, indent=1))
    print()
    print(table(results, peak, args), flush=True)


if __name__ == "__main__":
    main()
