#!/usr/bin/env python3
"""The figures of docs/score.md, from a finished demo run:

1. calibration on held-out rows it did not see: the run's held-out rows, as `qbco score RUN --data demo`
   scored them (4-bit base + adapter, as trained), split in two by prompt, a Platt scale fit on one half and
   the ECE measured on the other (and the other way round), over many random splits;
2. best-of-N on the demo's held-out prompts: the share of correct answers for greedy decoding, a random one
   of N samples (the mean over the N: its expectation) and the sample with the highest reward of the run,
   N = 4 and 8, for the base (adapter off) and the tuned model; every sample is scored with the run's reward.

Answers come from the run's fp32 twin (the NF4 weights dequantized, the adapter merged in fp32: the same
model, fast on a CPU; its rewards are compared with the 4-bit model's in the output). The demo's tasks are
checked by qbco's one checker (qbco.eval.tasks.passes with each row's check, as `qbco eval --generate` judges),
which agrees with the demo's own labels on every row (also in the output). Best-of-N is ranked two ways: by the
run's reward r (a sum over the answer's tokens) and by r per token (r / tokens).

    qbco score RUN --data demo -o scored.jsonl
    OMP_NUM_THREADS=1 python scripts/measure_score.py RUN --scored scored.jsonl --out figures.json [--per-task 5] [--n 8] [--models tuned]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- the demo's tasks, checked by qbco's one checker


def demo_items() -> dict[str, dict]:
    """prompt -> {"task", "check"}: every demo row carries its check (qbco.eval.tasks, the checker `qbco eval
    --generate` uses)."""
    rows = [json.loads(line) for line in (ROOT / "qbco" / "data" / "demo.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["prompt"]: {"task": r["task"], "check": r["check"], "prompt": r["prompt"]} for r in rows}


def correct(item: dict, answer: str) -> bool:
    from qbco.eval.tasks import passes

    return passes(answer, item["check"], item["prompt"])


def checker_agreement(items: dict[str, dict]) -> dict:
    """The checker against the demo's labels on every demo row: a thumbs-up row is a right answer, a
    thumbs-down row (wrong, evasive or rude) is not."""
    from qbco.data.feedback import read_demo

    train, held = read_demo()
    rows = train + held
    agree = sum(correct(items[e.prompt], e.completion) == e.label for e in rows)
    ups = [e for e in rows if e.label]
    return {"rows": len(rows), "agree": agree, "thumbs_up_judged_correct": sum(correct(items[e.prompt], e.completion) for e in ups),
            "thumbs_up": len(ups)}


# ---------------------------------------------------------------- calibration on unseen rows


def calibration_on_unseen_rows(scored: Path, splits: int) -> dict:
    """From `qbco score RUN --data demo -o SCORED`: the run's held-out rows, split in two halves by prompt
    `splits` times; each half's Platt fit is measured on the other half."""
    from qbco.data.feedback import read_demo
    from qbco.reward import metrics
    from qbco.reward.calibration import calibrate

    prompt_of = {e.source: e.prompt_key for part in read_demo() for e in part}
    lines = [json.loads(line) for line in scored.read_text(encoding="utf-8").splitlines()]
    held = [line for line in lines if line.get("held_out")]
    if not held:
        raise SystemExit(f"{scored}: no held-out rows marked; score the run's own data (qbco score RUN --data demo)")
    m = np.array([line["reward_minus_delta"] for line in held])
    y = np.array([line["label"] for line in held], dtype=bool)
    keys = [prompt_of[line["source"]] for line in held]
    prompts = sorted(set(keys))
    raw_ece, after_ece, raw_ll, after_ll, fits = [], [], [], [], []
    for k in range(splits):
        order = list(prompts)
        random.Random(k).shuffle(order)
        half = set(order[: len(order) // 2])
        in_half = np.array([key in half for key in keys])
        for fit_rows in (in_half, ~in_half):
            cal = calibrate(m[fit_rows], y[fit_rows], f"split {k}")
            test = ~fit_rows
            raw_p, cal_p = metrics.p_up(torch.from_numpy(m[test]), 0.0), cal.p_up(m[test])
            raw_ece.append(metrics.ece(raw_p, y[test]))
            after_ece.append(metrics.ece(cal_p, y[test]))
            raw_ll.append(float(metrics.log_loss(y[test], raw_p, labels=[False, True])))
            after_ll.append(float(metrics.log_loss(y[test], cal_p, labels=[False, True])))
            fits.append((cal.a, cal.b))
    whole = calibrate(m, y, "all held-out rows")
    return {
        "rows": len(held), "prompts": len(prompts), "splits": splits, "evaluations": len(raw_ece),
        "ece_uncalibrated_mean": float(np.mean(raw_ece)), "ece_calibrated_mean": float(np.mean(after_ece)),
        "ece_uncalibrated_sd": float(np.std(raw_ece)), "ece_calibrated_sd": float(np.std(after_ece)),
        "calibration_lowered_ece_share": float(np.mean(np.array(after_ece) < np.array(raw_ece))),
        "log_loss_uncalibrated_mean": float(np.mean(raw_ll)), "log_loss_calibrated_mean": float(np.mean(after_ll)),
        "a_range": [float(min(f[0] for f in fits)), float(max(f[0] for f in fits))],
        "first_split": {"ece_uncalibrated": raw_ece[:2], "ece_calibrated": after_ece[:2], "fits": fits[:2]},
        "fit_on_all_held_out": {"a": whole.a, "b": whole.b, "ece_before": whole.ece_before, "ece_after": whole.ece_after},
        "held_out_accuracy": float(((m > 0) == y).mean()),
    }


# ---------------------------------------------------------------- best-of-N


def fp32_twin(run: Path):
    """(base, tuned): the NF4 weights dequantized to fp32, and the adapter merged into them in fp32, as
    `qbco merge` merges (qbco.export.merge.merge_exact)."""
    from qbco.export.merge import load_trained, merge_exact
    from qbco.model.loading import dequantized_base
    from qbco.run.folder import RunFolder

    config, cpu = RunFolder(run).finished_config(), torch.device("cpu")
    return dequantized_base(config, cpu), merge_exact(load_trained(run, config, cpu), run)


def best_of_n(run: Path, scorer4, n: int, per_task: int, temperature: float, top_p: float, max_new_tokens: int, log,
              models=("base", "tuned")) -> dict:
    from qbco.data.feedback import read_demo
    from qbco.eval.generate import Sampling, pick_best, sample_answers
    from qbco.eval.score import Scorer

    items = demo_items()
    base, tuned = fp32_twin(run)
    tok, cpu = scorer4.tokenizer, torch.device("cpu")
    twin = Scorer(tok, tuned, beta=scorer4.beta, delta=scorer4.delta, calibration=scorer4.calibration,
                  max_prompt_length=scorer4.max_prompt_length, max_completion_length=scorer4.max_completion_length,
                  batch_size=16, chunk=scorer4.chunk, reference_model=base, device=cpu, kind="fp32 twin")
    held = read_demo()[1]
    sample = held[:32]
    gap = np.abs(twin.score_encoded(twin.encode_examples(sample)).reward - scorer4.score_encoded(scorer4.encode_examples(sample)).reward)
    log(f"fp32 twin vs 4-bit rewards on {len(sample)} held-out rows: max |dr| {gap.max():.2e}, mean {gap.mean():.2e}")
    del scorer4

    by_task: dict[str, list[str]] = {}
    for prompt in dict.fromkeys(e.prompt for e in held):  # the first `per_task` held-out prompts of each task
        by_task.setdefault(items[prompt]["task"], []).append(prompt)
    prompts = [p for task in sorted(by_task) for p in by_task[task][:per_task]]
    greedy = Sampling(max_new_tokens=max_new_tokens)
    hot = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=0)
    out = {"prompts": len(prompts), "n": n, "sampling": hot.describe(), "twin_reward_gap_max": float(gap.max()), "models": {}}
    for name, model in ((name, {"base": base, "tuned": tuned}[name]) for name in models):
        started = time.perf_counter()
        per_prompt = []
        for prompt in prompts:
            item = items[prompt]
            g = sample_answers_greedy(model, tok, prompt, greedy)
            samples = sample_answers(model, tok, prompt, n, hot, cpu)
            scores = twin.score(prompt, samples)
            per_prompt.append({"prompt": prompt, "task": item["task"], "greedy": g, "greedy_correct": correct(item, g),
                               "samples": samples, "rewards": scores.reward.tolist(),
                               "tokens": scores.completion_tokens.tolist(), "correct": [correct(item, s) for s in samples]})
        sizes = sorted({4, n} if n >= 4 else {n})
        row = {"greedy": float(np.mean([p["greedy_correct"] for p in per_prompt]))}
        for k in sizes:
            row[f"random_of_{k}"] = float(np.mean([np.mean(p["correct"][:k]) for p in per_prompt]))
            row[f"best_of_{k}"] = float(np.mean([p["correct"][pick_best(p["rewards"][:k])] for p in per_prompt]))
            row[f"best_of_{k}_per_token"] = float(np.mean([p["correct"][pick_best(p["rewards"][:k], p["tokens"][:k], "per-token")]
                                                           for p in per_prompt]))
            row[f"any_of_{k}"] = float(np.mean([any(p["correct"][:k]) for p in per_prompt]))
        row["seconds"] = time.perf_counter() - started
        out["models"][name] = {"figures": row, "per_prompt": per_prompt}
        log(f"{name}: {json.dumps(row)}")
    return out


@torch.no_grad()
def sample_answers_greedy(model, tokenizer, prompt, sampling) -> str:
    from qbco.eval.generate import complete

    return complete(model, tokenizer, prompt, sampling, torch.device("cpu"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scored", type=Path, default=None, help="the output of: qbco score RUN --data demo -o SCORED "
                    "(without it: only the best-of figures)")
    ap.add_argument("--splits", type=int, default=100, help="random prompt splits of the held-out rows")
    ap.add_argument("--per-task", type=int, default=5, help="held-out prompts answered per task (the demo has 63 in 6 tasks)")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (0: only the calibration figures)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--models", default="base,tuned", help="whose answers: base (adapter off), tuned, or both")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    from qbco.cli.main import _quiet_libraries

    _quiet_libraries()
    items = demo_items()
    figures = {"run": str(args.run), "checker": checker_agreement(items)}
    log(f"checker vs the demo's labels: {figures['checker']}")
    if args.scored is not None:
        figures["calibration"] = calibration_on_unseen_rows(args.scored, args.splits)
        log(f"calibration on unseen rows: {json.dumps({k: v for k, v in figures['calibration'].items() if k != 'first_split'})}")
    if args.n == 0:
        args.out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        return
    from qbco.eval.score import Scorer

    scorer4 = Scorer.load(args.run, torch.device("cpu"))
    figures["best_of"] = best_of_n(args.run, scorer4, args.n, args.per_task, args.temperature, args.top_p, args.max_new_tokens, log,
                                   models=args.models.split(","))
    args.out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
