"""RUN/metrics.jsonl has one reader (qbco/run/metrics_log.py) and one rule for a half-written last line: skipped when
reading, cut off before a resumed run appends; a damaged line anywhere else is an error naming it."""

import json

import pytest

from qbco.common.errors import QbcoError
from qbco.eval.plot import read_steps
from qbco.run.folder import RunFolder
from qbco.run.metrics_log import MetricsWriter, keep_steps, read_metrics

STEPS = [{"step": s, "loss": 1.0 / s} for s in range(1, 5)]
EVAL = {"split": "eval", "step": 4, "eval_loss": 0.5}


def write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")
    return path


def test_a_half_written_last_line_is_skipped_by_every_reader(tmp_path):
    write(tmp_path / "metrics.jsonl", STEPS, tail='{"step": 5, "loss": 0.1')  # killed in the middle of a write
    log = read_metrics(tmp_path / "metrics.jsonl")
    assert log.steps == STEPS and log.eval is None and log.last_step == STEPS[-1]
    assert read_steps(tmp_path) == (STEPS, None)  # qbco plot's view is the same
    assert RunFolder(tmp_path).metrics().steps == STEPS  # a run folder names its log


def test_a_damaged_line_before_the_end_is_an_error_that_names_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(STEPS[0]) + "\n{oops\n" + json.dumps(STEPS[1]) + "\n", encoding="utf-8")
    with pytest.raises(QbcoError, match=r"metrics\.jsonl: line 2 is not JSON"):
        read_metrics(path)
    with pytest.raises(QbcoError, match="not found: is"):
        RunFolder(tmp_path / "elsewhere").metrics()


def test_resume_keeps_the_steps_up_to_the_checkpoint_and_drops_the_rest(tmp_path):
    path = write(tmp_path / "metrics.jsonl", STEPS + [EVAL], tail='{"step": 5')
    keep_steps(path, 2)
    assert path.read_text(encoding="utf-8") == "".join(json.dumps(r) + "\n" for r in STEPS[:2])
    with MetricsWriter(path) as out:  # what the resumed run appends lands on a line of its own
        out.write({"step": 3, "loss": 0.3})
    assert [r["step"] for r in read_metrics(path).steps] == [1, 2, 3]
    assert not list(tmp_path.glob(".*"))  # the rewrite left no temporary file


def test_the_eval_line_is_kept_apart(tmp_path):
    log = read_metrics(write(tmp_path / "metrics.jsonl", STEPS + [EVAL]))
    assert log.steps == STEPS and log.eval == EVAL
