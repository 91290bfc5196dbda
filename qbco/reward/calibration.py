"""Calibration of p(up): a Platt scale fit on held-out rows (the run folder stores it: qbco.run.folder).

BCO trains sigmoid(r - delta) to be the probability of a thumbs-up; on rows it did not train on that
probability is usually over- or under-confident. Platt scaling (Platt 1999) fits two numbers on held-out
rows, and every later p(up) is

    p_up = sigmoid(a * (r - delta) + b)

a > 0 keeps the order of the rows (ROC-AUC, best-of-n and the 0.5 rule of r - delta are unchanged when b = 0).
Pure functions of margins and labels; the model side is in qbco/eval/score.py and qbco/eval/evaluate.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from qbco.reward import metrics


@dataclass(frozen=True)
class Calibration:
    """p_up = sigmoid(a * (r - delta) + b). `method` is "platt" (fit on `rows` rows of `fit_on`) or
    "identity" (a = 1, b = 0: p_up = sigmoid(r - delta)), and then `note` says why."""

    a: float = 1.0
    b: float = 0.0
    method: str = "identity"
    fit_on: str | None = None
    rows: int = 0
    note: str | None = None
    # On the rows it was fit on (optimistic for "after": the fit saw them).
    ece_before: float | None = None
    ece_after: float | None = None
    log_loss_before: float | None = None
    log_loss_after: float | None = None

    def p_up(self, margins) -> np.ndarray:
        """sigmoid(a * m + b) of margins m = r - delta, float64."""
        return _sigmoid(self.a * np.asarray(margins, dtype=np.float64) + self.b)

    def describe(self) -> str:
        if self.method == "identity":
            return f"identity, p_up = sigmoid(r - delta) ({self.note})"
        return (f"Platt, p_up = sigmoid({self.a:.4g} (r - delta) {self.b:+.4g}), fit on {self.rows} rows of {self.fit_on} "
                f"(their ECE {self.ece_before:.4f} -> {self.ece_after:.4f})")

    def to_dict(self) -> dict:
        return {"formula": "p_up = sigmoid(a * (r - delta) + b)", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def identity(note: str) -> Calibration:
    return Calibration(note=note)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(z)


def platt_targets(labels) -> np.ndarray:
    """Platt's regularised targets: t = (N+ + 1) / (N+ + 2) for a thumbs-up, 1 / (N- + 2) for a thumbs-down.
    Hard 0/1 targets let the fit run off to a -> infinity on rows that r - delta separates (the demo's often
    are); these keep it finite and tend to 0/1 as the rows grow."""
    y = np.asarray(labels, dtype=bool)
    ups, downs = int(y.sum()), int((~y).sum())
    return np.where(y, (ups + 1) / (ups + 2), 1 / (downs + 2))


def cross_entropy(margins, targets, a: float, b: float) -> float:
    """Mean of -[t log p + (1 - t) log(1 - p)], p = sigmoid(a m + b), in nats (log-sigmoid form: no log 0)."""
    z = a * np.asarray(margins, dtype=np.float64) + b
    t = np.asarray(targets, dtype=np.float64)
    return float(np.mean(t * np.logaddexp(0, -z) + (1 - t) * np.logaddexp(0, z)))


def fit_platt(margins, labels) -> tuple[float, float]:
    """(a, b) maximising the likelihood of Platt's targets t_i under p_i = sigmoid(a m_i + b):

        (a, b) = argmin  -sum_i [ t_i log p_i + (1 - t_i) log(1 - p_i) ]

    scikit-learn's unpenalised LogisticRegression on the one feature m; a soft target enters as the row
    twice, as a thumbs-up weighted t_i and as a thumbs-down weighted 1 - t_i, which is the same sum.
    Needs both classes.
    """
    from sklearn.linear_model import LogisticRegression

    m = np.asarray(margins, dtype=np.float64).reshape(-1, 1)
    t = platt_targets(labels)
    x = np.concatenate([m, m])
    y = np.concatenate([np.ones(len(m), dtype=int), np.zeros(len(m), dtype=int)])
    weights = np.concatenate([t, 1 - t])
    model = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000, tol=1e-10)
    model.fit(x, y, sample_weight=weights)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def fit_beats_identity(margins, labels, a: float, b: float) -> bool:
    """The check on a fit: on the rows it was fit on, its objective must not be worse than identity's
    (a = 1, b = 0 lies in the family the fit searched, so a correct fit is never worse) and finite."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    t = platt_targets(labels)
    return cross_entropy(margins, t, a, b) <= cross_entropy(margins, t, 1.0, 0.0) + 1e-9


def calibrate(margins, labels, fit_on: str) -> Calibration:
    """The Platt scale of these rows (margins r - delta, thumbs-up labels), or identity with the reason:
    no rows, one class only, or a fit that fails its check."""
    m = np.asarray(margins, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if len(m) == 0:
        return identity(f"no rows to fit on ({fit_on})")
    if y.all() or not y.any():
        return identity(f"the {len(m)} rows of {fit_on} hold one class only")
    a, b = fit_platt(m, y)
    if not fit_beats_identity(m, y, a, b):
        return identity(f"the Platt fit on {fit_on} did worse than identity on its own rows (a {a:.3g}, b {b:.3g})")
    raw, scaled = _sigmoid(m), _sigmoid(a * m + b)
    note = "a < 0: on these rows a higher reward means a thumbs-down is likelier" if a < 0 else None
    return Calibration(a, b, "platt", fit_on, len(m), note, metrics.ece(raw, y), metrics.ece(scaled, y), _log_loss(raw, y), _log_loss(scaled, y))


def figures(probs, labels) -> dict:
    """ECE, log-loss, Brier score and reliability bins of calibrated p_up on labelled rows (qbco/reward/metrics.py's
    definitions, as for sigmoid(r - delta))."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=bool)
    return {"ece": metrics.ece(p, y), "log_loss": _log_loss(p, y), "brier": float(metrics.brier_score_loss(y, p, pos_label=True)),
            "reliability": metrics.reliability_bins(p, y)}


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    return float(metrics.log_loss(y, p, labels=[False, True]))


def calibrate_held_out(margins, labels, fit_on: str) -> Calibration:
    """The end of training: the Platt scale of the held-out rows' r - delta (the run folder stores it); identity,
    saying so, when the run held out no rows."""
    m = np.asarray(margins, dtype=np.float64)
    return calibrate(m, labels, fit_on) if len(m) else identity("the run held out no rows (eval_fraction 0)")
