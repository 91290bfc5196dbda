"""Several processes on PyTorch's own distributed engine (torch.distributed, DDP, FSDP2), launched by
`torchrun` or `accelerate launch`, each optimizer step exactly the one a single process would take with
all the step's rows (docs/distributed.md).

The launcher says where this process stands in its environment (RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/PORT: torchrun sets them, and so does accelerate launch, which runs torchrun's launcher).
`Parallel.from_env` reads it before anything talks to another process, so bad input fails on every rank
before any process-group work. With one process every method here is the identity, nothing of
torch.distributed is touched, and a run's arithmetic is what it was before this module existed.

How a step stays exact (qbco/train/loop.py, optimizer_step):
- the window is drawn as one process draws it (epoch_order over batch x accumulation x world rows) and cut
  into per-rank micro-batches of `batch_size` rows: micro-batch m of rank k is the k-th slice of the single
  process's micro-batch m (`share`);
- every rank knows the whole window's rows, so the objective's denominators (class counts) are the global
  ones with no communication; the rewards for the reward shift and the step's loss are gathered / summed;
- DDP (and FSDP) average gradients over ranks, the losses are sums over the window: each rank's loss is
  multiplied by the world size before backward, so the averaged gradient is the single-process gradient.
"""

from __future__ import annotations

import atexit
import inspect
import os
from contextlib import nullcontext
from typing import Callable

import torch
from safetensors.torch import load_file

from qbco.common.errors import QbcoError
from qbco.common.launcher import launched_rank
from qbco.model.device import default_device
from qbco.model.loading import shard_decoder
from qbco.model.logprobs import completion_logps, dataset_logps
from qbco.model.lora import reference
from qbco.model.refcache import entry, write_atomic

TRUE = ("1", "true", "yes")


class _PolicyLogps(torch.nn.Module):
    """DDP wraps a module and syncs gradients of what its forward computed: here the policy's summed
    completion log-probs (model.logprobs.completion_logps), which call the decoder directly."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, completion_mask, chunk):
        return completion_logps(self.model, input_ids, attention_mask, completion_mask, chunk)


class Parallel:
    """Where this process stands among the run's processes, and the few collective operations a step needs."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, fsdp: bool = False):
        self.rank, self.world, self.local_rank, self.fsdp = rank, world, local_rank, fsdp and world > 1
        self.ddp: torch.nn.Module | None = None  # DDP(_PolicyLogps(model)) under DDP
        self.root: torch.nn.Module | None = None  # the fully_shard-ed decoder under FSDP
        self.backend: str | None = None
        self.comm_device = torch.device("cpu")

    @classmethod
    def from_env(cls, fsdp: bool = False, environ=None) -> "Parallel":
        """The launcher's view of this process. FSDP when asked for (--fsdp) or when accelerate launch was
        given an FSDP config (ACCELERATE_USE_FSDP). One process that accelerate launch started for several
        (it runs torchrun only with --multi-gpu, a GPU count above one or an FSDP config) is an error: the
        user asked for N processes and would silently get one."""
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1") or 1)
        fsdp = fsdp or env.get("ACCELERATE_USE_FSDP", "").lower() in TRUE
        if world == 1 and "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env:
            raise QbcoError("accelerate launch started one process although more were asked for: on a machine without "
                            "several GPUs it runs torchrun only with --multi-gpu; add --multi-gpu (without --cpu: qbco "
                            "uses gloo where there is no GPU)")
        if fsdp and world == 1:
            raise QbcoError("--fsdp shards the base over several processes; launch with "
                            "torchrun --nproc-per-node N --no-python qbco train ... (this is one process)")
        return cls(launched_rank(env), world, int(env.get("LOCAL_RANK", "0") or 0), fsdp)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run folder, metrics, checkpoints and the summary."""
        return self.rank == 0

    @property
    def mode(self) -> str | None:
        return None if self.world == 1 else "FSDP" if self.fsdp else "DDP"

    def describe(self) -> str:
        """What the summary shows: '1', or '2 (DDP over gloo)'."""
        return "1" if self.world == 1 else f"{self.world} ({self.mode} over {self.backend or 'gloo'})"

    def device(self) -> torch.device:
        """cuda:LOCAL_RANK for a rank on a GPU machine; one process keeps model.device.default_device()."""
        if self.world > 1 and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return default_device()

    def start(self, device: torch.device) -> None:
        """Join the launcher's process group (nccl on CUDA, gloo on CPU); a group already there is used."""
        if self.world == 1:
            return
        import torch.distributed as dist

        self.comm_device = device if device.type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
            # Left when the process exits (a later run in the same process joins the same group).
            atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
        self.backend = dist.get_backend()

    # ------------------------------------------------------------------ the model

    def wrap(self, model: torch.nn.Module, device: torch.device) -> None:
        """Rank 0's LoRA initialisation on every rank, then DDP, or FSDP2 over the decoder layers
        (model.loading.shard_decoder). The PeftModel itself stays what the rest of qbco holds, so that saving it
        and disabling its adapters for the reference act on it, never on a wrapper (docs/pitfalls.md, 10)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in (p for p in model.parameters() if p.requires_grad):
                data = p.data.to(self.comm_device)
                dist.broadcast(data, src=0)
                p.data.copy_(data)
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh

            self.root = shard_decoder(model, init_device_mesh(device.type, (self.world,)), device)
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        # The base is frozen and loaded from the same files on every rank, so DDP's own start-up broadcast
        # of every parameter and buffer (a 4-bit 7B base: 4 GB) and its per-forward buffer broadcast are not needed.
        kwargs = {"init_sync": False}
        kwargs["forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"] = False
        self.ddp = DDP(_PolicyLogps(model), device_ids=[device.index] if device.type == "cuda" else None, **kwargs)

    @property
    def loss_scale(self) -> int:
        """Backward of (loss x world): DDP and FSDP average gradients over ranks, the window's loss is their sum."""
        return self.world

    def accumulating(self, last: bool):
        """No gradient communication for a step's micro-batches but the last (DDP no_sync, FSDP2's
        set_requires_gradient_sync): the gradients add up locally and are reduced once."""
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        if self.root is not None:
            self.root.set_requires_gradient_sync(last)
        return nullcontext()

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """torch's clip_grad_norm_; under FSDP the gradients are sharded DTensors and so is the norm."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # ------------------------------------------------------------------ the window

    def share(self, window: list[list[int]]) -> list[tuple[list[int], list[int], slice]]:
        """This rank's micro-batches of a window (train.prepare.step_windows cuts one per rank and micro-step, rank
        after rank), each with the rows of the whole micro-step across ranks and where this rank's lie in
        them: (rows, group, mine), group[mine] == rows. With one process, group is rows."""
        out = []
        for m in range(0, len(window), self.world):
            parts = window[m : m + self.world]
            start = sum(len(p) for p in parts[: self.rank])
            rows = parts[self.rank]
            out.append((rows, [i for p in parts for i in p], slice(start, start + len(rows))))
        return out

    # ------------------------------------------------------------------ collectives (identity with one process)

    def _all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        import torch.distributed as dist

        t = tensor.to(self.comm_device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t.to(tensor.device)

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        return float(self._all_reduce(torch.tensor(value, dtype=torch.float64)))

    def max(self, value: float) -> float:
        if self.world == 1:
            return value
        return float(self._all_reduce(torch.tensor(value, dtype=torch.float64), "max"))

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any: all ranks stop at the same step."""
        if self.world == 1:
            return bool(flag)
        return bool(self._all_reduce(torch.tensor(int(bool(flag))), "max"))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Equal-length 1-D tensors of every rank, concatenated in rank order (a micro-step's values in its rows' order)."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        t = tensor.detach().to(self.comm_device).contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t)
        return torch.cat(parts).to(tensor.device)

    def gather_objects(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def same(self, obj):
        """Rank 0's object on every rank (a run folder named by the clock, say)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank (the others pass one of the same shape and dtype)."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        t = tensor.to(self.comm_device).contiguous()
        dist.broadcast(t, src=0)
        return t.to(tensor.device)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(device_ids=[self.comm_device.index] if self.comm_device.type == "cuda" else None)

    # ------------------------------------------------------------------ passes over a dataset

    def sharded(self, rows: list, compute: Callable[[list], torch.Tensor]) -> torch.Tensor:
        """[len(rows)] values of compute(part) -> [len(part)], each rank computing a share of the rows and
        every rank getting all of them. Rows are dealt longest first, round-robin, so the shares hold
        alike numbers of tokens; every rank passes the same number of rows (a short share repeats a row and
        drops its value), because under FSDP the ranks run every forward together. The gather is an
        all-reduce of rows filled in by one rank and zero on the others: exact."""
        if self.world == 1 or not rows:
            return compute(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        mine = order[self.rank :: self.world]
        size = -(-len(rows) // self.world)
        padded = mine + (mine or order)[:1] * (size - len(mine))
        values = compute([rows[i] for i in padded])[: len(mine)]
        out = torch.zeros(len(rows), dtype=torch.float32)
        out[torch.tensor(mine, dtype=torch.long)] = values.detach().float().cpu()
        return self._all_reduce(out)

    def reference_pass(self, model, encoded, batch_size, pad_id, device, chunk, key: str | None, on_rows=None):
        """model.logprobs.reference_logps with several processes: rank 0's cache decides (the others may not share its
        disk); a hit is read by rank 0 and broadcast, a miss computed by every rank (its share, gathered) and
        written once, whole, by rank 0. (One process writes the cache in parts as it goes; here an interrupted
        pass is computed again.) `on_rows` hears rank 0's progress scaled to the whole pass."""
        key = key if encoded else None
        if key is not None and self.any(self.main and entry(key).is_file()):
            return self.broadcast(load_file(entry(key))["logps"] if self.main else torch.zeros(len(encoded)))
        tell = None if on_rows is None else (lambda done: on_rows(min(len(encoded), done * self.world)))
        with reference(model):
            value = self.sharded(encoded, lambda rows: dataset_logps(model, rows, batch_size, pad_id, device, chunk, tell))
        failed = None
        if key is not None and self.main:
            try:
                write_atomic({"logps": value.contiguous()}, entry(key))
            except Exception as err:  # a full disk: every rank stops, none waits for rank 0
                failed = err
        if self.any(failed is not None):
            raise failed or QbcoError("rank 0 could not write the reference cache; its message says why")
        return value

    # ------------------------------------------------------------------ checkpoints

    def adapter_state(self, model) -> dict | None:
        """The full LoRA tensors to save, keyed as the PeftModel names them (every rank must call it: under
        FSDP each is gathered from its shards). None outside FSDP: the model holds them whole."""
        if not self.fsdp:
            return None
        return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                for name, p in model.named_parameters() if p.requires_grad}

    def optimizer_state(self, model, optimizer) -> dict:
        """optimizer.state_dict(), or under FSDP the full (unsharded) state from torch.distributed.checkpoint."""
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_adapter(self, model, weights: dict[str, torch.Tensor]) -> None:
        """A saved adapter's tensors into the model (into each rank's shards under FSDP)."""
        from peft import set_peft_model_state_dict

        if not self.fsdp:
            set_peft_model_state_dict(model, weights)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        adapter = model.active_adapter
        full = {name: weights[name.replace(f".{adapter}.", ".")] for name, p in model.named_parameters() if p.requires_grad}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))

    def load_optimizer(self, model, optimizer, state: dict) -> None:
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def gather_rng(self, own: dict) -> list | None:
        """Every rank's RNG states (train.checkpoint.rng_state's dict), for a checkpoint of a run with several processes."""
        return None if self.world == 1 else self.gather_objects(own)

    def set_rng_state(self, states: list | None) -> None:
        """This rank's RNG states from a checkpoint's list (its own GPU's only: the others are other ranks')."""
        if self.world == 1 or not states:
            return
        own = states[self.rank]
        torch.set_rng_state(own["torch_rng"])
        if own["cuda_rng"] and self.comm_device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda_rng"][self.comm_device.index], self.comm_device)

    def check_resume(self, run: str, world: int) -> None:
        """A run continues with the processes it was started with: another number would change every
        step's rows (the window is batch x accumulation x world)."""
        if world != self.world:
            how = "plain qbco train" if world == 1 else f"torchrun --nproc-per-node {world} --no-python qbco train"
            raise QbcoError(f"--resume {run}: the run was trained by {world} process(es) and this is {self.world}; "
                            f"another number changes each step's rows. Continue it with {how} --resume {run}")
