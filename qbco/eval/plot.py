"""PNG figures: a run's training curves (`qbco plot`) and the reliability diagram of `qbco eval`.

matplotlib's object API on the Agg canvas: no pyplot, no display, no global backend state.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from qbco.common.errors import QbcoError
from qbco.common.files import write_bytes
from qbco.run.folder import RunFolder


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # an optional dependency: training never needs it
        raise QbcoError("qbco plot and qbco eval draw with matplotlib, a dependency of qbco: pip install matplotlib") from None

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def read_steps(run_dir: str | Path) -> tuple[list[dict], dict | None]:
    """(one record per optimizer step, the eval record or None) of the run's metrics log."""
    folder = RunFolder(run_dir)
    metrics = folder.metrics()
    if not metrics.steps:
        raise QbcoError(f"{folder.metrics_file} holds no training steps yet")
    return metrics.steps, metrics.eval


def _values(steps: list[dict], key: str) -> list[float]:
    """A column of the step records; a missing or null value (a step without that class) is NaN, a gap."""
    return [math.nan if s.get(key) is None else float(s[key]) for s in steps]


def training_curves(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """The run's plot file (or `output`): loss, delta, mean reward of the thumbs-up and thumbs-down rows, tokens/s,
    each against the optimizer step."""
    run_dir = Path(run_dir)
    steps, evaluation = read_steps(run_dir)
    x = [s["step"] for s in steps]
    fig = _figure(11, 7)
    axes = fig.subplots(2, 2, sharex=True)
    panels = [
        (axes[0, 0], [("loss", "loss", "C0")], "loss (nats)"),
        (axes[0, 1], [("delta", "delta (reward shift)", "C2")], "delta"),
        (axes[1, 0], [("reward_up", "thumbs-up", "C0"), ("reward_down", "thumbs-down", "C3")], "mean reward r = beta log(pi/pi_ref)"),
        (axes[1, 1], [("tokens_per_s", "tokens/s", "C4")], "tokens / s"),
    ]
    for ax, series, ylabel in panels:
        for key, label, color in series:
            ax.plot(x, _values(steps, key), label=label, color=color, marker="." if len(x) < 50 else None)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
    axes[1, 0].axhline(0, color="grey", lw=0.8)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    title = f"{run_dir.name}: {len(steps)} steps"
    if evaluation and "eval_reward_accuracy" in evaluation:
        acc, loss = evaluation["eval_reward_accuracy"], evaluation.get("eval_loss")
        title += (f"; held-out reward accuracy {'-' if acc is None else f'{acc:.3f}'}, "
                  f"loss {'-' if loss is None else f'{loss:.4f}'}")
    fig.suptitle(title)
    out = Path(output) if output else RunFolder(run_dir).plot_file
    out.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    write_bytes(out, png.getvalue())  # beside and renamed: no half PNG; a full disk is one line
    return out


def reliability_diagram(bins: list[dict], ece: float, path: str | Path, title: str,
                        after: tuple[list[dict], float, bool] | None = None) -> Path:
    """Predicted p(up) (mean per bin) against the observed share of thumbs-up per bin, with the diagonal of
    perfect calibration, and below it the rows per bin. `after` = (bins, ece, fit on these rows) of the
    calibrated p_up, drawn beside sigmoid(r - delta)."""
    fig = _figure(6, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    curves = [(bins, f"sigmoid(r - delta): ECE {ece:.4f}", "C0")]
    if after is not None:
        seen = ", fit on these rows" if after[2] else ""
        curves.append((after[0], f"calibrated p_up: ECE {after[1]:.4f}{seen}", "C2"))
    for curve, label, color in curves:
        full = [b for b in curve if b["rows"]]
        top.plot([b["mean_p_up"] for b in full], [b["observed_up"] for b in full], marker="o", color=color, label=label)
        for b in full:  # the gap that ECE weighs, per bin
            top.plot([b["mean_p_up"]] * 2, [b["mean_p_up"], b["observed_up"]], color=color, alpha=0.4)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("observed share of thumbs-up")
    top.set_title(f"{title}\nECE over {len(bins)} bins")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    width = bins[0]["high"] - bins[0]["low"] if bins else 0.1
    for k, (curve, _, color) in enumerate(curves):  # side by side within each bin
        share = width / len(curves)
        bottom.bar([b["low"] + k * share for b in curve], [b["rows"] for b in curve], width=share, align="edge",
                   color=color, alpha=0.6, edgecolor="white")
    bottom.set_xlabel("predicted p(up)")
    bottom.set_ylabel("rows")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
