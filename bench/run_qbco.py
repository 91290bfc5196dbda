"""One qbco configuration, in this process, through qbco's own training loop (qbco.train.loop.train): prints one
JSON line (see common.report). Run with the qbco venv; bench.py calls it.

  .venv/bin/python bench/run_qbco.py --model ~/.cache/qbco/smollm2-135m-instruct --data bench/out/w1.jsonl \
      --rows 0:40 --steps 5
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from qbco.cli.allocator import restart_environment

# qbco as shipped: the qbco command restarts itself under mimalloc (qbco.cli.allocator); so does this process,
# before its clock starts. --system-allocator (QBCO_ALLOCATOR=system) measures it under glibc's malloc.
_env = restart_environment(dict(os.environ))
if _env is not None:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], _env)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # bench/ is not a package: found through the path above; its clock starts here

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# qbco caches reference log-probs on disk (qbco.model.refcache) and a later run on the same rows skips the pass.
# Every measured run starts cold, as TRL does: an empty cache of its own (--model is a folder, so nothing
# else is looked up there).
COLD_CACHE = tempfile.mkdtemp(prefix="qbco-bench-cache-")
os.environ["QBCO_CACHE"] = COLD_CACHE


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    import bitsandbytes  # noqa: F401  (imported before the clock, as run_trl.py imports its stack)
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import qbco.train.loop as qtrain
    import qbco.train.prepare as qprepare
    from qbco.run.config import build_config

    import_s = time.perf_counter() - common.T_START
    rows = common.read_rows(args.data, args.rows)
    work = Path(tempfile.mkdtemp(prefix="qbco-bench-"))
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    chunk = {"logprob_chunk": args.logprob_chunk} if args.logprob_chunk else {}
    if args.checkpoint_every:  # the plan qbco prints and reports, with k fixed instead of chosen
        import qbco.model.memory as qmemory

        qmemory.choose_every_n = lambda est, budget: args.checkpoint_every
        args.gradient_checkpointing = "auto"
    config = build_config(
        model=args.model, data=str(data), output=str(work / "run"), eval_fraction=0.0, seed=args.seed,
        beta=0.1, lr=args.lr, warmup_ratio=0.0, batch_size=args.batch, grad_accum=args.grad_accum, epochs=1.0,
        max_steps=args.steps, max_prompt_length=args.max_prompt, max_completion_length=args.max_completion,
        lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_targets="all-linear", gradient_checkpointing=args.gradient_checkpointing,
        memory_budget=args.memory_budget,
        load_in_4bit=not args.no_4bit, dtype=args.dtype, save_every=10**6, allow_one_class=True,
        **chunk,
    )

    # Time the reference pass(es) and start the training-phase memory reading where they begin: model and
    # data are loaded by then, as they are when TRL's trainer.train() starts.
    marks = {"ref_s": 0.0, "load_peak": None, "start_rss": None, "cpu": None}
    step_cpu: list[float] = []
    original = qprepare.reference_logps

    def timed_reference(*a, **k):
        if marks["load_peak"] is None:
            marks["load_peak"] = common.reset_peak_rss()
            marks["start_rss"] = common.current_rss_mb()
        t = time.perf_counter()
        out = original(*a, **k)
        marks["ref_s"] += time.perf_counter() - t
        marks["cpu"] = time.process_time()
        return out

    def step_done(optimizer, *a, **k):
        # CPU seconds of all threads between optimizer steps: less disturbed than wall time by other
        # processes on a shared machine (the first step's count starts after the reference pass).
        now = time.process_time()
        step_cpu.append(now - marks["cpu"])
        marks["cpu"] = now

    register_optimizer_step_post_hook(step_done)

    qprepare.reference_logps = timed_reference
    t0 = time.perf_counter()
    result = qtrain.train(config, log=lambda message: None)
    whole_s = time.perf_counter() - t0
    plan = result.recompute  # qbco.model.memory.Plan: what the run recomputed, its budget and estimate

    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in records if "step" in m and m.get("split") != "eval"]
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(COLD_CACHE, ignore_errors=True)
    common.report(
        args, "qbco" + (f"-chunk{args.logprob_chunk}" if args.logprob_chunk else ""),
        step_seconds=[m["tokens"] / m["tokens_per_s"] for m in steps],
        step_tokens=[m["tokens"] for m in steps], step_cpu=step_cpu,
        losses=[m["loss"] for m in steps],
        load_peak_mb=marks["load_peak"], train_start_rss_mb=marks["start_rss"],
        ref_s=marks["ref_s"], whole_s=whole_s, import_s=import_s,
        extra={"checkpoint_every": plan.every_n, "recomputed_layers": plan.estimate.recomputed_layers(plan.every_n),
               "memory_budget_gib": plan.budget / 2**30 if plan.budget is not None else None,
               "estimate_gib": plan.estimate.total(plan.every_n) / 2**30, "checkpointing": plan.summary()}
        if plan is not None else {},
    )


if __name__ == "__main__":
    main()
