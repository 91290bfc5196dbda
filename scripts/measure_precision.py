"""The figures of docs/precision.md: the LM head's bf16 gradient against float64 (qbco before issue 14, plain
autograd in bf16, qbco now), on the tests' synthetic head and on SmolLM2-135M's own head and hidden states at
the demo's completion tokens; and on tiny random Gemma 2 / Gemma 3 / Cohere / Granite models the gap between
qbco's log-probs and the model's own forward without the logit transform (what qbco computed before issue 14)
and with it. The models and the head are the tests' own (tests/test_precision.py, tests/test_logit_transforms.py).

    .venv/bin/python scripts/measure_precision.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
torch.set_num_threads(1)

from test_logit_transforms import gaps, tiny  # noqa: E402
from test_precision import confident_head, float64_reference, relative_errors  # noqa: E402

from qbco.model.logprobs import IDENTITY, HeadLogps  # noqa: E402


def before_issue_14(head, h, targets):
    """qbco's HeadLogps gradient as it was: logits from the bf16 head, probabilities rounded to bf16, W[y] - p W
    as a bf16 product."""
    weight = head.weight
    logits = head(h).float()
    lse = torch.logsumexp(logits, dim=-1)
    probs = (logits - lse.unsqueeze(-1)).exp().to(weight.dtype)
    return (weight[targets].float() - (probs @ weight).float()).to(h.dtype)


def plain_autograd(head, h, targets):
    x = h.clone().requires_grad_(True)
    logp = torch.log_softmax(head(x).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    return torch.autograd.grad(logp.sum(), x)[0]


def qbco_now(head, h, targets):
    x = h.clone().requires_grad_(True)
    return torch.autograd.grad(HeadLogps.apply(x, targets, head, IDENTITY).sum(), x)[0]


def head_errors(title: str, head, h, targets) -> None:
    ref_logp, ref_grad = float64_reference(head, h, targets)
    confident = ref_logp.exp() > 0.95
    print(f"{title}: {len(targets)} tokens, {int(confident.sum())} with p_target > 0.95; gradient error against float64:")
    for name, fn in [("qbco before issue 14", before_issue_14), ("plain bf16 autograd", plain_autograd), ("qbco now", qbco_now)]:
        err = relative_errors(fn(head, h, targets), ref_grad)
        print(f"  {name:22s} confident: median {float(err[confident].median()):7.2%}  max {float(err[confident].max()):7.2%}"
              f"   all tokens: median {float(err.median()):6.2%}  max {float(err.max()):7.2%}")


def smollm2_head(rows: int = 24):
    """SmolLM2-135M in bf16: its LM head, and its hidden states at the completion tokens of the demo's first
    held-out rows (targets: the completions' own tokens)."""
    from qbco.data.encoding import encode_all
    from qbco.data.feedback import read_demo
    from qbco.model.loading import load_base, load_tokenizer
    from qbco.model.names import resolve_model

    path = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(path)
    model = load_base(path, load_in_4bit=False, dtype=torch.bfloat16, device=torch.device("cpu"))
    hs, ts = [], []
    with torch.no_grad():
        for row in encode_all(read_demo()[1][:rows], tokenizer, 256, 128):
            ids = torch.tensor([row.prompt_ids + row.completion_ids])
            hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0]
            p = len(row.prompt_ids)
            hs.append(hidden[p - 1 : -1])
            ts.append(ids[0, p:])
    return model.get_output_embeddings(), torch.cat(hs), torch.cat(ts)


def main() -> None:
    head_errors("synthetic bf16 LM head (tests/test_precision.py)", *confident_head())
    head_errors("SmolLM2-135M's bf16 LM head at the demo's completion tokens", *smollm2_head())
    print("tiny models, fp32, |qbco - the model's forward| (max over rows of summed completion log-probs; gradient: relative):")
    for kind in ("gemma2", "gemma3", "cohere", "granite"):
        model = tiny(kind)
        (v0, g0), (v1, g1) = gaps(model, IDENTITY), gaps(model)
        print(f"  {kind:8s} without the transform: {v0:8.3g} nats, gradient {g0:6.3g};   with it: {v1:8.2g} nats, gradient {g1:8.2g}")


if __name__ == "__main__":
    main()
