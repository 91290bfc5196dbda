"""Checkpoints: everything a run needs to continue as if it had never stopped, written atomically.

A checkpoint (qbco.run.folder lays it out: RUN/checkpoints/step-00000050/) holds the adapter, the training
state's tensors (optimizer, scheduler, torch RNG states, the fp16 loss scaler's; read back with
weights_only=True) and a record of where the run stands (step, elapsed time, reward-shift state, the
fingerprint of the inputs, the number of processes). The data order needs no state
of its own: it is a pure function of (seed, epoch) over the training rows, so the step number says where the
run stands in it, as long as the rows are the same; the fingerprint is how a resume knows they are. With
several processes every rank takes part (under FSDP the adapter and the optimizer state are gathered from
their shards), rank 0 alone writes, and the state holds every rank's RNG states.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from qbco.common.errors import QbcoError
from qbco.common.files import DiskFull, atomic_folder
from qbco.model.refcache import hub_revision
from qbco.run.folder import RunFolder, checkpoint_record, read_checkpoint_files, write_checkpoint_files
from qbco.train.distributed import Parallel


def rng_state() -> dict:
    """The torch RNG states (CPU and every CUDA device): what dropout draws from."""
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, step: int, elapsed_s: float, shift_state: dict,
                    keep: int, inputs: dict | None = None, rng: dict | None = None, scaler=None,
                    parallel: Parallel | None = None) -> Path:
    """RUN/checkpoints/step-NNNNNNNN, whole or not at all; `rng` is the RNG state to record (default: now's).
    On a full disk the older checkpoints stay as they are and the error says how to go on. Every rank of
    several calls it (`parallel`); rank 0 alone writes."""
    parallel = parallel or Parallel()
    target = RunFolder(run_dir).checkpoint_folder(step)
    rng = rng or rng_state()
    adapter, optimizer_state = parallel.adapter_state(model), parallel.optimizer_state(model, optimizer)
    rank_rng = parallel.gather_rng(rng)
    failed = None
    if parallel.main:
        try:
            write_checkpoint(run_dir, target, model, adapter, optimizer_state, scheduler, step, elapsed_s, shift_state,
                             keep, inputs, rng, rank_rng, scaler, parallel.world)
        except QbcoError as err:
            failed = err
    # Every rank waits for rank 0's write (no rank exits on a stop while it is still writing), and stops with it.
    if parallel.any(failed is not None):
        raise failed or QbcoError(f"rank 0 could not write checkpoint {target.name}; its message says why")
    return target


def write_checkpoint(run_dir, target, model, adapter, optimizer_state, scheduler, step, elapsed_s, shift_state, keep,
                     inputs, rng, rank_rng, scaler, world) -> None:
    folder, run = target.parent, RunFolder(run_dir)
    try:
        with atomic_folder(target) as tmp:
            state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), **rng,
                     "scaler": scaler.state_dict() if scaler is not None else {}}  # fp16: the loss scale reached
            if rank_rng is not None:
                state["rank_rng"] = rank_rng
            write_checkpoint_files(tmp, model, adapter, state, {"step": step, "elapsed_s": elapsed_s, "shift": shift_state,
                                                                 "inputs": inputs or {}, "world": world})
    except DiskFull as full:
        kept = [p for p in run.checkpoints() if p != target]
        last = f"the last complete checkpoint, {kept[-1].name}, is intact" if kept else "no checkpoint was written"
        raise QbcoError(f"the disk is full: writing checkpoint {target.name} failed with {full.free >> 20} MiB free "
                        f"in {folder}; {last}. Free some space, then: qbco train --resume {run_dir}") from full
    for old in run.checkpoints()[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(folder: Path, model, optimizer, scheduler, scaler=None, parallel: Parallel | None = None) -> dict:
    """Restore adapter, optimizer, scheduler, RNG and (fp16) loss-scaler states in place; returns the checkpoint's
    record (run.folder.checkpoint_record)."""
    parallel = parallel or Parallel()
    adapter, state = read_checkpoint_files(folder)
    parallel.load_adapter(model, adapter)
    parallel.load_optimizer(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    parallel.set_rng_state(state.get("rank_rng"))
    return checkpoint_record(folder)


def saved_inputs(folder: Path) -> dict:
    """The fingerprint a checkpoint recorded ({} for one written before fingerprints existed)."""
    return checkpoint_record(folder).get("inputs", {})


# ------------------------------------------------------------------ what the data order depends on


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def data_fingerprint(train_examples, eval_examples) -> dict[str, str]:
    """The rows (prompt and completion text, in file order), their labels and the held-out split: the step
    order is drawn over these, so a resume on other ones would continue a different run."""
    return {
        "training rows": f"{len(train_examples)} rows, {digest([[e.prompt_key, e.completion] for e in train_examples])}",
        "labels": digest([e.label for e in train_examples]),
        "held-out rows": f"{len(eval_examples)} rows, {digest([[e.prompt_key, e.completion, e.label] for e in eval_examples])}",
    }


def model_fingerprint(train_rows, eval_rows, base: str, load_in_4bit: bool, dtype: torch.dtype) -> dict[str, str]:
    """The token ids (the tokenizer, its chat template and the length limits decide them), the base and how
    it is loaded: the reference log-probs and every step's loss depend on them."""
    inputs = {
        "token ids": digest([[e.prompt_ids, e.completion_ids] for e in train_rows + eval_rows]),
        "base model": base_fingerprint(base),
        "loading of the base": f"{'4-bit' if load_in_4bit else 'not 4-bit'}, {str(dtype).removeprefix('torch.')}",
        "library versions": library_versions(),
    }
    if Path(base).is_dir():
        inputs["base model weights"] = weights_sample(base)
    return inputs


LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")
# Parts of the fingerprint that a resume reports and does not refuse: a library upgraded under a run changes its
# numbers a little (kernels, defaults), not which rows it trains on; the user is told which changed.
WARN_ONLY = ("library versions",)


def library_versions() -> str:
    """'torch 2.8.0, transformers 4.57.1, peft 0.17.1, bitsandbytes 0.48.1' (a library not installed: 'absent')."""
    from importlib.metadata import PackageNotFoundError, version

    def one(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"
    return ", ".join(f"{name} {one(name)}" for name in LIBRARIES)


def weights_sample(base: str, blocks: int = 64, block: int = 1 << 16) -> str:
    """A local base's weight files by `blocks` blocks of `block` bytes spread evenly over each (first and last
    included) with their sizes: an edit anywhere but between the blocks changes it, at a cost of 4 MiB read per
    file whatever its size (base_fingerprint reads only the first and last MiB)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(base).iterdir() if p.suffix == ".safetensors" and p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            for k in range(blocks):
                f.seek(max(0, (size - block) * k // (blocks - 1)))
                h.update(f.read(block))
    return h.hexdigest()[:16]


def base_fingerprint(base: str, sample: int = 1 << 20) -> str:
    """A hub model by its id and commit; a local folder by its config and weight files' names, sizes and first
    and last MiB. Not by their dates, unlike the reference cache's key (qbco.model.refcache.base_identity): a copied or
    re-converted base is the same base, and refusing it would leave a run that cannot be resumed."""
    folder = Path(base)
    if not folder.is_dir():
        return f"{base}@{hub_revision(base)}"
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(sample))
            if size > 2 * sample:
                f.seek(size - sample)
                h.update(f.read(sample))
    return h.hexdigest()[:16]


def check_inputs(run_dir: Path, checkpoint: Path, saved: dict, now: dict, log=None) -> None:
    """Refuse to resume when what a checkpoint recorded differs from the inputs now, naming each part; the
    library versions (WARN_ONLY) are a warning to `log` naming each library that changed."""
    for part in WARN_ONLY:
        if log is not None and part in now and part in saved and saved[part] != now[part]:
            log(f"warning: {version_change(saved[part], now[part])} since {checkpoint.name} was written; the resumed "
                "steps may differ slightly from those a straight run would have taken")
    changed = [k for k in now if k in saved and saved[k] != now[k] and k not in WARN_ONLY]
    if not changed:
        return
    said = ", ".join(describe_change(k, saved[k], now[k]) for k in changed)
    raise QbcoError(f"--resume {run_dir}: the inputs changed since {checkpoint.name} was written: {said}. Resuming "
                    "would continue on another row order or another reference; restore them, or start a new run "
                    f"(qbco train --recipe {RunFolder(run_dir).config_file})")


def version_change(then: str, now: str) -> str:
    """'transformers 4.56.0 -> 4.57.1, bitsandbytes 0.48.1 -> absent' from two library_versions() strings."""
    def parse(text: str) -> dict:
        return dict(item.split(" ", 1) for item in text.split(", ") if " " in item)
    a, b = parse(then), parse(now)
    return ", ".join(f"{name} {a.get(name, 'absent')} -> {b.get(name, 'absent')}"
                     for name in sorted(a.keys() | b.keys(), key=lambda n: (n not in LIBRARIES, n))
                     if a.get(name) != b.get(name)) or "the library versions changed"


def describe_change(part: str, then: str, now: str) -> str:
    if part.endswith("rows"):
        (n_then, _), (n_now, _) = then.split(", "), now.split(", ")
        return f"the {part} ({n_then} then, {n_now} now)" if n_then != n_now else f"the {part} (edited)"
    if part.startswith("loading"):
        return f"the {part} ({then} then, {now} now)"
    return f"the {part}"


def checkpoint_world(folder: Path) -> int:
    """How many processes trained the run up to this checkpoint (1 for checkpoints from before they could be several)."""
    return int(checkpoint_record(folder).get("world", 1))
