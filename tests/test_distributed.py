"""Several processes (qbco/train/distributed.py, docs/distributed.md): 2 ranks on gloo, started with the environment
torchrun gives its workers, each step against one process with the doubled batch; FSDP's reference; resume;
bad input on every rank before any process-group work; Ctrl-C through a real launcher.

The 2-rank jobs run in one launch (tests/distributed_worker.py runs them one after another in one process
group), so the processes start once; the one-process runs they are compared with run in this process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import separable_rows
from safetensors.torch import load_file

from qbco.common.errors import QbcoError
from qbco.data.feedback import load_feedback
from qbco.run.config import build_config
from qbco.train.distributed import Parallel
from qbco.train.loop import train
from qbco.train.prepare import check_processes, prepare_run, step_windows

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
BIN = Path(sys.executable).parent
COMMON = dict(eval_fraction=0.25, lr=1e-2, beta=0.5, max_prompt_length=32, max_completion_length=16, seed=0, epochs=1)
FIELDS = ("loss", "delta", "grad_norm", "reward_up", "reward_down", "kl", "lr", "tokens", "eval_loss", "eval_reward_accuracy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict:
    """What torchrun puts in a worker's environment (torch/distributed/elastic/agent/server/local_elastic_agent.py)."""
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1", "QBCO_ALLOCATOR": "system", "COLUMNS": "400"}


def spawn(ranks: list[int], world: int, argv: list[str], cwd: Path, timeout: float = 600, ports=None) -> list[tuple[int, str, str]]:
    """The given ranks of a `world`-process run, as torchrun starts them; (exit code, stdout, stderr) each."""
    port = free_port()
    procs = [subprocess.Popen(argv, env=rank_env(r, world, ports[k] if ports else port), cwd=cwd, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, r in enumerate(ranks)]
    deadline, out = time.time() + timeout, []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"ranks still running after {timeout} s: a hang")
        out.append((p.returncode, stdout, stderr))
    return out


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, rel: float = 1e-5, abs_: float = 1e-6, adapter_rel: float = 1e-4) -> None:
    """Step for step the same figures, and the same adapter tensors at the end."""
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        for key in FIELDS:
            if x.get(key) is None:
                assert y.get(key) is None, (x["step"], key)
            else:
                assert x[key] == pytest.approx(y[key], rel=rel, abs=abs_), (x["step"], key, x[key], y[key])
    wa, wb = load_file(a / "adapter/adapter_model.safetensors"), load_file(b / "adapter/adapter_model.safetensors")
    assert wa.keys() == wb.keys() and wa
    for key in wa:  # float summation order differs; Adam's normalisation magnifies it where a gradient is ~0
        assert (wa[key] - wb[key]).norm() <= adapter_rel * wb[key].norm(), key


def jobs(folder: Path, model: Path, data: Path) -> list[dict]:
    def job(name, **config):
        return {"name": name, "config": {"model": str(model), "data": str(data), "output": str(folder / name), **COMMON, **config}}

    ddp = dict(batch_size=4, max_steps=6, save_every=2)
    fsdp = dict(batch_size=4, max_steps=4, save_every=2, fsdp=True, load_in_4bit=False)
    return [
        job("ddp", **ddp),
        {**job("ddp_cut", **ddp), "stop_at": 3},
        {**job("ddp_cut", **ddp), "name": "ddp_resume", "resume": True},
        job("kto", loss="kto", batch_size=4, max_steps=4, load_in_4bit=False),
        job("dpo", loss="dpo", batch_size=2, max_steps=4, load_in_4bit=False),
        job("sft", sft_weight=1.0, batch_size=4, max_steps=4, load_in_4bit=False),
        job("fsdp", **fsdp),
        job("fsdp4", **{**fsdp, "load_in_4bit": True, "gradient_checkpointing": False, "max_steps": 3}),
        {**job("fsdp_cut", **fsdp), "stop_at": 3},
        {**job("fsdp_cut", **fsdp), "name": "fsdp_resume", "resume": True},
        {**job("fsdp_reference", batch_size=4, fsdp=True, load_in_4bit=False), "kind": "fsdp_reference"},
    ]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_model_dir):
    """Every job of `jobs` run by 2 ranks; the folder holds the run folders and each rank's report."""
    folder = tmp_path_factory.mktemp("two-ranks")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in separable_rows(40)), encoding="utf-8")
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"out": str(folder), "jobs": jobs(folder, tiny_model_dir, data)}))
    results = spawn([0, 1], 2, [sys.executable, str(WORKER), str(spec)], folder)
    for rank, (code, _, err) in enumerate(results):
        assert code == 0, f"rank {rank}: {err[-3000:]}"
    return folder


def report(folder: Path, name: str) -> list[dict]:
    return [json.loads((folder / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]


def one_process(folder: Path, name: str, tmp_path: Path) -> Path:
    """The job `name` in this one process, with the doubled batch (and DDP's or FSDP's nothing)."""
    (job,) = [j for j in json.loads((folder / "spec.json").read_text())["jobs"] if j["name"] == name]
    config = {**job["config"], "batch_size": 2 * job["config"]["batch_size"], "fsdp": False, "output": str(tmp_path / name)}
    return train(build_config(**config), log=lambda m: None).output


def test_ddp_equals_one_process_with_the_doubled_batch(two_ranks, tmp_path):
    """2 ranks x batch 4 == 1 process x batch 8, 4-bit base: loss, delta, grad norm, rewards per step and the
    adapter at the end; the data is such that in steps 1 and 2 rank 0 sees one class only (its micro-batch's
    own class means would be wrong there: the denominators are the window's)."""
    config = build_config(**json.loads((two_ranks / "spec.json").read_text())["jobs"][0]["config"])
    examples, _ = load_feedback(config.data, config.eval_fraction, config.seed)
    windows = step_windows([(i,) for i in range(len(examples))], config, world=2)
    for window in (next(windows), next(windows)):
        assert len({examples[i].label for i in window[0]}) == 1  # rank 0: one class
        assert len({examples[i].label for rows in window for i in rows}) == 2  # the window: both
    ranks = report(two_ranks, "ddp")
    assert [r["processes"] for r in ranks] == ["2 (DDP over gloo)"] * 2
    # the reference pass, sharded, cached once: by rank 0 (train and held-out rows), never by rank 1, whose cache
    # is another folder, as on another node; later jobs on the same rows read rank 0's and are still exact
    assert [r["cache_entries"] for r in ranks] == [2, 0]
    assert_same_run(two_ranks / "ddp", one_process(two_ranks, "ddp", tmp_path))
    assert not list(two_ranks.glob("ddp/*.rank*")) and sorted(p.name for p in (two_ranks / "ddp").iterdir()) == [
        "adapter", "calibration.json", "checkpoints", "config.yaml", "metrics.jsonl"]


def test_kto_and_dpo_equal_one_process(two_ranks, tmp_path):
    """KTO's KL estimate is the whole micro-step's (each rank's mismatched pairs gathered), and DPO's pairs
    stay whole on a rank: both equal one process with the doubled batch."""
    for name in ("kto", "dpo"):
        assert_same_run(two_ranks / name, one_process(two_ranks, name, tmp_path))
    assert any(m.get("kl", 0) > 0 for m in metrics(two_ranks / "kto"))  # the estimate is not just its clamp at 0


def test_the_thumbs_up_nll_term_equals_one_process(two_ranks, tmp_path):
    """--sft-weight: each rank's thumbs-up NLL over the window's thumbs-up count, scaled as the BCO terms are,
    is the single-process loss; the logged sft_nll is the ranks' sum, the window's mean."""
    one = one_process(two_ranks, "sft", tmp_path)
    assert_same_run(two_ranks / "sft", one)
    two, single = metrics(two_ranks / "sft")[:-1], metrics(one)[:-1]
    assert [m["sft_nll"] for m in two] == pytest.approx([m["sft_nll"] for m in single], rel=1e-5)
    assert all(m["sft_nll"] > 0 for m in two)


def test_fsdp_steps_equal_one_process(two_ranks, tmp_path):
    """FSDP2 over the decoder layers: per-step figures and the adapter equal one process, for a float base and
    for a 4-bit one (there without gradient checkpointing: backward then sees FSDP's gathered 4-bit weight
    as a plain tensor, fused_lora._frozen_weight). From the second step on this fails if the LoRA weights
    stop training after a reference pass (models.shard_decoder)."""
    assert [r["processes"] for r in report(two_ranks, "fsdp")] == ["2 (FSDP over gloo)"] * 2
    for name in ("fsdp", "fsdp4"):
        assert_same_run(two_ranks / name, one_process(two_ranks, name, tmp_path))
    assert len({round(m["grad_norm"], 6) for m in metrics(two_ranks / "fsdp")[:-1]}) == 4


def test_fsdp_reference_is_the_base_with_adapters_disabled(two_ranks, tiny_model_dir):
    """Under FSDP, the reference (adapters disabled on the PeftModel) equals the policy at B = 0 exactly;
    with B != 0 it is still the base's log-probs, computed here in one process without any adapter
    (trl PR 6527: the adapters stayed on through a wrapper), and the policy differs from it."""
    from transformers import AutoModelForCausalLM

    from qbco.data.encoding import encode_all
    from qbco.model.loading import load_tokenizer

    got = report(two_ranks, "fsdp_reference")
    assert got[0] == got[1] and got[0]["fresh"]["sharded"].startswith("FSDP")
    fresh, trained = got[0]["fresh"], got[0]["trained"]
    assert fresh["reference"] == fresh["policy"]
    job = json.loads((two_ranks / "spec.json").read_text())["jobs"][-1]["config"]
    rows, _ = load_feedback(job["data"], job["eval_fraction"], job["seed"])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    expected = []
    with torch.no_grad():
        for e in encode_all(rows, tokenizer, job["max_prompt_length"], job["max_completion_length"]):
            ids = torch.tensor([e.prompt_ids + e.completion_ids])
            logits = base(input_ids=ids).logits[0, len(e.prompt_ids) - 1 : -1].float()
            expected.append(float(torch.log_softmax(logits, -1).gather(-1, ids[0, len(e.prompt_ids) :, None]).sum()))
    assert trained["reference"] == pytest.approx(expected, abs=1e-4)
    assert trained["reference"] == pytest.approx(fresh["reference"], abs=1e-5)
    assert max(abs(p - r) for p, r in zip(trained["policy"], trained["reference"])) > 1e-2


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_an_interrupted_run_resumed_equals_the_straight_run(two_ranks, kind):
    """Rank 0 alone gets SIGINT after step 3: both ranks stop after that same step (130), rank 0 writes the
    checkpoint; resumed by 2 ranks, the run equals the straight 2-rank run."""
    cut = report(two_ranks, f"{kind}_cut")
    assert [r["exit"] for r in cut] == [130, 130]
    assert "SIGINT at step 3 of" in cut[0]["message"] and "torchrun --nproc-per-node 2" in cut[0]["message"]
    assert "step-00000003" in cut[1]["message"]
    assert [r["exit"] for r in report(two_ranks, f"{kind}_resume")] == [0, 0]
    assert_same_run(two_ranks / kind, two_ranks / f"{kind}_cut", rel=1e-6, abs_=1e-7, adapter_rel=1e-6)


def test_resume_with_another_number_of_processes_is_refused(two_ranks):
    before = sorted(p.relative_to(two_ranks) for p in (two_ranks / "ddp_cut").rglob("*"))
    with pytest.raises(QbcoError, match=r"trained by 2 process\(es\) and this is 1.*torchrun --nproc-per-node 2"):
        train(None, resume=two_ranks / "ddp_cut", log=lambda m: None)
    assert sorted(p.relative_to(two_ranks) for p in (two_ranks / "ddp_cut").rglob("*")) == before


def test_bad_input_fails_on_every_rank_before_any_process_group(tmp_path, tiny_model_dir):
    """Each rank of a 2-process run started alone, on its own port: a rank that joined a process group
    would wait for the other forever. Both exit 2 at once, with one line each, and nothing is written."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completion": "c", "label": "maybe"}) + "\n")
    argv = [sys.executable, "-c", "from qbco.cli.main import app; app()", "train", "--quiet", "--model", str(tiny_model_dir),
            "--data", str(bad), "--output", str(tmp_path / "run")]
    results = spawn([0, 1], 2, argv, tmp_path, timeout=240, ports=[free_port(), free_port()])
    for rank, (code, out, err) in enumerate(results):
        assert code == 2 and not out, (rank, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert ("rank 1: " in err) == (rank == 1) and "row 1, column label: 'maybe'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_launch_settings_that_cannot_work_are_refused(tmp_path, tiny_model_dir):
    with pytest.raises(QbcoError, match="--fsdp shards the base over several processes"):
        Parallel.from_env(fsdp=True, environ={})
    with pytest.raises(QbcoError, match="add --multi-gpu"):  # accelerate's simple launcher: one process for several
        Parallel.from_env(environ={"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    p = Parallel.from_env(environ={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "ACCELERATE_USE_FSDP": "true"})
    assert (p.rank, p.world, p.local_rank, p.fsdp, p.main) == (1, 2, 1, True, False)
    with pytest.raises(QbcoError, match="5 training units are fewer than one step's window of 8"):
        check_processes(p, build_config(batch_size=4), [(i,) for i in range(5)], Path("run"), None)
    check_processes(p, build_config(batch_size=4), [(i,) for i in range(8)], Path("run"), None)
    with pytest.raises(QbcoError, match="--fsdp trains in bf16 or fp32, not fp16"):  # before any process group
        prepare_run(build_config(model=str(tiny_model_dir), data=str(ROOT / "qbco/data/demo.jsonl"), fsdp=True,
                                 dtype="fp16", output=str(tmp_path / "run")), log=lambda m: None, parallel=p)
    assert not (tmp_path / "run").exists()


def test_share_cuts_a_window_into_the_single_process_micro_batches():
    """Micro-batch m of one process with batch 2b is micro-batch m of rank 0 then that of rank 1."""
    config = build_config(batch_size=2, grad_accum=2, seed=5)
    one = step_windows([(i,) for i in range(40)], build_config(batch_size=4, grad_accum=2, seed=5))
    two = step_windows([(i,) for i in range(40)], config, world=2)
    for _ in range(5):
        single, window = next(one), next(two)
        for rank in (0, 1):
            shares = Parallel(rank, 2).share(window)
            assert [group for _, group, _ in shares] == single
            assert [group[mine] for _, group, mine in shares] == [rows for rows, _, _ in shares]
            assert [rows for rows, _, _ in shares] == [single[m][2 * rank : 2 * rank + 2] for m in range(2)]


@pytest.mark.slow
def test_ctrl_c_to_accelerate_launch_checkpoints_every_rank_and_torchrun_resume_finishes(tmp_path, tiny_model_dir):
    """The real launchers: `accelerate launch --multi-gpu --num-processes 2 --no-python qbco train`, SIGINT to
    accelerate (as Ctrl-C in a terminal: the workers are in a session of their own, the launcher forwards
    the signal); every rank checkpoints the same step and exits, no hang. Then `torchrun ... --resume`
    finishes the run, which equals one process with the doubled batch."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in separable_rows(40)), encoding="utf-8")
    out = tmp_path / "run"
    args = ["train", "--quiet", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--eval-fraction",
            "0.25", "--lr", "3e-3", "--beta", "0.5", "--batch-size", "4", "--epochs", "4", "--max-steps", "30",
            "--save-every", "1000", "--max-prompt-length", "32", "--max-completion-length", "16"]
    env = {**os.environ, "QBCO_ALLOCATOR": "system", "PATH": f"{BIN}:{os.environ['PATH']}", "COLUMNS": "400"}
    launcher = subprocess.Popen([str(BIN / "accelerate"), "launch", "--multi-gpu", "--num-processes", "2", "--main-process-port",
                                 str(free_port()), "--no-python", str(BIN / "qbco"), *args],
                                env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and launcher.poll() is None and (not (out / "metrics.jsonl").exists() or len(metrics(out)) < 3):
        time.sleep(0.2)
    assert launcher.poll() is None, launcher.communicate()[1][-3000:]
    launcher.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=120)
    stopped = len(metrics(out))
    assert 3 <= stopped < 30 and [c.name for c in (out / "checkpoints").iterdir()] == [f"step-{stopped:08d}"]
    text = " ".join(err.split())
    assert text.count(f"stopped: SIGINT at step {stopped} of 30") == 1  # rank 0's line, once
    assert f"torchrun --nproc-per-node 2 --no-python qbco train --resume {out}" in text
    assert not (out / "adapter").exists()
    done = subprocess.run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()), "--no-python",
                           str(BIN / "qbco"), "train", "--quiet", "--resume", str(out)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(out)  # rank 0 alone prints the run folder
    config = {**build_config(recipe=out / "config.yaml").to_dict(), "batch_size": 8, "output": str(tmp_path / "one")}
    # --lr 3e-3: at 1e-2 the float differences of summing in another order (1e-7) grew chaotically to 2e-4 in
    # the loss and 1% in the gradient norm by step 30 (measured); at 3e-3 they stay at 1e-7.
    assert_same_run(out, train(build_config(**config), log=lambda m: None).output, rel=1e-4)


@pytest.mark.slow
def test_smollm2_through_torchrun_equals_one_process(tmp_path):
    """The issue's check on the real model in 4-bit: `torchrun --nproc-per-node 2 --no-python qbco train
    --batch-size 2` gives, step for step, the losses of `qbco train --batch-size 4` (|diff| <= 1e-4), writes
    one run folder, exits 0; the summary names the processes (and mimalloc: the restart is harmless)."""
    demo = [json.loads(line) for line in (ROOT / "qbco/data/demo.jsonl").read_text().splitlines()]
    rows = [r for r in demo if r["split"] == "train"][:32]
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "completion", "label")}) + "\n" for r in rows))
    common = ["train", "--data", str(data), "--max-steps", "3", "--seed", "3", "--eval-fraction", "0.2",
              "--max-prompt-length", "64", "--max-completion-length", "32"]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "COLUMNS": "200"}
    env.pop("QBCO_ALLOCATOR", None)
    two = subprocess.run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()), "--no-python",
                          str(BIN / "qbco"), *common, "--batch-size", "2", "--output", str(tmp_path / "two")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 (DDP over gloo)" in two.stdout and "mimalloc" in two.stdout and two.stdout.count("qbco train:") == 1
    one = subprocess.run([str(BIN / "qbco"), *common, "--batch-size", "4", "--output", str(tmp_path / "one"), "--quiet"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 3]
    assert max(abs(x["loss" if "loss" in x else "eval_loss"] - y["loss" if "loss" in y else "eval_loss"]) for x, y in zip(a, b)) <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "small.jsonl", "two"]
