"""The reward shift delta (arXiv 2404.04656, Eq. 7) as running per-class means.

    mu_up   <- d * mu_up   + (1 - d) * mean(r over thumbs-up rows of the window)
    mu_down <- d * mu_down + (1 - d) * mean(r over thumbs-down rows of the window)
    delta    = (mu_up + mu_down) / 2

Both means start at 0, which is exact: the adapters start at B = 0, so r = 0 for every row at step 0.
delta is read frozen for a whole optimizer step and updated once after it from every reward of the
accumulation window (docs/pitfalls.md, 1); a window with one class updates only that class's mean. Per-class
means keep delta from leaning to the majority class, as a mean over all rewards would (docs/pitfalls.md, 2).
"""

from __future__ import annotations

import torch


class RewardShift:
    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.mu_up = 0.0
        self.mu_down = 0.0

    @property
    def delta(self) -> float:
        return (self.mu_up + self.mu_down) / 2

    def update(self, rewards: torch.Tensor, labels: torch.Tensor) -> None:
        """One EMA step from the detached rewards and bool labels of a whole accumulation window."""
        rewards, labels = rewards.detach().double(), labels.bool()
        if labels.any():
            self.mu_up = self.decay * self.mu_up + (1 - self.decay) * float(rewards[labels].mean())
        if (~labels).any():
            self.mu_down = self.decay * self.mu_down + (1 - self.decay) * float(rewards[~labels].mean())

    def state_dict(self) -> dict[str, float]:
        return {"decay": self.decay, "mu_up": self.mu_up, "mu_down": self.mu_down}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.decay, self.mu_up, self.mu_down = float(state["decay"]), float(state["mu_up"]), float(state["mu_down"])
