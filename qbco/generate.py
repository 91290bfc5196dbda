"""Generate answers from a run (4-bit base + adapter, as trained) or a merged folder, and optionally from
its base, so the effect of training can be read side by side."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qbco.errors import QbcoError
from qbco.models import (
    compute_dtype,
    default_device,
    load_base,
    load_run,
    load_tokenizer,
    resolve_model,
)


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


def is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "adapter" / "adapter_config.json").is_file()


def read_prompts(prompts: list[str] | None, data: str | None, limit: int) -> list:
    """--prompt texts as given, or the first `limit` distinct prompts of --data ('demo': its held-out part,
    or a .jsonl/.json/.csv/.tsv/.parquet file with a prompt column)."""
    from qbco.data import read_demo
    from qbco.reader import read_rows

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


def load_models(target: str | Path, compare: bool, device):
    """(tokenizer, tuned model, base model or None, what was loaded). A run is loaded as it was trained and
    its base is the same model with adapters off (base None); a merged folder's base is read from the
    qbco_merge.json that `qbco merge` writes and loaded in float."""
    from transformers import AutoModelForCausalLM

    from qbco.merge import MERGE_INFO

    path = Path(target).expanduser()
    if is_run(path):
        config, tokenizer, model = load_run(path, device)
        kind = f"run: {'4-bit' if config.load_in_4bit else 'float'} base + adapter"
        return tokenizer, model, None, kind + ("; base: adapters off" if compare else "")
    if not (path / "config.json").is_file():
        raise QbcoError(f"{target} is neither a qbco run (config.yaml + adapter/) nor a model folder (config.json)")
    dtype = compute_dtype("auto", device)  # fp32 on a CPU, where bf16 matmul is slow; bf16 weights load exactly
    info = path / MERGE_INFO
    meta = json.loads(info.read_text(encoding="utf-8")) if info.is_file() else {}
    remote = bool(meta.get("trust_remote_code", False))
    tokenizer = load_tokenizer(str(path), remote)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=remote)
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
def complete(model, tokenizer, prompt, sampling: Sampling, device) -> str:
    """One answer, formatted as in training (the chat template when the tokenizer has one)."""
    from qbco.data import prompt_text

    text, templated = prompt_text(prompt, tokenizer)
    inputs = tokenizer(text, add_special_tokens=not templated, return_tensors="pt").to(device)
    stops = stop_ids(model, tokenizer)
    options = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
               "eos_token_id": stops, "use_cache": True}
    if sampling.temperature > 0:
        options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    else:
        options.update(do_sample=False)
    # The same seed before every answer: base and tuned draw the same random numbers, so a difference
    # in their answers comes from the weights, not from the draw.
    torch.manual_seed(sampling.seed)
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **options)
    answer = out[0, inputs["input_ids"].shape[1]:].tolist()
    if answer and answer[-1] in stops:  # a stop id need not be a special token that decoding skips
        answer = answer[:-1]
    return tokenizer.decode(answer, skip_special_tokens=True).strip()


def stop_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the model's generation config may list several (Qwen 2.5: <|im_end|> and
    <|endoftext|>), besides the tokenizer's own EOS."""
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = listed if isinstance(listed, (list, tuple)) else [listed]
    return list(dict.fromkeys(i for i in (*listed, tokenizer.eos_token_id) if i is not None))


def generate(target: str | Path, prompts: list, sampling: Sampling, compare: bool = False,
             device: torch.device | None = None) -> tuple[list[Answer], str]:
    """Answers of `target` (and of its base with `compare`) to every prompt; also what was loaded."""
    sampling.validate()
    if not prompts:
        raise QbcoError("no prompts to answer")
    device = device or default_device()
    tokenizer, model, base, kind = load_models(target, compare, device)
    answers = []
    for prompt in prompts:
        answer = Answer(prompt, complete(model, tokenizer, prompt, sampling, device))
        if compare and base is None:  # a run: its base is the same model with the adapters off
            with model.disable_adapter():
                answer.base = complete(model, tokenizer, prompt, sampling, device)
        elif compare:
            answer.base = complete(base, tokenizer, prompt, sampling, device)
        answers.append(answer)
    return answers, kind


def prompt_label(prompt) -> str:
    """A prompt as one line of text for a table: a chat prompt shows its last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


# ---------------------------------------------------------------- best-of-n


@dataclass
class BestOf:
    """N sampled answers to one prompt, each with the run's reward r and calibrated p_up; `best` indexes the
    arg-max of r (the first one on a tie)."""

    prompt: str | list[dict[str, str]]
    answers: list[str]
    rewards: list[float]
    p_up: list[float]
    best: int


def pick_best(rewards) -> int:
    """The index of the highest reward; the first of equal ones."""
    rewards = list(rewards)
    return max(range(len(rewards)), key=lambda i: (rewards[i], -i))


@torch.no_grad()
def sample_answers(model, tokenizer, prompt, n: int, sampling: Sampling, device) -> list[str]:
    """n sampled answers to one prompt in one generate call (num_return_sequences), formatted as in training and
    stopped at every stop id, as `complete` is."""
    from qbco.data import prompt_text

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
            scorer=None) -> tuple[list[BestOf], str]:
    """For every prompt, n answers sampled from `target` (a run or a merged folder) and scored with its own
    reward (qbco.score.Scorer); also what was loaded. `scorer` (a loaded Scorer) skips the loading."""
    from qbco.score import Scorer

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
        results.append(BestOf(prompt, answers, scores.reward.tolist(), scores.p_up.tolist(), pick_best(scores.reward)))
    return results, f"{scorer.kind}; each answer scored with the run's reward"


def write_candidates(results: list[BestOf], output: Path) -> None:
    """One JSON line per candidate: prompt, candidate index, answer, reward, p_up, and whether it was picked;
    written beside and renamed, so the file appears whole or not at all."""
    import os

    from qbco.binarize import _write_temp

    output.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": r.prompt, "candidate": k, "answer": a, "reward": rw, "p_up": p, "best": k == r.best},
                        ensure_ascii=False) + "\n"
             for r in results for k, (a, rw, p) in enumerate(zip(r.answers, r.rewards, r.p_up))]
    os.replace(_write_temp(output, lines), output)
