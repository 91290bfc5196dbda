"""The one typed training config: recipes (YAML) and CLI flags both map onto `TrainConfig` field by field."""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from qbco.errors import QbcoError

RECIPES = Path(__file__).with_name("recipes")  # in the package, so that `pip install qbco` has them
BALANCES = ("none", "oversample", "weight")
DTYPES = ("auto", "bf16", "fp16", "fp32")
CHECKPOINTING = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Everything a run needs. The defaults are the embedded demo: `qbco train` with no flags."""

    model: str = "smollm2-135m"
    data: str = "demo"
    output: str | None = None  # None: runs/<model>-<data>-<timestamp>
    loss: str = "bco"  # a name in qbco.objectives.OBJECTIVES: bco (reward shift, Eq. 7), bce (delta 0), kto, dpo
    balance: str = "none"  # none | oversample (repeat minority-class rows) | weight (dataset-share class weights)
    beta: float = 0.1
    sft_weight: float = 0.0  # weight of the per-token NLL of thumbs-up completions added to the loss (loss.sft_loss); 0: the paper's loss
    lr: float = 3e-4
    epochs: float = 1.0
    max_steps: int | None = None  # caps the number of optimizer steps; None: run all epochs
    batch_size: int = 8
    grad_accum: int = 1
    max_prompt_length: int = 256
    max_completion_length: int = 128
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"  # "all-linear" or a comma-separated list of module names
    eval_fraction: float | None = None  # None: the data's own held-out part, else 0.1
    ema_decay: float = 0.9
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    load_in_4bit: bool = True
    dtype: str = "auto"  # compute dtype; auto: bf16 on CUDA where native, else fp16 (loss-scaled); fp32 on CPU
    # auto: every k-th decoder layer, k the fewest checkpointed layers whose memory estimate fits memory_budget;
    # on: every layer; off: none. A recipe's true / false (YAML's on / off) mean on / off.
    gradient_checkpointing: str = "auto"
    memory_budget: float | None = None  # GiB for auto; None: free CUDA memory less a margin, on a CPU a share of the RAM
    logprob_chunk: int | None = None  # completion tokens per LM-head chunk; None: 2^24 logits' worth (logprobs.CHUNK_LOGITS)
    save_every: int = 50  # optimizer steps between checkpoints (one is always written at the end)
    keep: int = 2  # checkpoints kept
    allow_one_class: bool = False  # train on data with one class only (BCO's delta then tracks that class alone)
    trust_remote_code: bool = False  # run a hub model's own Python code
    fsdp: bool = False  # under a launcher: shard the decoder layers with FSDP2 instead of DDP's copy per rank

    def validate(self) -> "TrainConfig":
        from qbco.objectives import OBJECTIVES

        checks = [
            (self.beta > 0, f"beta must be > 0 (got {self.beta})"),
            (self.sft_weight >= 0, f"sft_weight must be >= 0 (got {self.sft_weight})"),
            (self.lr > 0, f"lr must be > 0 (got {self.lr})"),
            (self.epochs > 0, f"epochs must be > 0 (got {self.epochs})"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1 (got {self.max_steps})"),
            (self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1 (got {self.grad_accum})"),
            (self.max_prompt_length >= 1, f"max_prompt_length must be >= 1 (got {self.max_prompt_length})"),
            (
                self.max_completion_length >= 1,
                f"max_completion_length must be >= 1 (got {self.max_completion_length})",
            ),
            (self.lora_r >= 1, f"lora_r must be >= 1 (got {self.lora_r})"),
            (self.lora_alpha > 0, f"lora_alpha must be > 0 (got {self.lora_alpha})"),
            (0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1) (got {self.lora_dropout})"),
            (
                self.eval_fraction is None or 0 <= self.eval_fraction < 1,
                f"eval_fraction must be in [0, 1) (got {self.eval_fraction})",
            ),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1) (got {self.ema_decay})"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1) (got {self.warmup_ratio})"),
            (self.max_grad_norm > 0, f"max_grad_norm must be > 0 (got {self.max_grad_norm})"),
            (self.save_every >= 1, f"save_every must be >= 1 (got {self.save_every})"),
            (self.keep >= 1, f"keep must be >= 1 (got {self.keep})"),
            (self.logprob_chunk is None or self.logprob_chunk >= 1, f"logprob_chunk must be >= 1 (got {self.logprob_chunk})"),
            (self.loss in OBJECTIVES, f"loss must be one of {', '.join(OBJECTIVES)} (got {self.loss!r})"),
            (self.balance in BALANCES, f"balance must be one of {', '.join(BALANCES)} (got {self.balance!r})"),
            (self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})"),
            (
                self.gradient_checkpointing in CHECKPOINTING,
                f"gradient_checkpointing must be one of {', '.join(CHECKPOINTING)} (got {self.gradient_checkpointing!r})",
            ),
            (self.memory_budget is None or self.memory_budget > 0, f"memory_budget must be > 0 GiB (got {self.memory_budget})"),
        ]
        for ok, message in checks:
            if not ok:
                raise QbcoError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_settings_used(config: TrainConfig, given=()) -> None:
    """A setting the chosen loss never reads is an error, not a silent no-op: given as a flag (`given`), or
    set away from its default (a recipe). Which loss reads what is said on the objectives (qbco/objectives.py)."""
    from qbco.objectives import OBJECTIVES

    defaults = TrainConfig()
    for name in OBJECTIVES[config.loss].unused_settings():
        if name in given or getattr(config, name) != getattr(defaults, name):
            users = [loss for loss, objective in OBJECTIVES.items() if name in objective.settings]
            who = users[0] if len(users) == 1 else f"{', '.join(users[:-1])} and {users[-1]}"
            raise QbcoError(f"--{name.replace('_', '-')} has no effect with --loss {config.loss} (only {who} "
                            f"use{'s' if len(users) == 1 else ''} it); drop it")


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def _check_keys(keys, where: str) -> None:
    known = field_names()
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise QbcoError(f"{where}: unknown key '{key}'{hint}")


def shipped_recipes() -> dict[str, Path]:
    """The recipes that come with qbco, by name (file stem)."""
    return {p.stem: p for p in sorted(RECIPES.glob("*.yaml"))}


def choose_recipe(recipe: str | None, model: str | None, data: str | None) -> tuple[Path | None, str | None]:
    """(the recipe `qbco train` reads, a line naming a matched one). --recipe none: no recipe; a shipped
    recipe's name or a file: that one. No --recipe: the shipped recipe written for this (model, data) pair,
    when there is one, so that `--model qwen2.5-3b --data helpsteer2` runs the paper's settings, not the
    demo's defaults. Flags still override whatever the recipe sets."""
    if recipe is not None:
        if recipe.strip().lower() == "none":
            return None, None
        return shipped_recipes().get(recipe, Path(recipe)), None
    model = model or TrainConfig.model
    data = data or TrainConfig.data
    for name, path in shipped_recipes().items():
        values = read_recipe(path)
        if _same_model(values.get("model"), model) and values.get("data") == data:
            defaults = TrainConfig().to_dict()
            changed = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
                       if k not in ("model", "data") and defaults.get(k) != v]
            what = ", ".join(changed) if changed else "the defaults"
            return path, (f"recipe {name} (shipped for --model {values['model']} --data {data}): {what}; "
                          "a flag overrides any of it, --recipe none turns it off")
    return None, None


def _same_model(a: str | None, b: str) -> bool:
    """One model by its alias or its hub id (qwen2.5-3b is Qwen/Qwen2.5-3B-Instruct)."""
    from qbco.models import MODEL_ALIASES

    return a is not None and MODEL_ALIASES.get(a, a).lower() == MODEL_ALIASES.get(b, b).lower()


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The key/value pairs of a YAML recipe, checked against TrainConfig's fields."""
    path = Path(path)
    if not path.is_file():
        raise QbcoError(f"recipe not found: {path} (shipped recipes: {', '.join(shipped_recipes())}; or --recipe none)")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise QbcoError(f"{path}: not valid YAML{where}") from None
    if not isinstance(values, dict):
        raise QbcoError(f"{path}: a recipe is a mapping of config keys to values")
    _check_keys(values, str(path))
    return values


def build_config(recipe: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe's values, then every override that is not None (CLI flags given)."""
    values: dict[str, Any] = read_recipe(recipe) if recipe else {}
    if recipe and values.get("output") and Path(values["output"]).resolve() == Path(recipe).resolve().parent:
        del values["output"]  # RUN/config.yaml of an older run names RUN itself: a rerun makes a new run folder
    given = {k: v for k, v in overrides.items() if v is not None}
    _check_keys(given, "config")
    values.update(given)
    try:
        config = TrainConfig(**values)
    except TypeError as err:
        raise QbcoError(f"config: {err}") from None
    _coerce_types(config)
    config.validate()
    check_settings_used(config, given)
    return config


def _coerce_types(config: TrainConfig) -> None:
    """YAML gives ints where floats are meant (lr: 1 is fine) and strings like '1e-4'; make them the field's type."""
    if isinstance(config.gradient_checkpointing, bool):  # recipes and run configs from before auto, YAML's on / off
        config.gradient_checkpointing = "on" if config.gradient_checkpointing else "off"
    for f in fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        kind = str(f.type)
        try:
            if kind.startswith("float"):
                setattr(config, f.name, float(value))
            elif kind.startswith("int"):
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                setattr(config, f.name, int(value))
            elif kind == "bool" and not isinstance(value, bool):
                raise ValueError
        except (TypeError, ValueError):
            raise QbcoError(f"config: {f.name} must be of type {kind} (got {value!r})") from None


def save_config(config: TrainConfig, path: str | Path, notes: list[str] = ()) -> None:
    """RUN/config.yaml: every setting but the output folder (the run is the folder the file is in, and a rerun
    with --recipe RUN/config.yaml must make a new run, not collide with this one), after `notes` as comments
    (the overrides of each --resume). Written beside and renamed."""
    path = Path(path)
    values = {**config.to_dict(), "output": None}
    header = "".join(f"# {note}\n" for note in notes)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def config_notes(path: str | Path) -> list[str]:
    """The comment lines save_config wrote at the top of a config.yaml."""
    notes = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("# "):
            break
        notes.append(line[2:])
    return notes


def load_run_config(path: str | Path) -> TrainConfig:
    """The config of a run (its config.yaml), as a TrainConfig: as it ran, so a setting its loss does not use
    (which an older qbco let through, and which did nothing) is no error here."""
    values = read_recipe(path)
    values.pop("output", None)  # the run is the folder config.yaml is in (older runs wrote it here)
    try:
        config = TrainConfig(**values)
    except TypeError as err:
        raise QbcoError(f"{path}: {err}") from None
    _coerce_types(config)
    return config.validate()


# What `qbco train --resume RUN` may change; every other setting is fixed by the run's config.yaml (the data
# order, the model and the loss would no longer be those the checkpoint continues). Checkpointing fewer or more
# layers changes memory and time, not the losses (tests/test_checkpointing.py), so a run stopped out of memory
# can follow the advice (--memory-budget, --gradient-checkpointing) and resume.
RESUME_OVERRIDES = ("lr", "max_steps", "epochs", "save_every", "keep", "memory_budget", "gradient_checkpointing")


def resume_overrides_help() -> str:
    return ", ".join(f"--{name.replace('_', '-')}" for name in RESUME_OVERRIDES) + ", --quiet"


def resume_config(run: str | Path, **overrides: Any) -> TrainConfig:
    """The config a resumed run continues with: RUN/config.yaml, then each override given (not None), which
    must be one of RESUME_OVERRIDES. qbco.prepare records what changed in config.yaml when the run restarts."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise QbcoError(f"--resume {run}: no qbco run there (config.yaml missing)")
    given = {k: v for k, v in overrides.items() if v is not None}
    for name in given:
        if name not in RESUME_OVERRIDES:
            raise QbcoError(f"--resume continues a run with its own config.yaml; --{name.replace('_', '-')} cannot "
                            f"change (flags allowed with --resume: {resume_overrides_help()})")
    saved = load_run_config(path)
    try:
        config = TrainConfig(**{**saved.to_dict(), **given})
    except TypeError as err:
        raise QbcoError(f"config: {err}") from None
    _coerce_types(config)
    return config.validate()


def changed_settings(before: TrainConfig, after: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{name: (before, after)} for every setting that differs, the output folder aside."""
    a, b = before.to_dict(), after.to_dict()
    return {k: (a[k], b[k]) for k in a if k != "output" and a[k] != b[k]}
