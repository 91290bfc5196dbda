"""The device a command runs on and the dtype it computes in."""

from __future__ import annotations

import torch


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that computes it natively (compute capability 8 and up: A100, RTX 30xx, H100), fp16
    on one that does not (T4, V100: bf16 there is emulated and slow; training in fp16 gets a loss scaler); fp32
    on a CPU, where bf16 matmul is about 4x slower than fp32."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if native_bf16() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def native_bf16() -> bool:
    """Whether the current GPU computes bf16 in hardware; plain is_bf16_supported() also says True where it
    is only emulated."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument: compute capability 8 is where native bf16 starts
        return torch.cuda.get_device_capability()[0] >= 8


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
