"""Loading: the tokenizer, the frozen base (4-bit NF4 or float), the policy (base + fresh LoRA) of a run, its
FSDP sharding, and the fp32 base that a merge adds an adapter to."""

from __future__ import annotations

import inspect
import math

import torch

from qbco.common.errors import QbcoError
from qbco.model.device import compute_dtype, default_device
from qbco.model.logprobs import check_against_forward, logit_transform
from qbco.model.lora import attach_lora
from qbco.model.names import SMOLLM2, resolve_model


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
    # auto starts from every layer; the training loop sets the n its memory plan chose (recompute.apply_recompute)
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
    many models, is applied to the hidden states outside any FSDP forward (qbco.model.logprobs)."""
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


def to_fp32_compute(model) -> None:
    """Compute in fp32 on the weights as trained. The base is loaded in the run's compute dtype, so its 4-bit
    codes and scales are the ones training used; then 4-bit layers compute in fp32, dequantize to fp32 (in
    their forward and in PreTrainedModel.dequantize alike: both follow quant_state.dtype or the input's dtype)
    and every float tensor is widened, exactly. A run that computed in bf16 is the same model without bf16's
    rounding of weights and activations."""
    for module in model.modules():
        if hasattr(module, "compute_dtype"):  # bitsandbytes Linear4bit
            module.compute_dtype = torch.float32
            module.weight.quant_state.dtype = torch.float32
        for _, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != torch.float32:  # 4-bit codes are uint8: untouched
                param.data = param.data.float()  # in place on the Parameter: a tied head stays tied
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                module._buffers[name] = buf.float()


def dequantized_base(config, device: torch.device, dtype: torch.dtype = torch.float32):
    """The base `qbco merge` merges a run's adapter into (qbco.export.merge.merge_exact), without the adapter: a
    4-bit run's NF4 weights loaded as training loads them and dequantized to fp32, a float run's base widened to
    fp32; then in `dtype`. The reference of a merged folder: the same weights the merge added the adapter to."""
    base = load_base(resolve_model(config.model), config.load_in_4bit, compute_dtype(config.dtype, device), device,
                     config.trust_remote_code)
    to_fp32_compute(base)
    if getattr(base, "hf_quantizer", None) is not None:
        base = base.dequantize(dtype=torch.float32)
    return base.to(dtype).eval()


def parameter_count(model) -> int:
    """The base model's parameters (the frozen ones: LoRA's are not counted), a 4-bit weight by the shape it
    quantizes (bitsandbytes packs two into a byte), tied weights once. What run.config.auto_lr scales by."""
    total = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        state = getattr(p, "quant_state", None)
        total += math.prod(state.shape) if state is not None else p.numel()
    return total
