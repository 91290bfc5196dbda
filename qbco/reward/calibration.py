"""Calibration of p(up): a Platt scale fit on held-out rows (the run folder stores it: qbco.run.folder).

BCO trains sigmoid(r - delta) to be the probability of a thumbs-up; on rows it did not train on that
probability is usually over- or under-confident. Platt scaling (Platt 1999) fits two numbers on held-out
rows, and every later p(up) is

    p_up = sigmoid(a * (r - delta) + b)

a > 0 keeps the order of the rows (ROC-AUC, best-of-n and the 0.5 rule of r - delta are unchanged when b = 0).
A fit is kept only when it can be trusted (`calibrate`): non-finite margins are dropped and counted, at least
MIN_ROWS finite rows of both classes, a slope a > 0, and a lower log-loss than identity on rows each fold's fit
did not see (K_FOLDS-fold cross-validation). Otherwise identity is kept, and its note says why; nothing here
raises on bad numbers, so a finished training never ends in a traceback here.
Pure functions of margins and labels; the model side is in qbco/eval/score.py and qbco/eval/evaluate.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from qbco.reward import metrics

MIN_ROWS = 20  # finite rows needed to fit two numbers and check them on rows the fit did not see
K_FOLDS = 5


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
    # Out of fold: each row's "after" from the fit of the folds that did not hold it (K_FOLDS-fold cross-validation).
    ece_before: float | None = None
    ece_after: float | None = None
    log_loss_before: float | None = None
    log_loss_after: float | None = None
    dropped: int = 0  # rows left out because their margin was not finite (NaN, inf)
    checked_on: str | None = None  # how the fit was checked on rows it did not see

    def p_up(self, margins) -> np.ndarray:
        """sigmoid(a * m + b) of margins m = r - delta, float64."""
        return _sigmoid(self.a * np.asarray(margins, dtype=np.float64) + self.b)

    def describe(self) -> str:
        if self.method == "identity":
            return f"identity, p_up = sigmoid(r - delta) ({self.note})"
        dropped = f"; {self.note}" if self.dropped and self.note else ""
        return (f"Platt, p_up = sigmoid({self.a:.4g} (r - delta) {self.b:+.4g}), fit on {self.rows} rows of {self.fit_on} "
                f"(their ECE {self.ece_before:.4f} -> {self.ece_after:.4f} {self.checked_on or 'on the rows fit'}{dropped})")

    def to_dict(self) -> dict:
        return {"formula": "p_up = sigmoid(a * (r - delta) + b)", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def identity(note: str, dropped: int = 0) -> Calibration:
    return Calibration(note=note, dropped=dropped)


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


def folds(labels, k: int = K_FOLDS) -> np.ndarray:
    """Each row's fold, 0..k-1: the rows of each class dealt out in turn (in their order), so every fold holds
    both classes when each class has at least k rows. Deterministic: no seed."""
    y = np.asarray(labels, dtype=bool)
    fold = np.empty(len(y), dtype=int)
    for cls in (True, False):
        where = np.flatnonzero(y == cls)
        fold[where] = np.arange(len(where)) % k
    return fold


def out_of_fold(margins, labels, k: int = K_FOLDS) -> np.ndarray | None:
    """Each row's Platt p_up from the fit on the other k - 1 folds (cross-validation), or None when a fold's
    fit is impossible (one class in the other folds) or not finite."""
    m, y = np.asarray(margins, dtype=np.float64), np.asarray(labels, dtype=bool)
    fold, p = folds(y, k), np.empty(len(m))
    for f in range(k):
        rest = fold != f
        if y[rest].all() or not y[rest].any():
            return None
        a, b = fit_platt(m[rest], y[rest])
        if not (math.isfinite(a) and math.isfinite(b)):
            return None
        p[~rest] = _sigmoid(a * m[~rest] + b)
    return p


def calibrate(margins, labels, fit_on: str) -> Calibration:
    """The Platt scale of these rows (margins r - delta, thumbs-up labels), or identity with the reason. Kept
    only when every rule holds, in this order:

        rows with a non-finite margin are left out (counted in `dropped`; all of them: identity)
        n >= MIN_ROWS finite rows, both classes among them
        the fit on all n rows has a finite slope a > 0 (a <= 0 would reverse or erase the order of the rows)
        log-loss of the out-of-fold p_up (each row scored by the fit of the K_FOLDS - 1 folds without it)
            <  log-loss of identity's sigmoid(m) on the same rows

    ece/log_loss before and after are those out-of-fold figures: honest, not measured on the rows fit."""
    m = np.asarray(margins, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    finite = np.isfinite(m)
    dropped = int((~finite).sum())
    left_out = f"; {dropped} of {len(m)} rows left out: their margin r - delta is not finite" if dropped else ""
    if len(m) and not finite.any():
        return identity(f"every one of the {len(m)} rows of {fit_on} has a non-finite margin r - delta (NaN or inf); "
                        "no calibration fit", dropped)
    m, y = m[finite], y[finite]
    if len(m) == 0:
        return identity(f"no rows to fit on ({fit_on})")
    if y.all() or not y.any():
        return identity(f"the {len(m)} rows of {fit_on} hold one class only{left_out}", dropped)
    if len(m) < MIN_ROWS:
        return identity(f"only {len(m)} rows of {fit_on}: a fit needs at least {MIN_ROWS} to be checked on rows it "
                        f"did not see{left_out}", dropped)
    try:
        a, b = fit_platt(m, y)
        held = out_of_fold(m, y)
    except (ValueError, FloatingPointError) as err:  # scikit-learn's refusal of what it cannot fit
        return identity(f"the Platt fit on {fit_on} failed ({err}){left_out}", dropped)
    if not (math.isfinite(a) and math.isfinite(b)):
        return identity(f"the Platt fit on {fit_on} is not finite (a {a:.3g}, b {b:.3g}){left_out}", dropped)
    if a <= 0:
        return identity(f"the Platt fit on {fit_on} has a slope a = {a:.3g} <= 0 (a higher reward would mean a "
                        f"thumbs-down is likelier); refused{left_out}", dropped)
    if not fit_beats_identity(m, y, a, b):
        return identity(f"the Platt fit on {fit_on} did worse than identity on its own rows (a {a:.3g}, b {b:.3g})"
                        f"{left_out}", dropped)
    raw = _sigmoid(m)
    checked = f"out of fold, {K_FOLDS}-fold cross-validation"
    if held is None:
        return identity(f"the Platt fit on {fit_on} could not be checked on rows it did not see (a fold with one "
                        f"class){left_out}", dropped)
    before, after = _log_loss(raw, y), _log_loss(held, y)
    if not after < before:
        return identity(f"the Platt fit on {fit_on} did not beat identity on rows it did not see (log-loss {after:.4f} "
                        f"vs {before:.4f}, {checked}){left_out}", dropped)
    return Calibration(a, b, "platt", fit_on, len(m), left_out.removeprefix("; ") or None, metrics.ece(raw, y),
                       metrics.ece(held, y), before, after, dropped, checked)


def figures(probs, labels) -> dict:
    """ECE, log-loss, Brier score and reliability bins of calibrated p_up on labelled rows (qbco/reward/metrics.py's
    definitions, as for sigmoid(r - delta))."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=bool)
    finite = np.isfinite(p)  # a non-finite reward gives no p_up: left out, as in metrics.binary_figures
    p, y = p[finite], y[finite]
    if not len(p):
        return {"ece": None, "log_loss": None, "brier": None, "reliability": []}
    return {"ece": metrics.ece(p, y), "log_loss": _log_loss(p, y), "brier": float(metrics.brier_score_loss(y, p, pos_label=True)),
            "reliability": metrics.reliability_bins(p, y)}


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    return float(metrics.log_loss(y, p, labels=[False, True]))


def calibrate_held_out(margins, labels, fit_on: str) -> Calibration:
    """The end of training: the Platt scale of the held-out rows' r - delta (the run folder stores it); identity,
    saying so, when the run held out no rows."""
    m = np.asarray(margins, dtype=np.float64)
    if not len(m):
        return identity("the run held out no rows (eval_fraction 0)")
    try:
        return calibrate(m, labels, fit_on)
    except Exception as err:  # noqa: BLE001 - the training is finished and saved; a calibration never undoes it
        return identity(f"the Platt fit on {fit_on} failed ({type(err).__name__}: {err}); `qbco eval RUN` fits it again")
