"""The figures of docs/merge.md: how far each way of exporting a run is from the trained model.

    .venv/bin/python scripts/measure_merge.py breakdown RUN       # where the bf16 / fp16 gap comes from
    .venv/bin/python scripts/measure_merge.py bases RUN           # dequantized vs original base, fp32 and bf16

Every figure is the mean |log p(variant) - log p(trained)| per completion token, in nats, over the first
--rows held-out rows of the run's data; the trained model is the run's 4-bit base + adapter computing in fp32
(qbco.export.merge.load_trained), the reference `qbco merge` checks against. Prints JSON.

breakdown rounds one part of the exact fp32 merge at a time to bf16 or fp16 and computes in fp32 (weights
rounded, then widened: only the rounding counts), then computes in the dtype itself, merged and unmerged:

- the dequantized NF4 weights W alone, the adapter kept apart in fp32 (unmerged);
- the merged linear weights W + s B A; the tied embedding / head; the norms;
- every weight (OUT's weights, computed exactly);
- every weight and the computation in the dtype (OUT as a user loads it), unmerged (peft keeps the adapter in
  fp32) and merged; and merged by peft into a base already in the dtype (how qbco merged before issue 13).

bases merges into the dequantized NF4 weights (what qbco does) or into the checkpoint's original float
weights, and measures each base alone (adapters off) against the 4-bit base.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from qbco.export import merge
from qbco.model.loading import load_base, load_tokenizer
from qbco.model.names import resolve_model
from qbco.run.folder import RunFolder

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def copy_rounded(model, dtype: torch.dtype, select, compute: bool):
    """A copy of `model` whose parameters named by `select` are rounded to `dtype`: kept in it (compute=True)
    or widened back to fp32 (compute=False, so only the rounding of the weights counts). Tied parameters are
    one object and stay tied."""
    memo = {}
    for name, p in model.named_parameters():
        if p.is_floating_point() and select(name):
            q = p.detach().to(dtype)
            memo[id(p)] = torch.nn.Parameter(q if compute else q.float(), requires_grad=False)
    return copy.deepcopy(model, memo)


def is_linear(name: str) -> bool:
    return "layers." in name and name.endswith("proj.weight") or name.endswith("proj.base_layer.weight")


def is_embedding(name: str) -> bool:
    return "embed_tokens" in name or "lm_head" in name


def is_norm(name: str) -> bool:
    return "norm" in name


def is_base(name: str) -> bool:
    return "lora_" not in name


class Measure:
    """The run's trained model and its check rows, and gaps of anything against it."""

    def __init__(self, run_dir: Path, rows: int, device: torch.device):
        self.run_dir, self.device = run_dir, device
        self.config = RunFolder(run_dir).finished_config()
        tokenizer = load_tokenizer(str(run_dir / "adapter"))
        self.trained = merge.load_trained(run_dir, self.config, device)
        self.rows, self.notes = merge.held_out_rows(self.config, tokenizer, rows)
        self.reference = self.logps(self.trained)
        with self.trained.disable_adapter():
            self.base4 = self.logps(self.trained)

    def logps(self, model) -> list[torch.Tensor]:
        return merge.completion_token_logps(model, self.rows, self.device)

    def gap(self, model, against=None) -> dict:
        g = merge.gap("", self.logps(model), against or self.reference)
        return {"mean": g.mean, "max": g.max}

    def header(self) -> dict:
        return {"run": str(self.run_dir), "rows": len(self.rows), "tokens": sum(t.numel() for t in self.reference),
                "adapter_effect_mean": merge.gap("", self.reference, self.base4).mean, "notes": self.notes}


def breakdown(m: Measure) -> dict:
    from peft import PeftModel

    base = m.trained.unload().dequantize(dtype=torch.float32)  # the dequantized NF4 base, fp32
    unmerged = PeftModel.from_pretrained(base, m.run_dir / "adapter", is_trainable=False).eval()
    merged = copy.deepcopy(unmerged).merge_and_unload().eval()
    out = m.header()
    out["fp32"] = {"unmerged": m.gap(unmerged), "merged": m.gap(merged)}
    parts = [
        ("dequantized W only (unmerged, adapter fp32)", unmerged, lambda n: is_base(n) and is_linear(n), False),
        ("W + sBA (merged linear weights)", merged, is_linear, False),
        ("tied embedding / head", merged, is_embedding, False),
        ("norms", merged, is_norm, False),
        ("every weight (merged), fp32 compute", merged, lambda n: True, False),
        ("every weight and compute (unmerged, adapter fp32)", unmerged, is_base, True),
        ("every weight and compute (merged) = OUT", merged, lambda n: True, True),
    ]
    for dname, dtype in DTYPES.items():
        out[dname] = {}
        kept = {}
        for label, model, select, compute in parts:
            variant = copy_rounded(model, dtype, select, compute)
            start = time.perf_counter()
            logps = m.logps(variant)
            g = merge.gap(dname, logps, m.reference)
            out[dname][label] = {"mean": g.mean, "max": g.max, "seconds": round(time.perf_counter() - start, 1)}
            kept[label] = logps
            del variant
        # What qbco merge did before issue 13: peft's merge into a base already in the dtype, so W is rounded, then
        # W + s B A is rounded again.
        variant = copy_rounded(unmerged, dtype, is_base, True).merge_and_unload().eval()
        g = merge.gap(dname, m.logps(variant), m.reference)
        out[dname]["merged by peft in the dtype (W rounded, then W + sBA again)"] = {"mean": g.mean, "max": g.max}
        del variant
        # The computation's own share: OUT against the same weights computed in fp32.
        g = merge.gap(dname, kept["every weight and compute (merged) = OUT"], kept["every weight (merged), fp32 compute"])
        out[dname]["compute alone (OUT vs its own weights in fp32)"] = {"mean": g.mean, "max": g.max}
    return out


def bases(m: Measure, dtypes: list[str]) -> dict:
    from peft import PeftModel

    out = m.header()
    dequantized = merge.merge_exact(m.trained, m.run_dir)  # consumes the trained model; its figures are taken
    original = load_base(resolve_model(m.config.model), False, torch.float32, m.device, m.config.trust_remote_code)
    with_adapter = PeftModel.from_pretrained(original, m.run_dir / "adapter", is_trainable=False).eval()
    with with_adapter.disable_adapter():
        original_base = m.gap(with_adapter, m.base4)
    original = with_adapter.merge_and_unload().eval()
    for dname in dtypes:
        dtype = torch.float32 if dname == "fp32" else DTYPES[dname]
        row = {}
        for kind, model in (("dequantized", dequantized), ("original", original)):
            variant = merge.cast_copy(model, dtype)
            row[f"{kind}_merged_vs_trained"] = m.gap(variant)
            del variant
        row["original_base_vs_4bit_base_fp32"] = original_base
        out[dname] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("breakdown", "bases"))
    parser.add_argument("run", type=Path)
    parser.add_argument("--rows", type=int, default=merge.CHECK_ROWS)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], help="for bases")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    m = Measure(args.run, args.rows, torch.device(args.device))
    result = breakdown(m) if args.what == "breakdown" else bases(m, args.dtypes)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
