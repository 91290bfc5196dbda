"""The one reader of feedback files (qbco/data/reader.py): the same rows in each of the five formats reach `qbco
train`, `qbco binarize` and `qbco eval` as the same rows, and a bad file gets the same one-line error from
all three."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import separable_rows
from typer.testing import CliRunner

from qbco.cli.main import app
from qbco.common.errors import QbcoError
from qbco.data.feedback import load_feedback
from qbco.data.reader import _read_json, read_rows

runner = CliRunner()
FORMATS = ("jsonl", "json", "csv", "tsv", "parquet")


def feedback_rows() -> list[dict]:
    """Rows with a label and a score that agrees with it (4 for thumbs-up, 1 for down), so that `qbco
    binarize` (score >= 4) and `qbco train` (the label) read the same thumbs-up/down rows."""
    return [{**r, "score": 4 if r["label"] else 1} for r in separable_rows(6)]


def write(rows: list[dict], path):
    """`rows` in the format of `path`'s extension, written by each format's own standard tool."""
    fmt = path.suffix[1:]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps({"version": 1, "data": rows}, indent=1), encoding="utf-8")
    elif fmt in ("csv", "tsv"):
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    return path


def cli(*args):
    result = runner.invoke(app, list(map(str, args)), env={"COLUMNS": "400"})
    return result.exit_code, " ".join(result.output.split())


def test_the_five_formats_give_train_binarize_and_eval_the_same_rows(tmp_path, tiny_model_dir, tiny_run):
    rows = feedback_rows()
    expected = [(r["prompt"], r["completion"], r["label"]) for r in rows]
    run = shutil.copytree(tiny_run, tmp_path / "run")  # `qbco eval` writes into the run: a copy of the shared one
    losses, binarized, scores = {}, {}, {}
    for fmt in FORMATS:
        path = write(rows, tmp_path / f"feedback.{fmt}")
        train_rows, held = load_feedback(str(path), 0.0, 0)  # what `qbco train` trains on, every row
        assert held == [] and [(e.prompt, e.completion, e.label) for e in train_rows] == expected, fmt

        code, text = cli("train", "--quiet", "--model", tiny_model_dir, "--data", path, "--eval-fraction", "0",
                         "--max-steps", "1", "--batch-size", "4", "--output", tmp_path / f"train-{fmt}")
        assert code == 0, text
        (step,) = [json.loads(line) for line in (tmp_path / f"train-{fmt}" / "metrics.jsonl").read_text().splitlines()]
        losses[fmt] = (step["loss"], step["tokens"])

        out = tmp_path / f"binarized-{fmt}.jsonl"
        code, text = cli("binarize", path, "-o", out)
        assert code == 0, text
        binarized[fmt] = [(r["prompt"], r["completion"], r["label"]) for r in map(json.loads, out.read_text().splitlines())]

        code, text = cli("eval", run, "--data", path)
        assert code == 0, text
        written = Path(re.search(r"wrote (\S+scores\.jsonl)", text).group(1))  # RUN/eval-feedback*/: one folder per file
        scores[fmt] = [(s["label"], s["reward"]) for s in map(json.loads, written.read_text().splitlines())]

    for fmt in FORMATS:
        assert binarized[fmt] == expected, fmt
        assert losses[fmt] == losses["jsonl"], fmt  # the same rows in the same order: the same first step
        assert scores[fmt] == scores["jsonl"] and [label for label, _ in scores[fmt]] == [r[2] for r in expected], fmt


BAD_FILES = {
    "csv": ("prompt,completion,label,score\nq,ok,true,4\nhello, world,no quotes,false,1\n",
            "row 2 (ending on line 3) has 5 fields, the header 4; a field holding the delimiter"),
    "jsonl": ('{"prompt": "q", "completion": "ok", "label": true, "score": 4}\n{"prompt": "x",\n',
              "line 2: not valid JSON"),
    "json": ('{"data": [{"prompt": "q", "completion": "ok", "label": true, "score": 4}, {"prompt": ',
             "not valid JSON at line 1"),
}


@pytest.mark.parametrize("fmt", sorted(BAD_FILES))
def test_a_bad_file_gets_the_same_one_line_error_from_train_binarize_and_eval(tmp_path, tiny_model_dir, tiny_run, fmt):
    text, fragment = BAD_FILES[fmt]
    path = tmp_path / f"bad.{fmt}"
    path.write_text(text, encoding="utf-8")
    run = shutil.copytree(tiny_run, tmp_path / "run")
    messages = []
    for args in (["train", "--quiet", "--model", tiny_model_dir, "--data", path, "--output", tmp_path / "out"],
                 ["binarize", path, "-o", tmp_path / "out.jsonl"],
                 ["eval", run, "--data", path]):
        code, output = cli(*args)
        assert code == 2 and output.startswith("error: ") and "Traceback" not in output, output
        messages.append(output)
    assert messages[0] == messages[1] == messages[2]
    assert fragment in messages[0] and str(path) in messages[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.jsonl").exists() and not (run / "eval").exists()


def test_json_streams_across_chunk_boundaries_in_both_shapes(tmp_path):
    records = [{"prompt": f"p{i} ] , {{ \"data\"", "response": "r" * (i * 5), "score": i % 5} for i in range(40)]
    path = tmp_path / "rows.json"
    path.write_text(" \n[\n" + ",\n  ".join(json.dumps(r) for r in records) + "\n]\n", encoding="utf-8")
    assert [row for _, row in _read_json(path, chunk_chars=7)] == records
    # {"data": [...]} with other keys (and nested lists) around it, as some hub exports write it
    path.write_text(json.dumps({"meta": {"rows": [1, 2], "data": "no"}, "data": records, "after": [3]}), encoding="utf-8")
    assert [row for _, row in _read_json(path, chunk_chars=5)] == records
    path.write_text('{"rows": []}', encoding="utf-8")
    with pytest.raises(QbcoError, match=r'without a "data" list'):
        list(_read_json(path))
    path.write_text('"text"', encoding="utf-8")
    with pytest.raises(QbcoError, match="expected a JSON list of rows"):
        list(_read_json(path))


def test_json_errors_name_the_line_even_past_the_first_chunk(tmp_path):
    lines = ["["] + [json.dumps({"prompt": f"p{i}", "completion": "c", "label": True}) + "," for i in range(30)] + ['{"prompt": oops}', "]"]
    path = tmp_path / "rows.json"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(QbcoError, match=r"not valid JSON at line 32 "):
        list(_read_json(path, chunk_chars=16))


def test_every_format_reports_a_missing_file_and_an_unknown_extension_the_same_way(tmp_path):
    for fmt in FORMATS:
        with pytest.raises(QbcoError, match=f"data file not found: {tmp_path / ('nope.' + fmt)}"):
            read_rows(tmp_path / f"nope.{fmt}")
    (tmp_path / "rows.txt").write_text("prompt\n", encoding="utf-8")
    with pytest.raises(QbcoError, match=r"cannot tell the format from '\.txt'"):
        read_rows(tmp_path / "rows.txt")
    assert read_rows(tmp_path / "rows.txt", "csv") == []  # a header and no rows
