"""The one typed training config: recipes (YAML) and CLI flags both map onto `TrainConfig` field by field. Each
field carries its flag's help (`setting`), so a setting is declared once: the command line builds its flags
from these fields (qbco.cli.flags). Imports no torch: `qbco --help` reads it."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from qbco.common.errors import QbcoError
from qbco.common.files import write_text
from qbco.model.names import MODEL_ALIASES

BALANCES = ("none", "oversample", "weight")

# The defaults that follow the loss, the file and the model (docs/results.md says what chose them and on what):
# BCO gets the thumbs-up NLL term at weight 3; the other losses keep their own published loss (their figures in
# docs/results.md were measured without it). A file gets passes enough to see ROWS_SEEN rows (a fixed epoch count
# gives a file of 100 rows 12 steps); the learning rate is 1e-3 at 135M parameters, scaled by sqrt(135M / N) above.
LOSS_SFT_WEIGHT = {"bco": 3.0, "bce": 0.0, "kto": 0.0, "dpo": 0.0}
ROWS_SEEN, MAX_PASSES = 900, 10
AUTO_SETTINGS = ("lr", "epochs")  # None until the run fills them in from the file and the model (TrainConfig.sized)
LR_AT_BASE, BASE_PARAMETERS = 1e-3, 135e6


def auto_epochs(rows: int) -> float:
    """Passes over `rows` training units (rows; pairs under DPO) that see about ROWS_SEEN of them: at least one,
    at most MAX_PASSES, rounded to 0.01."""
    return round(min(float(MAX_PASSES), max(1.0, ROWS_SEEN / max(rows, 1))), 2)


def auto_lr(parameters: float) -> float:
    """lr = 1e-3 * min(1, sqrt(135e6 / parameters)), two significant digits: measured at 135M (docs/results.md);
    above, the square-root rule lands at 2.1e-4 for 3B and 1.4e-4 for 7B, the range LoRA recipes use there."""
    return float(f"{LR_AT_BASE * min(1.0, (BASE_PARAMETERS / parameters) ** 0.5):.2g}")
DTYPES = ("auto", "bf16", "fp16", "fp32")
CHECKPOINTING = ("auto", "on", "off")
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # --report-to (qbco.train.report)


def setting(default: Any, help: str, *, flag: str | None = None, default_text: str | None = None) -> Any:
    """A TrainConfig field with what its command-line flag says: `help`, the flag's spelling when it is not
    --field-name (`flag`, e.g. "--4bit/--no-4bit"), and `default_text` when the default needs words."""
    return field(default=default, metadata={"help": help, "flag": flag, "default_text": default_text})


@dataclass
class TrainConfig:
    """Everything a run needs. The defaults are the embedded demo's model and data: `qbco train` with no flags
    (which also applies the demo's shipped recipe: choose_recipe)."""

    model: str = setting("smollm2-135m", "Model: smollm2-135m (offline), qwen2.5-3b, qwen2.5-7b, llama-3.2-3b, "
                         "llama-3.1-8b, a local folder or a hub id.")
    data: str = setting("demo", "Feedback: 'demo' (bundled), a registered name (qbco datasets) or a "
                        ".jsonl/.json/.csv/.tsv/.parquet file with prompt, completion, label.")
    output: str | None = setting(None, "Run folder.", default_text="runs/<model>-<data>-<timestamp>")
    loss: str = setting("bco", "bco (reward shift delta, Eq. 7), bce (delta fixed at 0), kto (Ethayarajh et al. "
                        "2024) or dpo (pairs of rows sharing a prompt).")
    balance: str = setting("none", "Class imbalance: none (BCO's per-class means already weigh both classes "
                           "equally), oversample (repeat minority-class rows, as the paper did for HelpSteer2) or "
                           "weight (class weights from the dataset's shares; see docs/data.md).")
    beta: float = setting(0.1, "Reward scale beta in r = beta * log(pi/pi_ref).")
    sft_weight: float | None = setting(
        None, "Add this times the per-token NLL of the thumbs-up completions to the loss (loss.sft_loss), so that "
        "good answers gain likelihood (RPO; docs/results.md). 0 is the paper's loss (also: --recipe paper).",
        default_text="3 with bco, measured (docs/results.md); 0 with bce, kto, dpo")
    lr: float | None = setting(
        None, "Peak learning rate of the LoRA weights (AdamW).",
        default_text="auto: 1e-3 for a model of 135M parameters or fewer, 1e-3 x sqrt(135M / N) above (2e-4 at 3B)")
    epochs: float | None = setting(
        None, "Passes over the training rows (fractions allowed).",
        default_text=f"auto: {ROWS_SEEN} rows' worth, at least 1 pass, at most {MAX_PASSES} (1.5 on the demo's 586 rows, "
                     "9 on 100 rows)")
    max_steps: int | None = setting(None, "Stop after this many optimizer steps.", default_text="all epochs")
    batch_size: int = setting(8, "Rows per micro-batch.")
    grad_accum: int = setting(1, "Micro-batches per optimizer step.")
    max_prompt_length: int = setting(256, "Prompt tokens kept (the earliest turns go first).")
    max_completion_length: int = setting(128, "Completion tokens kept (cut from the right).")
    lora_r: int = setting(16, "LoRA rank.")
    lora_alpha: int = setting(32, "LoRA alpha (scale alpha/r).")
    lora_dropout: float = setting(0.0, "LoRA dropout.")
    lora_targets: str = setting("all-linear", "'all-linear' (every decoder linear layer) or names like q_proj,v_proj.")
    eval_fraction: float | None = setting(None, "Share of rows held out, split by prompt.",
                                          default_text="the data's own held-out part, else 0.1")
    ema_decay: float = setting(0.9, "Decay of the per-class reward means behind delta.")
    warmup_ratio: float = setting(0.1, "Share of steps of linear learning-rate warm-up.")
    weight_decay: float = setting(0.0, "AdamW weight decay of the LoRA weights.")
    max_grad_norm: float = setting(1.0, "Gradient norm clip per optimizer step.")
    seed: int = setting(0, "Seed for LoRA init, data order and splits.")
    load_in_4bit: bool = setting(True, "Base in 4-bit NF4 (double quantization) or plain float.", flag="--4bit/--no-4bit",
                                 default_text="4bit")
    dtype: str = setting("auto", "Compute dtype: auto (bf16 on a GPU with native bf16, A100 / RTX 30xx and newer; fp16 "
                         "with loss scaling on older ones, T4 / V100; fp32 on CPU), bf16, fp16 (always with loss "
                         "scaling), fp32.")
    gradient_checkpointing: str = setting(
        "auto", "Recompute activations in backward: auto (every k-th decoder layer, k chosen from the memory estimate "
        "against --memory-budget: as few as fit), on (every layer, the least memory), off. A recipe's true / false "
        "(YAML's on / off) mean on / off.")
    memory_budget: float | None = setting(
        None, "GiB that --gradient-checkpointing auto plans for.",
        default_text="the free GPU memory less 10% of the card; on a CPU a third of the available RAM, at most 2.5x "
                     "the estimate with every layer checkpointed")
    logprob_chunk: int | None = setting(None, "Completion tokens per LM-head chunk: bounds the logits memory.",
                                        default_text="2^24 logits' worth, 341 tokens for a 49,152-token vocabulary")
    save_every: int = setting(50, "Optimizer steps between checkpoints; one is always written at the end and on Ctrl-C.")
    keep: int = setting(2, "Checkpoints kept in RUN/checkpoints.")
    report_to: str = setting("none", "Also send every metrics record, the config and the held-out figures to trackers: "
                             "tensorboard, wandb, mlflow, trackio, several joined by commas, or none (the run's metrics log is "
                             "always written). Offline by default: TensorBoard and MLflow files in the run folder, W&B "
                             "offline unless WANDB_MODE is set, Trackio's local store. Each is an extra: pip install "
                             "'qbco[tensorboard]' (see docs/trackers.md).")
    allow_one_class: bool = setting(False, "Train BCO on data that holds only thumbs-up or only thumbs-down rows.",
                                    flag="--allow-one-class", default_text="refuse")
    trust_remote_code: bool = setting(False, "Run the Python code a hub model ships.", flag="--trust-remote-code",
                                      default_text="off")
    fsdp: bool = setting(False, "Under torchrun or accelerate launch: shard the decoder layers over the processes with "
                         "FSDP2 (for a base too big for one GPU) instead of a copy per process (DDP). See "
                         "docs/distributed.md.", flag="--fsdp", default_text="DDP")

    def __post_init__(self):
        if self.sft_weight is None:  # the loss's own default (LOSS_SFT_WEIGHT); an unknown loss fails in validate
            self.sft_weight = LOSS_SFT_WEIGHT.get(self.loss, 0.0)

    def sized(self, rows: int | None = None, parameters: float | None = None) -> "TrainConfig":
        """This config with the defaults that follow the file (`rows`: auto_epochs) and the model (`parameters`:
        auto_lr) filled in where they are unset: what the run folder records, so a resume reads numbers."""
        epochs = auto_epochs(rows) if self.epochs is None and rows is not None else self.epochs
        lr = auto_lr(parameters) if self.lr is None and parameters is not None else self.lr
        return dataclasses.replace(self, epochs=epochs, lr=lr)

    def as_asked(self, asked: "TrainConfig") -> "TrainConfig":
        """`asked` (a command's config) with the settings it left to the run (AUTO_SETTINGS, None) read as this
        run's config filled them in: the same command, compared with the run it started."""
        return dataclasses.replace(asked, **{k: getattr(self, k) for k in AUTO_SETTINGS if getattr(asked, k) is None})

    def sized_line(self, rows: int, parameters: float) -> str:
        """What the sized defaults came to, for the run's first lines (empty when all were given)."""
        said = [f"sft_weight {self.sft_weight:g} ({self.loss}'s default)"] if self.loss in LOSS_SFT_WEIGHT else []
        if self.lr is None:
            said.append(f"lr {auto_lr(parameters):g} ({parameters / 1e6:.0f}M parameters)")
        if self.epochs is None:
            said.append(f"epochs {auto_epochs(rows):g} ({rows} training rows: about {ROWS_SEEN} rows' worth)")
        return "defaults for this file and model: " + ", ".join(said)

    def validate(self) -> "TrainConfig":
        from qbco.reward.objectives import OBJECTIVES  # here, not above: it imports torch, and --help reads this module

        checks = [
            (self.beta > 0, f"beta must be > 0 (got {self.beta})"),
            (self.sft_weight >= 0, f"sft_weight must be >= 0 (got {self.sft_weight})"),
            (self.lr is None or self.lr > 0, f"lr must be > 0 (got {self.lr})"),
            (self.epochs is None or self.epochs > 0, f"epochs must be > 0 (got {self.epochs})"),
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
            (all(t in TRACKERS for t in report_targets(self.report_to)),
             f"report_to must be none or any of {', '.join(TRACKERS)} joined by commas (got {self.report_to!r})"),
        ]
        for ok, message in checks:
            if not ok:
                raise QbcoError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def report_targets(value: str) -> list[str]:
    """The trackers a --report-to value names, in order, without repeats ("none" and "" name none)."""
    names = [t.strip().lower() for t in str(value or "").split(",")]
    return list(dict.fromkeys(t for t in names if t and t != "none"))


def check_settings_used(config: TrainConfig, given=()) -> None:
    """A setting the chosen loss never reads is an error, not a silent no-op: given as a flag (`given`), or
    set away from its default (a recipe). Which loss reads what is said on the objectives (qbco/reward/objectives.py)."""
    from qbco.reward.objectives import OBJECTIVES  # here, not above: it imports torch, and --help reads this module

    defaults = TrainConfig(loss=config.loss)
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
    return {p.stem: p for p in sorted(recipes_folder().glob("*.yaml"))}


def recipes_folder() -> Path:
    """The shipped recipes: recipes/ at the top of the source tree, mapped into the wheel as qbco.recipes
    (pyproject.toml), so a clone and `pip install qbco` find the same files."""
    return Path(str(resources.files("qbco.recipes")))


def choose_recipe(recipe: str | None, model: str | None, data: str | None,
                  loss: str | None = None) -> tuple[Path | None, str | None]:
    """(the recipe `qbco train` reads, a line saying what was applied). --recipe none: no recipe; a shipped
    recipe's name or a file: that one. No --recipe: the shipped recipe written for this (model, data) pair and
    for the loss asked (`loss`, default bco), when there is one, so that `--model qwen2.5-3b --data helpsteer2`
    runs the paper's settings. A recipe names the loss it was measured for: another --loss on the same pair gets
    that loss's defaults, not settings measured for another loss, and the line says so. Flags still override
    whatever the recipe sets."""
    if recipe is not None:
        if recipe.strip().lower() == "none":
            return None, None
        return shipped_recipes().get(recipe, Path(recipe)), None
    model = model or TrainConfig.model
    data = data or TrainConfig.data
    asked = loss or TrainConfig.loss
    for name, path in shipped_recipes().items():
        values = read_recipe(path)
        if not (_same_model(values.get("model"), model) and values.get("data") == data):
            continue
        measured = values.get("loss", TrainConfig.loss)
        if measured != asked:
            return None, (f"recipe {name} (shipped for --model {values['model']} --data {data}) was measured for "
                          f"--loss {measured}, not applied: --loss {asked} runs its own defaults "
                          f"(sft_weight {LOSS_SFT_WEIGHT.get(asked, 0.0):g}, lr and epochs auto); --recipe {name} "
                          "applies it anyway")
        defaults = TrainConfig(loss=measured).to_dict()
        changed = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
                   if k not in ("model", "data", "loss") and defaults.get(k) != v]
        what = ", ".join(changed) if changed else "the defaults"
        return path, (f"recipe {name} (shipped for --model {values['model']} --data {data} --loss {measured}): "
                      f"{what}; a flag overrides any of it, --recipe none turns it off")
    return None, None


def _same_model(a: str | None, b: str) -> bool:
    """One model by its alias or its hub id (qwen2.5-3b is Qwen/Qwen2.5-3B-Instruct)."""
    return a is not None and MODEL_ALIASES.get(a, a).lower() == MODEL_ALIASES.get(b, b).lower()


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The key/value pairs of a YAML recipe, checked against TrainConfig's fields."""
    path = Path(path)
    if not path.is_file():
        raise QbcoError(f"recipe not found: {path} (shipped recipes: {', '.join(shipped_recipes())}; or --recipe none)")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise QbcoError(f"{path}: not UTF-8 text (byte {err.start}); a damaged file") from None
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
        del values["output"]  # an older run's own config names the run itself: a rerun makes a new run folder
    given = {k: v for k, v in overrides.items() if v is not None}
    _check_keys(given, "config")
    values.update(given)
    try:
        config = TrainConfig(**values)
    except TypeError as err:
        raise QbcoError(f"config: {err}") from None
    coerce_types(config)
    config.validate()
    check_settings_used(config, given)
    return config


def coerce_types(config: TrainConfig) -> None:
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
    """A run's config file (qbco.run.folder names it): every setting but the output folder (the run is the folder
    the file is in, and a rerun with --recipe of this file must make a new run, not collide with this one), after
    `notes` as comments (the overrides of each --resume). Written beside and renamed."""
    values = {**config.to_dict(), "output": None}
    header = "".join(f"# {note}\n" for note in notes)
    write_text(Path(path), header + yaml.safe_dump(values, sort_keys=False))


def load_run_config(path: str | Path) -> TrainConfig:
    """The config of a run (the file save_config wrote), as a TrainConfig: as it ran, so a setting its loss does
    not use (which an older qbco let through, and which did nothing) is no error here."""
    values = read_recipe(path)
    values.pop("output", None)  # the run is the folder the file is in (older runs wrote it here)
    try:
        config = TrainConfig(**values)
    except TypeError as err:
        raise QbcoError(f"{path}: {err}") from None
    coerce_types(config)
    return config.validate()


# What `qbco train --resume RUN` may change; every other setting is fixed by the run's saved config (the data
# order, the model and the loss would no longer be those the checkpoint continues). Checkpointing fewer or more
# layers changes memory and time, not the losses (tests/test_checkpointing.py), so a run stopped out of memory
# can follow the advice (--memory-budget, --gradient-checkpointing) and resume.
RESUME_OVERRIDES = ("lr", "max_steps", "epochs", "save_every", "keep", "memory_budget", "gradient_checkpointing",
                    "report_to")  # where the metrics are also sent changes nothing in the run


def resume_overrides_help() -> str:
    return ", ".join(f"--{name.replace('_', '-')}" for name in RESUME_OVERRIDES) + ", --quiet"


def changed_settings(before: TrainConfig, after: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{name: (before, after)} for every setting that differs, the output folder aside."""
    a, b = before.to_dict(), after.to_dict()
    return {k: (a[k], b[k]) for k in a if k != "output" and a[k] != b[k]}
