"""The Platt scale as pure functions: it recovers a known (a, b), its check fails on a bad fit, it lowers
the ECE of rows it did not see when the raw p(up) is miscalibrated, and calibration.json round-trips."""

import numpy as np
import pytest

from qbco.reward import calibration as calib
from qbco.reward import metrics
from qbco.run.folder import RunFolder


def synthetic(a: float, b: float, n: int, seed: int):
    """Margins m ~ N(0, 2) and labels drawn with P(up | m) = sigmoid(a m + b): the Platt model holds exactly."""
    rng = np.random.default_rng(seed)
    m = rng.normal(0.0, 2.0, n)
    y = rng.random(n) < 1 / (1 + np.exp(-(a * m + b)))
    return m, y


@pytest.mark.parametrize("a, b", [(0.6, -0.4), (1.5, 1.0), (-0.8, 0.3)])
def test_platt_fit_recovers_a_known_scale(a, b):
    m, y = synthetic(a, b, 40_000, seed=1)
    fit_a, fit_b = calib.fit_platt(m, y)
    # Standard errors at n = 40,000 are 0.01-0.02; Platt's targets shift the optimum by O(1/n).
    assert fit_a == pytest.approx(a, abs=0.06) and fit_b == pytest.approx(b, abs=0.06)


def test_platt_fit_is_the_optimum_of_its_objective():
    """scikit-learn's answer against scipy's Nelder-Mead on the same cross-entropy with Platt's targets."""
    from scipy.optimize import minimize

    m, y = synthetic(1.2, -0.5, 3_000, seed=7)
    t = calib.platt_targets(y)
    best = minimize(lambda w: calib.cross_entropy(m, t, w[0], w[1]), [1.0, 0.0], method="Nelder-Mead",
                    options={"xatol": 1e-9, "fatol": 1e-13, "maxiter": 10_000}).x
    assert calib.fit_platt(m, y) == pytest.approx(tuple(best), abs=1e-4)


def test_platt_targets_by_hand():
    """3 thumbs-up, 1 thumbs-down: t+ = (3 + 1) / (3 + 2) = 0.8, t- = 1 / (1 + 2) = 1/3."""
    assert calib.platt_targets([True, False, True, True]).tolist() == pytest.approx([0.8, 1 / 3, 0.8, 0.8])


def test_the_check_fails_a_bad_fit_and_calibrate_falls_back_to_identity(monkeypatch):
    m, y = synthetic(0.6, -0.4, 2_000, seed=2)
    a, b = calib.fit_platt(m, y)
    assert calib.fit_beats_identity(m, y, a, b)
    assert not calib.fit_beats_identity(m, y, -a, b)  # the order reversed
    assert not calib.fit_beats_identity(m, y, a, b + 5.0)  # everything called thumbs-up
    assert not calib.fit_beats_identity(m, y, float("nan"), b)
    monkeypatch.setattr(calib, "fit_platt", lambda margins, labels: (a, b + 5.0))  # a broken fit
    fallback = calib.calibrate(m, y, "rows")
    assert fallback.method == "identity" and "did worse than identity" in fallback.note


def test_calibration_lowers_the_ece_of_rows_it_did_not_see():
    """Overconfident margins (the truth is sigmoid(0.4 m + 0.5)): fit on one half, measured on the other."""
    m, y = synthetic(0.4, 0.5, 4_000, seed=3)
    fit = calib.calibrate(m[:2000], y[:2000], "first half")
    raw = metrics.ece(1 / (1 + np.exp(-m[2000:])), y[2000:])
    after = metrics.ece(fit.p_up(m[2000:]), y[2000:])
    assert fit.method == "platt" and after < raw / 3, (raw, after)
    assert fit.ece_after < fit.ece_before and fit.log_loss_after < fit.log_loss_before


def test_separable_rows_give_a_finite_scale():
    """Hard 0/1 targets would push a to infinity on rows that r - delta separates; Platt's targets do not."""
    a, _ = calib.fit_platt([-3.0, -2.0, -1.5, 1.0, 2.0, 4.0], [False, False, False, True, True, True])
    assert 0 < a < 20
    m = np.concatenate([np.linspace(-0.5, -0.05, 15), np.linspace(0.05, 0.5, 15)])  # separable, underconfident
    y = m > 0
    fit = calib.calibrate(m, y, "separable")
    assert fit.method == "platt" and 0 < fit.a < 20 and np.all((fit.p_up(m) > 0.5) == y)


def test_identity_when_it_cannot_fit():
    assert calib.calibrate([], [], "nothing").method == "identity"
    one = calib.calibrate([0.1, 0.5, -0.2], [True, True, True], "ups")
    assert one.method == "identity" and "one class" in one.note
    assert one.p_up([0.0, 2.0]).tolist() == pytest.approx([0.5, 1 / (1 + np.exp(-2.0))])


def test_calibration_json_round_trips(tmp_path):
    m, y = synthetic(0.6, -0.4, 500, seed=4)
    fit = calib.calibrate(m, y, "rows")
    RunFolder(tmp_path).save_calibration(fit)
    assert RunFolder(tmp_path).calibration() == fit
    missing = RunFolder(tmp_path / "elsewhere").calibration()
    assert missing.method == "identity" and "qbco eval" in missing.note


# ------------------------------------------------------------------ a calibration that never ends a run badly (issue 25)


def test_non_finite_margins_are_left_out_and_counted():
    """NaN and infinite margins (a row whose reward overflowed) never reach scikit-learn: the fit is that of the
    finite rows, and the count of the others is kept and said."""
    m, y = synthetic(0.5, 0.2, 400, seed=5)
    bad = m.copy()
    bad[:7] = np.nan
    bad[7:10] = [np.inf, -np.inf, np.inf]
    fit = calib.calibrate_held_out(bad, y, "rows")
    clean = calib.calibrate(m[10:], y[10:], "rows")
    assert fit.method == "platt" and (fit.a, fit.b) == pytest.approx((clean.a, clean.b))
    assert fit.dropped == 10 and fit.rows == 390 and "10 of 400 rows left out" in fit.describe()


def test_all_non_finite_margins_keep_identity_and_say_so_once():
    fit = calib.calibrate_held_out([np.nan] * 30, [True, False] * 15, "held-out part of x")
    assert fit.method == "identity" and fit.dropped == 30
    assert fit.note.count("non-finite") == 1 and "every one of the 30 rows" in fit.note
    assert fit.p_up([0.0]).tolist() == [0.5]


def test_too_few_rows_keep_identity():
    """Two numbers fit on six rows are not a calibration: below MIN_ROWS finite rows identity is kept."""
    m = np.array([-3.0, -2.0, -1.5, 1.0, 2.0, 4.0])
    y = np.array([False, False, False, True, True, True])
    fit = calib.calibrate(m, y, "six rows")
    assert fit.method == "identity" and f"at least {calib.MIN_ROWS}" in fit.note


def test_a_negative_slope_is_refused():
    """Rows where a higher reward means a thumbs-down: the fit's a < 0 would reverse every ranking; refused."""
    m, y = synthetic(-0.8, 0.3, 2_000, seed=6)
    fit = calib.calibrate(m, y, "reversed rows")
    assert fit.method == "identity" and "slope" in fit.note and "refused" in fit.note


def test_the_fit_is_kept_only_if_it_beats_identity_on_rows_it_did_not_see(monkeypatch):
    """Already calibrated margins (the truth is sigmoid(m)): a Platt fit only fits noise, and on the rows each
    fold's fit did not see it is no better than identity, so identity is kept."""
    m, y = synthetic(1.0, 0.0, 100, seed=3)
    fit = calib.calibrate(m, y, "calibrated rows")
    assert fit.method == "identity" and "rows it did not see" in fit.note
    assert calib.folds([True] * 7 + [False] * 5).tolist() == [0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4]
