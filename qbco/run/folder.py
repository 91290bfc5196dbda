"""The run folder: the one contract between train, eval, score, generate and merge. Every file of a run is named
here, and every command reads a run through here; no other module spells a run's file names.

    RUN/
      config.yaml          the resolved TrainConfig (a rerun: qbco train --recipe RUN/config.yaml)
      metrics.jsonl        one line per optimizer step, then one held-out line (qbco.run.metrics_log)
      adapter/             peft weights and config, the tokenizer, reward_shift.json: a finished run has it
      calibration.json     the Platt scale of p_up (qbco.reward.calibration)
      checkpoints/step-N/  adapter weights, state.pt (optimizer, scheduler, RNG), state.json (step, shift, inputs)
      eval/, eval-NAME/    qbco eval's figures on the held-out rows, or on --data NAME
      metrics.png          qbco plot's curves
      tensorboard/, mlflow.db, mlflow-artifacts/, wandb/   --report-to's offline stores (qbco.train.report)

A folder written by `qbco merge` holds qbco_merge.json, which names the run it came from and its base.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from qbco.common.errors import QbcoError
from qbco.common.files import atomic_folder, safetensors_damage, write_text
from qbco.model.device import compute_dtype, default_device
from qbco.model.fused_lora import fuse_lora
from qbco.model.loading import load_base, load_tokenizer
from qbco.model.names import resolve_model
from qbco.reward.calibration import Calibration, identity
from qbco.reward.shift import RewardShift
from qbco.run.config import (
    RESUME_OVERRIDES,
    TrainConfig,
    changed_settings,
    coerce_types,
    load_run_config,
    resume_overrides_help,
    save_config,
)
from qbco.run.metrics_log import Metrics, MetricsWriter, keep_steps, read_metrics

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
ADAPTER_CONFIG = "adapter_config.json"  # peft's names, inside adapter/ and every checkpoint
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REWARD_SHIFT = "reward_shift.json"
CALIBRATION = "calibration.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step-"
STATE_PT = "state.pt"
STATE_JSON = "state.json"
EVAL = "eval"
EVAL_FIGURES = "metrics.json"  # in eval/: which rows the figures are of
PLOT = "metrics.png"
MERGE_INFO = "qbco_merge.json"
TENSORBOARD = "tensorboard"  # --report-to tensorboard: the event files
MLFLOW_STORE = "mlflow.db"  # --report-to mlflow without MLFLOW_TRACKING_URI: a SQLite store of this run
MLFLOW_ARTIFACTS = "mlflow-artifacts"


class RunFolder:
    """One run's folder: its files by name, and what reading them means."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def mlflow_store(self) -> Path:
        return self.path / MLFLOW_STORE

    @property
    def mlflow_artifacts(self) -> Path:
        return self.path / MLFLOW_ARTIFACTS

    @property
    def adapter(self) -> Path:
        """adapter/: what `PeftModel.from_pretrained` and `AutoTokenizer.from_pretrained` read."""
        return self.path / ADAPTER

    @property
    def calibration_file(self) -> Path:
        return self.path / CALIBRATION

    @property
    def plot_file(self) -> Path:
        return self.path / PLOT

    @property
    def checkpoints_folder(self) -> Path:
        return self.path / CHECKPOINTS

    # ------------------------------------------------------------ what the folder holds

    def holds_run(self) -> bool:
        """A run was started here (its config is written first, before any step)."""
        return self.config_file.is_file()

    def is_finished(self) -> bool:
        """A run that finished: its config and its final adapter."""
        return self.holds_run() and (self.adapter / ADAPTER_CONFIG).is_file()

    def finished_config(self) -> TrainConfig:
        """The config of a finished run; the one error every command gives for a folder that is not one."""
        if not self.is_finished():
            raise QbcoError(f"{self.path} is not a finished qbco run (needs {CONFIG} and {ADAPTER}/)")
        config = self.config()
        self.check_adapter()
        return config

    def check_adapter(self) -> None:
        """adapter/ whole: its peft config and tokenizer files JSON objects, its weights a complete safetensors
        file. A file damaged after the run wrote it (cut short by a copy, edited) is one line naming it, before
        any model loads, instead of a traceback from peft or safetensors."""
        for name in (ADAPTER_CONFIG, *TOKENIZER_FILES):
            path = self.adapter / name
            if name == ADAPTER_CONFIG or path.is_file():
                read_json(path, "the run's adapter")
        weights = self.adapter / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise QbcoError(f"{weights} is missing: the run's adapter has no weights; restore it, or train the run again")
        why = safetensors_damage(weights)
        if why is not None:
            raise QbcoError(f"{weights} is damaged ({why}); restore it from a copy, or train the run again")

    def config(self) -> TrainConfig:
        """The run's config, as it ran."""
        if not self.holds_run():
            raise QbcoError(f"{self.path}: no qbco run there ({CONFIG} missing)")
        return load_run_config(self.config_file)

    def save_config(self, config: TrainConfig, notes: list[str] = ()) -> None:
        save_config(config, self.config_file, notes)

    def config_notes(self) -> list[str]:
        """The comment lines at the top of the run's config: what each --resume changed."""
        notes = []
        for line in self.config_file.read_text(encoding="utf-8").splitlines():
            if not line.startswith("# "):
                break
            notes.append(line[2:])
        return notes

    def delta(self, config: TrainConfig) -> float:
        """The delta of p(up) = sigmoid(r - delta): the run's final reward shift for bco, 0 otherwise (bce)."""
        if config.loss != "bco":
            return 0.0
        path = self.adapter / REWARD_SHIFT
        if not path.is_file():
            raise QbcoError(f"{path} is missing: a bco run saves its reward shift there; without it p(up) is unknown")
        shift = RewardShift()
        try:
            shift.load_state_dict(read_json(path, "the run's reward shift"))
        except (KeyError, TypeError, ValueError) as err:
            raise QbcoError(f"{path} is damaged (no reward-shift state: {err}); restore it, or train the run again") from None
        return shift.delta

    def calibration(self) -> Calibration:
        """The run's calibration; identity, saying so, for a run without one (trained before qbco fit one, or
        whose end was cut short)."""
        if not self.calibration_file.is_file():
            return identity(f"no {CALIBRATION} in {self.path}; `qbco eval {self.path}` fits it on the held-out rows")
        values = read_json(self.calibration_file, "the run's calibration")
        try:
            return Calibration.from_dict(values)
        except TypeError as err:
            raise QbcoError(f"{self.calibration_file} is damaged ({err}); `qbco eval {self.path}` writes it again") from None

    def save_calibration(self, calibration: Calibration) -> Path:
        return write_text(self.calibration_file, json.dumps(calibration.to_dict(), indent=2, allow_nan=False) + "\n")

    def metrics(self) -> Metrics:
        """The records of the run's metrics log (qbco.run.metrics_log); a missing log is an error that says so."""
        if not self.metrics_file.is_file():
            raise QbcoError(f"{self.metrics_file} not found: is {self.path} a qbco run folder?")
        return read_metrics(self.metrics_file)

    def metrics_writer(self) -> MetricsWriter:
        return MetricsWriter(self.metrics_file)

    def keep_steps(self, step: int) -> None:
        """Before a resumed run appends to its log: the step records up to `step`, nothing after."""
        keep_steps(self.metrics_file, step)

    def adapter_targets(self) -> list[str]:
        """The module names the run's adapter adapts (its peft config's target_modules)."""
        adapter = read_json(self.adapter / ADAPTER_CONFIG, "the run's adapter")
        targets = adapter.get("target_modules") or []
        return [targets] if isinstance(targets, str) else list(targets)

    def save_adapter(self, model, tokenizer, shift: RewardShift, state_dict: dict | None = None) -> None:
        """adapter/: peft weights and config, the tokenizer, and the reward-shift state, published whole.
        `state_dict`: the LoRA tensors when the model holds only shards of them (FSDP)."""
        with atomic_folder(self.adapter) as tmp:
            model.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            (tmp / REWARD_SHIFT).write_text(json.dumps(shift.state_dict()), encoding="utf-8")

    def eval_folder(self, data: str | None, described: str) -> Path:
        """eval/ for the run's own held-out rows; eval-NAME/ for --data NAME or FILE (NAME-2, -3, ... when that
        name already holds the figures of other rows), so no evaluation writes over another."""
        if data is None:
            return self.path / EVAL
        name = Path(data).expanduser().stem if Path(data).expanduser().is_file() else data
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "data"
        folder, n = self.path / f"{EVAL}-{slug}", 1
        while (folder / EVAL_FIGURES).is_file() and \
                _figures_of(read_json(folder / EVAL_FIGURES, "an earlier qbco eval's figures")) != described:
            n += 1
            folder = self.path / f"{EVAL}-{slug}-{n}"
        return folder

    # ------------------------------------------------------------ checkpoints

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a temporary folder left by a crash never matches the prefix)."""
        folder = self.checkpoints_folder
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_JSON).is_file())

    def checkpoint_folder(self, step: int) -> Path:
        return self.checkpoints_folder / f"{CHECKPOINT_PREFIX}{step:08d}"

    def remove_leftovers(self) -> None:
        """What a run killed while writing a checkpoint left: a half-written temporary folder (removed), or a
        checkpoint moved aside to be replaced (atomic_folder's .NAME.old-PID: put back if nothing replaced it)."""
        folder = self.checkpoints_folder
        for tmp in sorted(folder.glob(".*.partial-*")) if folder.is_dir() else []:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in sorted(folder.glob(f".{CHECKPOINT_PREFIX}*.old-*")) if folder.is_dir() else []:
            name = folder / old.name[1:].rsplit(".old-", 1)[0]
            if name.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.rename(name)

    # ------------------------------------------------------------ a new run's folder

    def never_started(self, config: TrainConfig) -> bool:
        """The folder holds the run `config` describes, and it took no step: no checkpoint, no step in its log."""
        if any(self.checkpoints_folder.glob(f"{CHECKPOINT_PREFIX}*")):
            return False
        if self.metrics_file.is_file() and self.metrics_file.read_text(encoding="utf-8").strip():
            return False
        try:
            saved = load_run_config(self.config_file)
        except QbcoError:  # a config that no longer reads is not this run
            return False
        return not changed_settings(saved, saved.as_asked(config))

    def check_new(self, overwrite: bool, config: TrainConfig | None = None) -> None:
        """A new run goes into a missing or empty folder; one that holds a run needs --overwrite (or --resume),
        unless it is this very run, stopped before its first step (in the reference pass): the same command
        starts it again, and the reference log-probs cached so far are reused."""
        out = self.path
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            return
        if not out.is_dir():
            raise QbcoError(f"--output {out} is a file; choose a folder")
        if not self.holds_run():
            raise QbcoError(f"--output {out} is not empty and holds no qbco run; choose another folder")
        if not overwrite and not (config is not None and self.never_started(config)):
            raise QbcoError(f"--output {out} already holds a run; continue it with --resume {out} or replace it with --overwrite")

    def publish(self, config: TrainConfig) -> None:
        """The run folder, with the resolved config; one already there holds a run that --overwrite replaces (or
        the same run, never started, that the same command starts again: check_new let only those through)."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        self.save_config(config)


def default_output(config: TrainConfig) -> Path:
    """runs/MODEL-DATA-TIMESTAMP, with -2, -3, ... when a run started in the same second holds that name."""
    data = Path(config.data).stem if Path(config.data).suffix else config.data
    model = Path(config.model).name if Path(config.model).expanduser().is_dir() else config.model.replace("/", "_")
    out = first = Path("runs") / f"{model}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while out.exists():
        n += 1
        out = first.with_name(f"{first.name}-{n}")
    return out


def resume_config(run: str | Path, **overrides: Any) -> TrainConfig:
    """The config a resumed run continues with: the run's own, then each override given (not None), which must
    be one of config.RESUME_OVERRIDES. qbco.train.prepare records what changed in the run's config when the
    run restarts."""
    folder = RunFolder(run)
    if not folder.holds_run():
        raise QbcoError(f"--resume {run}: no qbco run there ({CONFIG} missing)")
    given = {k: v for k, v in overrides.items() if v is not None}
    for name in given:
        if name not in RESUME_OVERRIDES:
            raise QbcoError(f"--resume continues a run with its own {CONFIG}; --{name.replace('_', '-')} cannot "
                            f"change (flags allowed with --resume: {resume_overrides_help()})")
    saved = folder.config()
    try:
        config = TrainConfig(**{**saved.to_dict(), **given})
    except TypeError as err:
        raise QbcoError(f"config: {err}") from None
    coerce_types(config)
    return config.validate()


def load_run(run_dir: str | Path, device: torch.device | None = None):
    """(config, tokenizer, PeftModel) of a finished run: the base loaded as it was trained (4-bit or not), the
    run's adapter on top, in eval mode. What eval, score and generate answer and score with."""
    from peft import PeftModel  # peft's import costs a second; only the commands that load a run pay it

    folder = RunFolder(run_dir)
    config = folder.finished_config()
    device = device or default_device()
    tokenizer = load_tokenizer(str(folder.adapter))
    base = load_base(resolve_model(config.model), config.load_in_4bit, compute_dtype(config.dtype, device), device,
                     config.trust_remote_code)
    model = PeftModel.from_pretrained(base, folder.adapter, is_trainable=False)
    fuse_lora(model)
    model.eval()
    return config, tokenizer, model


# ------------------------------------------------------------ a checkpoint's files


def write_checkpoint_files(tmp: Path, model, adapter: dict | None, state: dict, record: dict) -> None:
    """Into a checkpoint's temporary folder: the adapter (peft safetensors; `adapter` the tensors under FSDP),
    the tensors of the training state (state.pt) and the record of where the run stands (state.json)."""
    model.save_pretrained(tmp, state_dict=adapter)
    torch.save(state, tmp / STATE_PT)
    (tmp / STATE_JSON).write_text(json.dumps(record))


def read_checkpoint_files(folder: Path) -> tuple[dict, dict]:
    """(adapter tensors, training state) of a checkpoint; the state read with weights_only=True."""
    from safetensors.torch import load_file  # as peft: its import only where a checkpoint is read

    weights, state = folder / ADAPTER_WEIGHTS, folder / STATE_PT
    why = safetensors_damage(weights) if weights.is_file() else "missing"
    if why is not None:
        raise damaged_checkpoint(folder, f"{weights.name}: {why}")
    try:
        return load_file(weights), torch.load(state, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as err:  # torch.load of a file cut short: RuntimeError
        first = str(err).splitlines()[0].split(". ")[0] if str(err) else type(err).__name__  # torch's is a paragraph
        raise damaged_checkpoint(folder, f"{state.name}: {first}") from None


def checkpoint_record(folder: Path) -> dict:
    """state.json of a checkpoint: step, elapsed_s, shift, inputs (the fingerprint), world (processes)."""
    try:
        record = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise damaged_checkpoint(folder, f"{STATE_JSON}: {err}") from None
    if not isinstance(record, dict) or "step" not in record:
        raise damaged_checkpoint(folder, f"{STATE_JSON}: no step recorded")
    return record


def damaged_checkpoint(folder: Path, why: str) -> QbcoError:
    earlier = [p for p in RunFolder(folder.parent.parent).checkpoints() if p.name < folder.name]
    after = (f"remove {folder} to resume from {earlier[-1].name}" if earlier else
             f"remove {folder} to start the run again from step 0")
    return QbcoError(f"checkpoint {folder.name} is damaged ({why}); {after}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_json(path: Path, what: str):
    """A JSON file of a run, or one line naming it: missing, not UTF-8, not JSON (a damaged file)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QbcoError(f"{path} is missing ({what}); restore it, or train the run again") from None
    except UnicodeDecodeError as err:
        raise QbcoError(f"{path} is damaged: not UTF-8 text (byte {err.start}) ({what}); restore it, or train the run again") from None
    except ValueError as err:
        raise QbcoError(f"{path} is damaged: not JSON ({err}) ({what}); restore it, or train the run again") from None


# ------------------------------------------------------------ a merged folder


def merge_info(folder: str | Path) -> dict | None:
    """What `qbco merge` recorded in a merged folder (the run it came from, its base, the check), or None for a
    folder it did not write."""
    path = Path(folder) / MERGE_INFO
    if not path.is_file():
        return None
    info = read_json(path, "what qbco merge recorded")
    if not isinstance(info, dict):
        raise QbcoError(f"{path} is damaged: not a JSON object (what qbco merge recorded)")
    return info


def check_model_files(folder: Path) -> None:
    """A model folder (what qbco merge writes) whole before it loads: config.json and the tokenizer files JSON,
    every .safetensors complete; one line naming a damaged file instead of a traceback."""
    read_json(folder / "config.json", "the model's config")
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            read_json(folder / name, "the model's tokenizer")
    for weights in sorted(folder.glob("*.safetensors")):
        why = safetensors_damage(weights)
        if why is not None:
            raise QbcoError(f"{weights} is damaged ({why}); merge the run again (qbco merge RUN -o {folder} --overwrite)")


def _figures_of(figures) -> str | None:
    return figures.get("data") if isinstance(figures, dict) else None


def write_merge_info(folder: Path, info: dict) -> None:
    (folder / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
