"""One rank of a test run with several processes: tests/test_distributed.py starts it N times with the
environment torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and reads
what it leaves in the output folder. Every job of the spec runs in this one process group, one after the
other, so N processes are started once for all of them.

    python tests/distributed_worker.py SPEC.json

SPEC: {"out": folder, "jobs": [{"name", "kind": "train" | "fsdp_reference", "config": {...},
"stop_at": step (rank 0 is sent SIGINT after it), "resume": true}]}. Each rank writes
out/<name>.rank<k>.json: its exit code (0, or TrainingStopped's) and what the job measured.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import conftest  # noqa: E402,F401  (one torch thread, an offline hub)
import torch  # noqa: E402
from test_reliability import SignalAt  # noqa: E402  (a real SIGINT after step N; only rank 0 is given one)

RANK = int(os.environ["RANK"])


def train_job(job: dict) -> dict:
    from qbco.common.errors import TrainingStopped
    from qbco.run.config import build_config
    from qbco.train.loop import train

    config = build_config(**job["config"])
    progress = SignalAt(job["stop_at"]) if job.get("stop_at") and RANK == 0 else None
    try:
        result = train(config, progress=progress, log=lambda m: None, resume=config.output if job.get("resume") else None)
    except TrainingStopped as stop:
        return {"exit": stop.exit_code, "message": str(stop)}
    return {"exit": 0, "processes": result.processes, "steps": result.steps, "cache_entries": cache_entries()}


def cache_entries() -> int:
    """Reference log-probs in this rank's cache (each rank has a folder of its own: conftest)."""
    from qbco.model.names import cache_dir

    return len(list((cache_dir() / "reference").glob("*.safetensors")))


def fsdp_reference_job(job: dict) -> dict:
    """The reference (adapters disabled) and the policy under FSDP, both through the sharded pass: at B = 0
    they must be equal; with B != 0 the reference must still be the base's (the test computes the base's
    log-probs in one process, without any adapter) and the policy must differ from it."""
    from qbco.data.encoding import encode_all
    from qbco.data.feedback import load_feedback
    from qbco.model.loading import load_policy
    from qbco.model.logprobs import dataset_logps, reference_logps
    from qbco.run.config import build_config
    from qbco.train.distributed import Parallel

    config = build_config(**job["config"])
    parallel = Parallel.from_env(fsdp=True)
    device = parallel.device()
    parallel.start(device)
    rows, _ = load_feedback(config.data, config.eval_fraction, config.seed)
    out = {}
    for name in ("fresh", "trained"):
        torch.manual_seed(config.seed)
        tokenizer, model, _ = load_policy(config, device)
        if name == "trained":  # the same non-zero B on every rank, as training would leave it
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.copy_(0.05 * torch.randn(p.shape, generator=generator))
        parallel.wrap(model, device)
        encoded = encode_all(rows, tokenizer, config.max_prompt_length, config.max_completion_length)
        ref = reference_logps(model, encoded, config.batch_size, tokenizer.pad_token_id, device, None, None,
                              parallel=parallel)
        pad = tokenizer.pad_token_id
        policy = parallel.sharded(
            encoded, lambda part, model=model, pad=pad: dataset_logps(model, part, config.batch_size, pad, device, None))
        out[name] = {"reference": ref.tolist(), "policy": policy.tolist(),
                     "sharded": type(model.get_base_model().get_decoder()).__name__}
    return {"exit": 0, **out}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    for job in spec["jobs"]:
        result = {"train": train_job, "fsdp_reference": fsdp_reference_job}[job.get("kind", "train")](job)
        (out / f"{job['name']}.rank{RANK}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
