"""Generate answers from a run (4-bit base + adapter as trained; on a CPU its fp32 twin, the dequantized
NF4 base with the adapter merged in) or a merged folder, and optionally from its base, so the effect of
training can be read side by side."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from qbco.common.errors import QbcoError
from qbco.common.files import write_temp
from qbco.common.progress import Wait
from qbco.data.encoding import prompt_text
from qbco.data.feedback import read_demo
from qbco.data.reader import read_rows
from qbco.eval.score import Scorer
from qbco.model.device import compute_dtype, default_device
from qbco.model.loading import dequantized_base, load_base, load_tokenizer
from qbco.model.names import cache_dir, resolve_model
from qbco.model.refcache import base_identity
from qbco.run.folder import ADAPTER, CONFIG, MERGE_INFO, RunFolder, check_model_files, load_run, merge_info

BATCH = 16  # prompts per generate() call: measured 4x faster than one at a time on SmolLM2 (docs/eval.md)


@dataclass
class Sampling:
    """temperature 0 is greedy decoding; otherwise sampling with nucleus top_p (no top-k cut)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> "Sampling":
        if self.max_new_tokens < 1:
            raise QbcoError(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise QbcoError(f"--temperature must be >= 0 (got {self.temperature}); 0 is greedy")
        if not 0 < self.top_p <= 1:
            raise QbcoError(f"--top-p must be in (0, 1] (got {self.top_p})")
        return self

    def describe(self) -> str:
        if self.temperature == 0:
            return f"greedy, up to {self.max_new_tokens} new tokens"
        return f"sampled: temperature {self.temperature:g}, top-p {self.top_p:g}, seed {self.seed}, up to {self.max_new_tokens} new tokens"


@dataclass
class Answer:
    prompt: str | list[dict[str, str]]
    tuned: str
    base: str | None = None


def read_prompts(prompts: list[str] | None, data: str | None, limit: int) -> list:
    """--prompt texts as given, or the first `limit` distinct prompts of --data ('demo': its held-out part,
    or a .jsonl/.json/.csv/.tsv/.parquet file with a prompt column)."""
    if prompts and data:
        raise QbcoError("give --prompt or --data, not both")
    if prompts:
        return list(prompts)
    if not data:
        raise QbcoError("nothing to answer: give --prompt TEXT or --data FILE")
    if data == "demo":
        column = [e.prompt for e in read_demo()[1]]
    else:
        rows = read_rows(Path(data).expanduser())
        if not rows or "prompt" not in rows[0]:
            found = ", ".join(map(str, rows[0].keys())) if rows else "no rows"
            raise QbcoError(f"{data}: needs a prompt column (found: {found})")
        column = [r.get("prompt") for r in rows]
    seen, out = set(), []
    for prompt in column:
        key = json.dumps(prompt, sort_keys=True)
        if prompt and key not in seen:
            seen.add(key)
            out.append(prompt)
    return out[:limit]


CPU_FLOAT = "fp32 NF4-dequantized base + adapter merged: the 4-bit model as trained, faster on a CPU"


def fast_on_cpu(config, device) -> bool:
    """A 4-bit run answers on a CPU through its float twin: bitsandbytes' 4-bit matmul is slow there (its
    repacked inference kernel stays off, docs/pitfalls.md, 13), while the NF4 weights dequantized to fp32 plus the
    adapter are the same model (docs/eval.md has the measured speed). CUDA keeps the 4-bit path."""
    return device.type == "cpu" and config.load_in_4bit


class RunModels:
    """A run's tuned model and its base for answering: the 4-bit base + adapter as trained (adapters off for
    the base), or on a CPU the fp32 NF4-dequantized base, whose adapter is merged in before the tuned
    answers (`tuned()`), after any base answers (`base()`)."""

    def __init__(self, run_dir: Path, device, path: str = "auto"):
        folder = RunFolder(run_dir)
        config = folder.finished_config()
        self.config, self.device = config, device
        self.float = path == "float" or (path == "auto" and fast_on_cpu(config, device))
        if self.float:
            from peft import PeftModel  # peft's import costs a second; only the commands that load a run pay it

            self.tokenizer = load_tokenizer(str(folder.adapter))
            # The weights qbco merge adds the adapter to (NF4 dequantized to fp32), the adapter kept apart for the base's answers.
            self.model = PeftModel.from_pretrained(dequantized_base(config, device), folder.adapter, is_trainable=False).eval()
            self.kind = f"run: {CPU_FLOAT}" if config.load_in_4bit else "run: fp32 base + adapter merged"
        else:
            _, self.tokenizer, self.model = load_run(run_dir, device)
            self.kind = f"run: {'4-bit' if config.load_in_4bit else 'float'} base + adapter"
        self.merged = False

    def base(self):
        if self.merged:
            raise RuntimeError("base answers come before the adapter is merged")
        return self.model.disable_adapter()

    def tuned(self):
        if self.float and not self.merged:
            self.model = self.model.merge_and_unload()  # fp32: one rounding of W + BA (docs/pitfalls.md, 17: 1.5e-5 nats/token)
            self.merged = True
        return nullcontext()


def load_models(target: str | Path, compare: bool, device, path: str = "auto"):
    """(tokenizer, what answers as tuned, base model or None, what was loaded). A run gives a RunModels (its
    base is itself with adapters off); a merged folder's base is read from the record that `qbco
    merge` writes and loaded in float."""
    from transformers import AutoModelForCausalLM  # transformers' import costs seconds: only where a model loads

    folder = Path(target).expanduser()
    if RunFolder(folder).is_finished():
        run = RunModels(folder, device, path=path)
        return run.tokenizer, run, None, run.kind + ("; base: adapters off" if compare else "")
    if not (folder / "config.json").is_file():
        if RunFolder(folder).holds_run() or (folder / ADAPTER).is_dir():  # part of a run: the message every command gives
            RunFolder(folder).finished_config()
        raise QbcoError(f"{target} is neither a qbco run ({CONFIG} + {ADAPTER}/) nor a model folder (config.json)")
    dtype = compute_dtype("auto", device)  # fp32 on a CPU, where bf16 matmul is slow; bf16 weights load exactly
    meta = merge_info(folder) or {}
    remote = bool(meta.get("trust_remote_code", False))
    check_model_files(folder)
    tokenizer = load_tokenizer(str(folder), remote)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, trust_remote_code=remote)
    except OSError as err:
        raise QbcoError(f"cannot load the model in {target}: {err}") from None
    model.to(device).eval()
    base = None
    if compare:
        if not meta:
            raise QbcoError(f"{target} has no {MERGE_INFO}, so its base is unknown; --compare needs a qbco run or a folder written by qbco merge")
        base = load_base(resolve_model(meta["model"]), False, dtype, device, remote)
        base.eval()
        return tokenizer, model, base, f"merged folder; base: {meta['model']}, original weights"
    return tokenizer, model, base, "merged folder"


@torch.no_grad()
def complete_all(model, tokenizer, prompts: list, sampling: Sampling, device, batch_size: int | None = None,
                 done=lambda n, **fields: None) -> list[str]:
    """Answers to every prompt, formatted as in training (the chat template when the tokenizer has one),
    `batch_size` prompts at a time, left-padded so that every row's answer starts where its prompt ends.
    `done(n, tps=...)` hears the prompts answered so far and the tokens per second (a qbco.common.progress.Wait)."""
    batch_size = batch_size or BATCH
    stops = stop_ids(model, tokenizer)
    options = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
               "eos_token_id": stops, "use_cache": True}
    if sampling.temperature > 0:
        options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    else:
        options.update(do_sample=False)
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers, tokens, started = [], 0, time.perf_counter()
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [prompt_text(p, tokenizer) for p in prompts[start : start + batch_size]]
            inputs = tokenizer([t for t, _ in texts], add_special_tokens=not texts[0][1], padding=True,
                               return_tensors="pt").to(device)
            # The same seed before every batch: base and tuned draw the same random numbers, so a difference
            # in their answers comes from the weights, not from the draw.
            torch.manual_seed(sampling.seed)
            out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **options)
            width = inputs["input_ids"].shape[1]
            kept = [until_stop(row[width:].tolist(), stops) for row in out]
            answers += [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in kept]
            tokens += sum(len(ids) for ids in kept)
            done(len(answers), tps=tokens / max(time.perf_counter() - started, 1e-9))
    finally:
        tokenizer.padding_side = side
    return answers


def stop_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the model's generation config may list several (Qwen 2.5: <|im_end|> and
    <|endoftext|>), besides the tokenizer's own EOS."""
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = listed if isinstance(listed, (list, tuple)) else [listed]
    return list(dict.fromkeys(i for i in (*listed, tokenizer.eos_token_id) if i is not None))


def until_stop(ids: list[int], stops: list[int]) -> list[int]:
    """An answer's ids up to its first stop id (a stop id need not be a special token that decoding skips;
    what follows it in a batch is padding)."""
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i]
    return ids


def complete(model, tokenizer, prompt, sampling: Sampling, device) -> str:
    """One answer (a batch of one)."""
    return complete_all(model, tokenizer, [prompt], sampling, device)[0]


def base_answers_key(run: RunModels, prompts: list, sampling: Sampling) -> str:
    """What the base's answers depend on: the base (its files), how it answers (4-bit or the float twin,
    dtype, device kind), every prompt's token ids, the sampling, the batching and the library versions.
    Not the adapter: the base answers with it off."""
    c = run.config
    dtype = torch.float32 if run.float else compute_dtype(c.dtype, run.device)
    h = hashlib.sha256(json.dumps([base_identity(resolve_model(c.model)), c.load_in_4bit, run.float, str(dtype),
                                   run.device.type, vars(sampling), BATCH, torch.__version__,
                                   transformers.__version__]).encode())
    for prompt in prompts:
        text, templated = prompt_text(prompt, run.tokenizer)
        h.update(json.dumps(run.tokenizer(text, add_special_tokens=not templated)["input_ids"]).encode())
    return h.hexdigest()[:32]


def cached_answers(key: str, compute) -> list[str]:
    """The base's answers for `key` from QBCO_CACHE/answers/, or compute() written there atomically: every
    run on the same base asks its base the same questions (qbco eval --generate after each run)."""
    path = cache_dir() / "answers" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False)
    os.replace(tmp, path)
    return value


def answer_both(run: RunModels, prompts: list, sampling: Sampling, device, compare: bool = True,
                progress=None) -> tuple[list[str] | None, list[str]]:
    """(base answers or None, tuned answers) of a run's model to every prompt: the base first, while the
    adapter is still apart; the base's answers come from the answer cache when an earlier run on the same
    base gave them (base_answers_key). `progress` (the CLI's rich Progress, or None) shows the prompts answered
    and the tokens per second, base then tuned on one bar."""
    base = None
    wait = Wait(progress, "answering: base, then tuned" if compare else "answering", len(prompts) * (2 if compare else 1))
    if compare:
        def ask_base():
            with run.base():
                return complete_all(run.model, run.tokenizer, prompts, sampling, device, done=wait)

        base = cached_answers(base_answers_key(run, prompts, sampling), ask_base)
    with run.tuned():
        tuned = complete_all(run.model, run.tokenizer, prompts, sampling, device,
                             done=wait.after(len(prompts)) if compare else wait)
    return base, tuned


def generate(target: str | Path, prompts: list, sampling: Sampling, compare: bool = False,
             device: torch.device | None = None, path: str = "auto") -> tuple[list[Answer], str]:
    """Answers of `target` (and of its base with `compare`) to every prompt; also what was loaded. `path`
    (runs only): 'auto' (float twin on a CPU, 4-bit on CUDA), 'float' or '4bit'."""
    sampling.validate()
    if not prompts:
        raise QbcoError("no prompts to answer")
    device = device or default_device()
    tokenizer, model, base, kind = load_models(target, compare, device, path)
    if isinstance(model, RunModels):
        base_answers, tuned = answer_both(model, prompts, sampling, device, compare)
    else:
        tuned = complete_all(model, tokenizer, prompts, sampling, device)
        base_answers = complete_all(base, tokenizer, prompts, sampling, device) if compare else None
    answers = [Answer(p, t, b) for p, t, b in zip(prompts, tuned, base_answers or [None] * len(prompts))]
    return answers, kind


# ---------------------------------------------------------------- best-of-n


@dataclass
class BestOf:
    """N sampled answers to one prompt, each with the run's reward r and calibrated p_up; `best` indexes the
    best by the ranking asked for (pick_best; the first one on a tie)."""

    prompt: str | list[dict[str, str]]
    answers: list[str]
    rewards: list[float]
    p_up: list[float]
    best: int
    tokens: list[int] | None = None  # each answer's tokens: r / tokens is the per-token reward


RANKINGS = ("per-token", "sum")
RANK_BY = "sum"  # what `qbco generate --best-of` ranks by unless told: docs/score.md measured both


def pick_best(rewards, tokens=None, rank_by: str = "sum") -> int:
    """The index of the best answer; the first of equal ones. rank_by "sum": the highest reward r (a sum of
    log-ratios over the answer's tokens, which favours long answers); "per-token": the highest r / tokens (an
    empty answer counts one token)."""
    rewards = list(rewards)
    if rank_by == "per-token":
        rewards = [r / max(1, int(n)) for r, n in zip(rewards, tokens)]
    elif rank_by != "sum":
        raise QbcoError(f"--rank-by must be one of {', '.join(RANKINGS)} (got {rank_by!r})")
    return max(range(len(rewards)), key=lambda i: (rewards[i], -i))


@torch.no_grad()
def sample_answers(model, tokenizer, prompt, n: int, sampling: Sampling, device) -> list[str]:
    """n sampled answers to one prompt in one generate call (num_return_sequences), formatted as in training and
    stopped at every stop id, as `complete` is."""
    text, templated = prompt_text(prompt, tokenizer)
    inputs = tokenizer(text, add_special_tokens=not templated, return_tensors="pt").to(device)
    stops = stop_ids(model, tokenizer)
    torch.manual_seed(sampling.seed)
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], do_sample=True,
                         temperature=sampling.temperature, top_p=sampling.top_p, top_k=0, num_return_sequences=n,
                         max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=stops, use_cache=True)
    answers = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():  # an answer ends at its first stop id; padding follows
        end = next((k for k, t in enumerate(row) if t in stops), len(row))
        answers.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return answers


def best_of(target: str | Path, prompts: list, n: int, sampling: Sampling, device: torch.device | None = None,
            scorer=None, rank_by: str = RANK_BY) -> tuple[list[BestOf], str]:
    """For every prompt, n answers sampled from `target` (a run or a merged folder) and scored with its own
    reward (qbco.eval.score.Scorer), the best by `rank_by` (pick_best); also what was loaded. `scorer` (a loaded
    Scorer) skips the loading."""
    sampling.validate()
    if n < 2:
        raise QbcoError(f"--best-of needs at least 2 answers per prompt (got {n})")
    if sampling.temperature == 0:
        raise QbcoError("--best-of samples its answers: give --temperature above 0 (greedy gives one answer N times)")
    if not prompts:
        raise QbcoError("no prompts to answer")
    scorer = scorer or Scorer.load(target, device)
    results = []
    for prompt in prompts:
        answers = sample_answers(scorer.model, scorer.tokenizer, prompt, n, sampling, scorer.device)
        scores = scorer.score(prompt, answers)
        tokens = scores.completion_tokens.tolist()
        results.append(BestOf(prompt, answers, scores.reward.tolist(), scores.p_up.tolist(),
                              pick_best(scores.reward, tokens, rank_by), tokens))
    return results, f"{scorer.kind}; each answer scored with the run's reward, ranked by {'r per token' if rank_by == 'per-token' else 'r'}"


def write_candidates(results: list[BestOf], output: Path) -> None:
    """One JSON line per candidate: prompt, candidate index, answer, reward, tokens, p_up, and whether it was picked;
    written beside and renamed, so the file appears whole or not at all."""
    output.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": r.prompt, "candidate": k, "answer": a, "reward": rw, "tokens": n, "p_up": p,
                         "best": k == r.best}, ensure_ascii=False) + "\n"
             for r in results
             for k, (a, rw, p, n) in enumerate(zip(r.answers, r.rewards, r.p_up, r.tokens or [None] * len(r.answers)))]
    os.replace(write_temp(output, lines), output)
