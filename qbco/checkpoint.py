"""Checkpoints: everything a run needs to continue as if it had never stopped, written atomically.

RUN/checkpoints/step-00000050/ holds the adapter (peft safetensors), state.pt (optimizer, scheduler, torch
RNG states, the fp16 loss scaler's; read back with weights_only=True) and state.json (step, elapsed time, reward-shift state). The
data order needs no state of its own: it is a pure function of (seed, epoch), so the step number says where
the run stands in it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from qbco.run_folder import atomic_folder

PREFIX = "step-"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary folder left by a crash never matches the prefix)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file())


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, step: int, elapsed_s: float, shift_state: dict, keep: int,
                    scaler=None) -> Path:
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{PREFIX}{step:08d}"
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "scaler": scaler.state_dict() if scaler is not None else {},  # fp16: the loss scale reached
        }
        torch.save(state, tmp / "state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "elapsed_s": elapsed_s, "shift": shift_state}))
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(folder: Path, model, optimizer, scheduler, scaler=None) -> dict:
    """Restore adapter, optimizer, scheduler, RNG and (fp16) loss-scaler states in place; returns state.json's contents."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    state = torch.load(folder / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return json.loads((folder / "state.json").read_text())
