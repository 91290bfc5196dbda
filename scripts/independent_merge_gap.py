"""How far a merged folder is from the run it came from, measured without qbco's code.

    .venv/bin/python scripts/independent_merge_gap.py RUN OUT            # the first 32 held-out demo rows
    .venv/bin/python scripts/independent_merge_gap.py RUN OUT --rows 24 --data feedback.jsonl --base /path/to/model
    .venv/bin/python scripts/independent_merge_gap.py RUN GGUF_OUT       # a `qbco merge --gguf` folder: its .gguf file

OUT is loaded with plain transformers as a user would (its saved dtype, no peft); the trained model is the
run's base loaded with bitsandbytes as qbco trains it (NF4, double quantization, uint8 storage, fp32 compute on
the CPU) with the run's adapter on top through peft. Both give full logits, log-softmax in float32, and the
script prints mean and max |log p(OUT) - log p(trained)| per completion token, as JSON. Only config.yaml is read
from the run besides its adapter; the prompt goes through the tokenizer's chat template, the completion
follows it, ended by EOS. Nothing from the qbco package is imported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "qbco" / "data" / "demo.jsonl"
SMOLLM2_CACHE = Path.home() / ".cache" / "qbco" / "smollm2-135m-instruct"  # where qbco converts the offline model


def rows_of(data: Path, limit: int) -> list[dict]:
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    held = [r for r in rows if r.get("split") == "eval"]  # the demo marks its held-out rows
    return (held or rows)[:limit]


def encode(row: dict, tokenizer, max_prompt: int, max_completion: int) -> tuple[list[int], list[int]]:
    messages = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt:]
    completion = (tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    return prompt, completion[:max_completion]


@torch.no_grad()
def logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)  # every position, every vocabulary entry
    positions = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
    return logp[positions, ids[0, len(prompt):]]


def trained_model(base: str, adapter: Path):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=torch.float32,
                                                 device_map={"": "cpu"}, use_safetensors=True)
    # The CPU repack trap (docs/pitfalls.md, 13): in eval mode without grad, a Linear4bit on a CPU with avx512bf16 repacks
    # its weight for a bf16 inference kernel; this flag is what bitsandbytes checks before taking that path.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return PeftModel.from_pretrained(model, adapter).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--data", type=Path, help="a .jsonl with prompt and completion (default: the demo's held-out rows)")
    parser.add_argument("--base", help="the run's base model folder (default: from config.yaml)")
    args = parser.parse_args()

    config = yaml.safe_load((args.run / "config.yaml").read_text(encoding="utf-8"))
    base = args.base or (str(SMOLLM2_CACHE) if config["model"] == "smollm2-135m" else config["model"])
    data = args.data or (DEMO if config["data"] == "demo" else Path(config["data"]))
    tokenizer = AutoTokenizer.from_pretrained(args.run / "adapter")
    encoded = [encode(r, tokenizer, config["max_prompt_length"], config["max_completion_length"])
               for r in rows_of(data, args.rows)]

    gguf = next(args.out.glob("*.gguf"), None)  # a `qbco merge --gguf` folder: transformers' GGUF loader dequantizes it
    merged = (AutoModelForCausalLM.from_pretrained(args.out, gguf_file=gguf.name, dtype=torch.float32) if gguf else
              AutoModelForCausalLM.from_pretrained(args.out)).eval()  # plain transformers, the saved dtype
    out_logps = [logps(merged, p, c) for p, c in encoded]
    out_dtype = str(merged.dtype)
    del merged
    trained = trained_model(base, args.run / "adapter")
    ref_logps = [logps(trained, p, c) for p, c in encoded]

    diffs = torch.cat([(a - b).abs() for a, b in zip(out_logps, ref_logps)])
    row_sums = torch.tensor([float((a.sum() - b.sum()).abs()) for a, b in zip(out_logps, ref_logps)])
    print(json.dumps({
        "run": str(args.run), "out": str(args.out), "out_dtype": out_dtype, "rows": len(encoded),
        "tokens": diffs.numel(), "mean_abs_delta_logp_per_token": float(diffs.mean()),
        "max_abs_delta_logp": float(diffs.max()), "mean_abs_delta_row_sum": float(row_sums.mean()),
    }, indent=2))


if __name__ == "__main__":
    main()
