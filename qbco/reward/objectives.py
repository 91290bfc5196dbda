"""The training objectives behind one interface, so the loop never asks which loss it runs.

An objective is built from the config and the training rows (`build_objective`). It says what one unit of
the step order is (a row, or a chosen/rejected pair of rows), what each optimizer step's window divides by
(`window`), the loss of one micro-batch given that window (`loss`), and what it adds to the step's record
(`record`). The arithmetic itself lives in qbco/reward/loss.py as pure functions; each class here only feeds them.

Adding a loss: one class, one line in OBJECTIVES, and its tests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from qbco.common.errors import QbcoError
from qbco.data.feedback import Example, prompt_pairs
from qbco.reward.loss import LossOutput, bco_loss, dpo_loss, kto_loss, sft_loss


@dataclass(frozen=True)
class Window:
    """What every micro-batch's loss must know of its whole optimizer step, so that the micro-batches of a
    window add up to the loss of the window as one batch (docs/pitfalls.md, 1)."""

    rows: int  # rows in the window (a pair is two rows)
    n_up: float  # the per-class means' denominators: the window's counts, or with --balance weight the expected ones
    n_down: float
    delta: float  # the reward shift, frozen for the step (0 for every loss but bco)


@dataclass
class MicroBatch:
    """The log-probs of one micro-batch's rows (summed over completion tokens) and their labels. For a pair
    objective the rows are [chosen..., rejected...]. `mismatched` is KTO's (policy, reference) log-probs
    of each prompt with another row's completion."""

    policy: torch.Tensor  # [B], with gradient
    reference: torch.Tensor  # [B]
    labels: torch.Tensor  # [B] bool, True = thumbs-up
    mismatched: tuple[torch.Tensor, torch.Tensor] | None = None
    tokens: torch.Tensor | None = None  # [B] completion tokens per row (the sft term's per-token mean)


class Objective:
    """The interface; the defaults are those of a loss over rows."""

    pairs = False  # the step unit: a row (False) or a (chosen, rejected) pair of rows
    shifts = False  # reads the reward shift delta, which the loop updates once after every step
    needs_mismatched = False  # KTO: the micro-batch carries mismatched-pair log-probs
    logged: tuple[str, ...] = ()  # fields of its LossOutput that a step's line in the metrics log carries (window means)
    # The config settings, beyond those every loss reads, that this one reads; giving another loss's setting
    # is an error (config.check_settings_used), never a silent no-op.
    settings: frozenset[str] = frozenset({"balance"})

    def __init__(self, config, rows: list[Example]):
        self.data = config.data
        self.beta = config.beta
        self.balance = config.balance
        self.seed = config.seed
        self.sft_weight = config.sft_weight
        self.share_up = sum(e.label for e in rows) / len(rows)

    @classmethod
    def unused_settings(cls) -> list[str]:
        """The settings some other loss reads and this one does not."""
        return sorted(set().union(*(o.settings for o in OBJECTIVES.values())) - cls.settings)

    def units(self, rows: list[Example]) -> list[tuple[int, ...]]:
        """The step order's units: every row once; --balance oversample repeats randomly drawn minority-class
        rows until both classes are as many."""
        units = [(i,) for i in range(len(rows))]
        if self.balance == "oversample":
            ups = [u for u in units if rows[u[0]].label]
            downs = [u for u in units if not rows[u[0]].label]
            small, big = sorted((ups, downs), key=len)
            if small:
                units += random.Random(self.seed).choices(small, k=len(big) - len(small))
        return units

    def window(self, labels: torch.Tensor, delta: float) -> Window:
        """The window's denominators: its own class counts, or with --balance weight the counts the dataset's
        thumbs-up share predicts for a window of this size."""
        n = len(labels)
        if self.balance == "weight":
            n_up, n_down = n * self.share_up, n * (1 - self.share_up)
        else:
            n_up, n_down = int(labels.sum()), int((~labels).sum())
        return Window(n, n_up, n_down, delta if self.shifts else 0.0)

    def loss(self, batch: MicroBatch, window: Window) -> LossOutput:
        raise NotImplementedError

    def with_sft(self, out: LossOutput, batch: MicroBatch, window: Window) -> LossOutput:
        """--sft-weight w > 0: the loss plus w times the per-token NLL of the micro-batch's thumbs-up rows, each
        divided by the window's thumbs-up count (loss.sft_loss), so the window's terms add up to its mean.
        The NLL is kept (detached) for the step's record. w = 0 leaves the objective exactly as it was."""
        if self.sft_weight:
            nll = sft_loss(batch.policy, batch.tokens, batch.labels, window.n_up)
            out.loss = out.loss + self.sft_weight * nll
            out.sft_nll = nll.detach()
        return out

    def record(self, outputs: list[LossOutput], total=float) -> dict:
        """What this objective adds to the step's record: each `logged` field, averaged over the micro-batches;
        with --sft-weight the window's per-token NLL of its thumbs-up rows (`sft_nll`, nats per token). `total`
        adds a rank's share to the other ranks' (several processes: qbco.train.distributed's sum)."""
        record = {key: sum(float(getattr(o, key)) for o in outputs) / len(outputs) for key in self.logged}
        if self.sft_weight:
            record["sft_nll"] = total(sum(float(o.sft_nll) for o in outputs))  # each micro-batch's share of the window's mean
        return record


class BCE(Objective):
    """Per-class means of -log sigmoid(+-(r - delta)) (loss.bco_loss) with delta fixed at 0: the window's delta is
    0 for an objective that does not shift."""

    def loss(self, batch: MicroBatch, window: Window) -> LossOutput:
        out = bco_loss(batch.policy, batch.reference, batch.labels, window.delta, self.beta, window.n_up, window.n_down)
        return self.with_sft(out, batch, window)


class BCO(BCE):
    """arXiv 2404.04656: BCE with the reward shift delta (Eq. 7), which the loop updates once after every step."""

    shifts = True
    settings = frozenset({"balance", "ema_decay", "allow_one_class"})

    def __init__(self, config, rows: list[Example]):
        super().__init__(config, rows)
        if self.share_up in (0, 1) and not config.allow_one_class:
            only = "thumbs-up" if self.share_up else "thumbs-down"
            raise QbcoError(f"{config.data}: every training row is {only}; BCO's delta needs both classes "
                            "(--allow-one-class trains anyway)")


class KTO(Objective):
    """arXiv 2402.01306 (loss.kto_loss), with its batch KL estimate z_0 logged as `kl` (nats per sequence).
    --balance weight sets the paper's lambda_D n_D = lambda_U n_U instead of dividing by expected counts."""

    needs_mismatched = True
    logged = ("kl",)

    def __init__(self, config, rows: list[Example]):
        super().__init__(config, rows)
        s = self.share_up
        weight = config.balance == "weight"
        self.lambda_d = max(1.0, (1 - s) / s) if weight and 0 < s else 1.0
        self.lambda_u = max(1.0, s / (1 - s)) if weight and s < 1 else 1.0

    def loss(self, batch: MicroBatch, window: Window) -> LossOutput:
        kl_policy, kl_reference = batch.mismatched
        out = kto_loss(batch.policy, batch.reference, batch.labels, kl_policy, kl_reference, self.beta,
                       self.lambda_d, self.lambda_u)
        out.loss = out.loss * len(batch.labels) / window.rows  # the micro-batch's mean becomes its share of the window's
        return self.with_sft(out, batch, window)


class DPO(Objective):
    """arXiv 2305.18290 (loss.dpo_loss) on every (thumbs-up, thumbs-down) pair of rows sharing a prompt."""

    pairs = True
    settings = frozenset()  # --balance: every pair holds one row of each class already

    def units(self, rows: list[Example]) -> list[tuple[int, ...]]:
        pairs = prompt_pairs([e.prompt_key for e in rows], [e.label for e in rows])
        if not pairs:
            raise QbcoError(f"{self.data}: --loss dpo needs pairs (rows that share a prompt, one of each label); found none")
        return pairs

    def loss(self, batch: MicroBatch, window: Window) -> LossOutput:
        p = len(batch.labels) // 2
        out = dpo_loss(batch.policy[:p], batch.reference[:p], batch.policy[p:], batch.reference[p:], self.beta)
        out.loss = out.loss * len(batch.labels) / window.rows
        return self.with_sft(out, batch, window)


OBJECTIVES: dict[str, type[Objective]] = {"bco": BCO, "bce": BCE, "kto": KTO, "dpo": DPO}


def build_objective(config, rows: list[Example]) -> Objective:
    return OBJECTIVES[config.loss](config, rows)
