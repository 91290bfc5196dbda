"""`qbco binarize`: Likert scores and preference pairs become thumbs-up/down rows, every drop counted.

Fixtures are written here in each source's schema; expected counts come from plain loops over the
fixture rows (and, for HelpSteer2, from a hand count written out as literals).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CHAT_TEMPLATE, HS2_CAT_MESSAGES, HS2_TRIP_MESSAGES, make_tokenizer, write_hs2_jsonl_gz

from qbco.common.errors import QbcoError
from qbco.data.binarize import Options, binarize, parse_scale, summary_path

REPO_ROOT = Path(__file__).resolve().parent.parent
HS2_COLUMNS = ["prompt", "response", "helpfulness", "correctness", "coherence", "complexity", "verbosity"]

# (prompt, response, helpfulness) in file order; the other HelpSteer2 scores are filled in below.
HS2 = [
    ("What is 2+2?", "4", "4"),  # 1 up
    ("What is 2+2?", "5, I think", "1"),  # 2 down
    ('Write a haiku, "please"', "Line one,\nline two\r\nline three", "3"),  # 3 down; quotes, commas, newlines
    ("Explain café ☕ in one word", "Ünïcödé answer", "4"),  # 4 up
    ("", "orphan response", "2"),  # 5 empty prompt
    ("Summarise this", "   ", "3"),  # 6 empty response
    ("Summarise this", "A summary.", ""),  # 7 missing score
    ("Summarise this", "Another summary.", "n/a"),  # 8 non-numeric score
    ("What is 2+2?", "4", "4"),  # 9 duplicate of row 1
    ("Tie prompt", "Answer A", "2"),  # 10 down (tie for --pairs-from-scores)
    ("Tie prompt", "Answer B", "2"),  # 11 down (tie)
    ("Multi\nline prompt, with comma", "Good answer", "4.0"),  # 12 up
    ("Multi\nline prompt, with comma", "Weak answer", "0"),  # 13 down
    ("Rate me", "Okay answer", "3"),  # 14 down (a pair by scores, both below the threshold)
    ("Rate me", "Poor answer", "2"),  # 15 down
]


def hs2_records():
    return [dict(zip(HS2_COLUMNS, (p, r, h, "3", "4", "1", "2"))) for p, r, h in HS2]


def write_hs2_csv(path: Path, delimiter: str = ",") -> Path:
    # As spreadsheets write it: BOM, CRLF line ends, quoted fields with commas, quotes and newlines.
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter, lineterminator="\r\n")
        writer.writerow(HS2_COLUMNS)
        for record in hs2_records():
            writer.writerow([record[c] for c in HS2_COLUMNS])
    return path


def expected_likert(records, threshold=4.0):
    """An independent reference: (prompt, completion, label, row) written, and drops by reason."""
    written, drops, seen = [], {}, set()
    for n, rec in enumerate(records, start=1):
        p, r, h = rec["prompt"], rec["response"], rec["helpfulness"]
        reason = None
        if not p.strip():
            reason = "empty prompt"
        elif not r.strip():
            reason = "empty response"
        elif not h.strip():
            reason = "missing score"
        else:
            try:
                score = float(h)
            except ValueError:
                reason = "non-numeric score"
            else:
                if (p, r, score) in seen:
                    reason = "duplicate"
                seen.add((p, r, score))
        if reason:
            drops[reason] = drops.get(reason, 0) + 1
        else:
            written.append((p, r, score >= threshold, n))
    return written, drops


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- Likert mode


def test_helpsteer2_csv_matches_hand_count(tmp_path):
    src = write_hs2_csv(tmp_path / "helpsteer2.csv")
    raw = src.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw and b'"Write a haiku, ""please"""' in raw

    summary = binarize(src, tmp_path / "out.jsonl")

    rows = read_jsonl(tmp_path / "out.jsonl")
    written, drops = expected_likert(hs2_records())
    assert [(r["prompt"], r["completion"], r["label"], r["source"]) for r in rows] == [
        (p, c, label, f"helpsteer2.csv:{n}") for p, c, label, n in written
    ]
    # The hand count: ups are rows 1, 4, 12; downs 2, 3, 10, 11, 13, 14, 15; five rows dropped.
    assert (summary.thumbs_up, summary.thumbs_down, summary.rows_read) == (3, 7, 15)
    assert summary.dropped == drops == {
        "empty prompt": 1, "empty response": 1, "missing score": 1, "non-numeric score": 1, "duplicate": 1,
    }
    assert summary.rows_written + summary.dropped_total == summary.rows_read
    assert summary.columns == {"prompt": "prompt", "response": "response", "score": "helpfulness"}
    assert (summary.scale, summary.scale_source) == ([0, 4], "inferred")
    # label is a JSON boolean, the score the row's own number
    text = (tmp_path / "out.jsonl").read_text(encoding="utf-8")
    assert '"label": true' in text and '"label": false' in text
    assert [r["score"] for r in rows] == [4, 1, 3, 4, 2, 2, 4, 0, 3, 2]
    assert rows[2]["completion"] == "Line one,\nline two\r\nline three"
    saved = json.loads(summary_path(tmp_path / "out.jsonl").read_text())
    assert saved["rows_written"] == 10 and saved["dropped"] == drops and saved["up_share"] == pytest.approx(0.3)


def test_csv_as_people_write_it(tmp_path):
    src = tmp_path / "excel.csv"
    src.write_bytes(
        b'\xef\xbb\xbfprompt , response,score\r\n'
        b'"Hi, there","Line1\r\nLine2, ""quoted""",5\r\n'
        b'\r\n'
        b'plain,"multi\nline",1\r\n'
    )
    summary = binarize(src, tmp_path / "out.jsonl", Options(threshold=4))
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [(r["prompt"], r["completion"], r["label"]) for r in rows] == [
        ("Hi, there", 'Line1\r\nLine2, "quoted"', True), ("plain", "multi\nline", False),
    ]
    assert summary.columns["score"] == "score" and summary.rows_read == 2


def test_csv_with_a_broken_row_names_it(tmp_path):
    src = tmp_path / "broken.csv"
    src.write_text("prompt,response,score\nok,fine,4\nhello, world,no quotes,3\n", encoding="utf-8")
    with pytest.raises(QbcoError, match=r"row 2 .*4 fields, the header 3.*double quotes"):
        binarize(src, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_every_format_gives_the_same_rows(tmp_path):
    records = hs2_records()
    write_hs2_csv(tmp_path / "hs.csv")
    write_hs2_csv(tmp_path / "hs.tsv", delimiter="\t")
    write_hs2_csv(tmp_path / "hs.txt")  # needs --format
    (tmp_path / "hs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (tmp_path / "hs.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "hs.parquet", row_group_size=4)

    results = {}
    for name in ("hs.csv", "hs.tsv", "hs.txt", "hs.jsonl", "hs.json", "hs.parquet"):
        out = tmp_path / f"{name}.out.jsonl"
        binarize(tmp_path / name, out, fmt="csv" if name.endswith(".txt") else None)
        results[name] = [(r["prompt"], r["completion"], r["label"], r["score"], r["source"].split(":")[1])
                         for r in read_jsonl(out)]
    assert len(results["hs.csv"]) == 10
    for name, rows in results.items():
        assert rows == results["hs.csv"], name
    with pytest.raises(QbcoError, match="--format"):
        binarize(tmp_path / "hs.txt", tmp_path / "again.jsonl")


def test_scale_violation_names_the_row(tmp_path):
    src = tmp_path / "hs.jsonl"
    rows = [{"prompt": "a", "response": "x", "helpfulness": 4},
            {"prompt": "b", "response": "y", "helpfulness": 2},
            {"prompt": "c", "response": "z", "helpfulness": 5}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(QbcoError, match=r"hs\.jsonl row 3: helpfulness = 5 is outside the scale 0-4"):
        binarize(src, tmp_path / "out.jsonl", Options(scale=(0, 4)))
    assert not (tmp_path / "out.jsonl").exists()
    summary = binarize(src, tmp_path / "out.jsonl", Options(scale=parse_scale("1-5")))
    assert (summary.scale, summary.scale_source, summary.thumbs_up) == ([1, 5], "given", 2)
    with pytest.raises(QbcoError, match="every row thumbs-down"):
        binarize(src, tmp_path / "o2.jsonl", Options(scale=(0, 3)))
    with pytest.raises(QbcoError, match="MIN-MAX"):
        parse_scale("4-0")


def test_strict_stops_at_the_first_defect(tmp_path):
    src = write_hs2_csv(tmp_path / "hs.csv")
    with pytest.raises(QbcoError, match=r"hs\.csv row 5: empty prompt \(--strict"):
        binarize(src, tmp_path / "out.jsonl", Options(strict=True))
    assert not (tmp_path / "out.jsonl").exists()


def test_missing_column_lists_what_was_found(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps({"question": "q", "answer": "a", "stars": 3}) + "\n", encoding="utf-8")
    with pytest.raises(QbcoError, match=r"no column 'prompt' \(found: question, answer, stars\)"):
        binarize(src, tmp_path / "out.jsonl")
    summary = binarize(src, tmp_path / "out.jsonl", Options(prompt_column="question", response_column="answer",
                                                            score_column="stars", threshold=3))
    assert summary.thumbs_up == 1


def test_conversational_prompts_stay_lists(tmp_path):
    src = tmp_path / "chat.jsonl"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rows = [{"prompt": chat, "completion": "Hello!", "rating": 5},
            {"prompt": chat, "completion": [{"role": "assistant", "content": "Go away."}], "rating": 1}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    binarize(src, tmp_path / "out.jsonl")
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [(r["prompt"], r["completion"], r["label"]) for r in out] == [(chat, "Hello!", True), (chat, "Go away.", False)]


def test_helpsteer2_multi_turn_prompts_become_chat_messages(tmp_path):
    """HelpSteer2's train.jsonl.gz as the hub stores it: the earlier turns of a multi-turn prompt, split at
    their <extra_id_1> lines, become user/assistant messages ending with the user turn the response answers,
    so the model never sees the markers."""
    src = write_hs2_jsonl_gz(tmp_path / "train.jsonl.gz")
    summary = binarize(src, tmp_path / "hs2.jsonl")
    rows = read_jsonl(tmp_path / "hs2.jsonl")
    assert [(r["prompt"], r["completion"], r["label"], r["source"]) for r in rows] == [
        (HS2_CAT_MESSAGES, "How about Marzipan?", True, "train.jsonl.gz:1"),
        (HS2_CAT_MESSAGES, "Cat.", False, "train.jsonl.gz:2"),
        ("c#", "C# is a high-level, object-oriented programming language developed by Microsoft.", False, "train.jsonl.gz:3"),
        ("c#", "A musical note.", False, "train.jsonl.gz:4"),
        (HS2_TRIP_MESSAGES, "Visit the Gulbenkian museum.", False, "train.jsonl.gz:5"),
        (HS2_TRIP_MESSAGES, "The Oceanarium and the Gulbenkian, then fado in the evening.", False, "train.jsonl.gz:6"),
    ]
    # Row 7 ends on an assistant marker: no user turn for its response to answer.
    assert summary.dropped == {"malformed messages": 1}
    assert (summary.prompts, summary.multi_turn_prompts) == (3, 2)
    assert json.loads(summary_path(tmp_path / "hs2.jsonl").read_text())["multi_turn_prompts"] == 2

    # What the model is shown: the conversation through the chat template, no marker left.
    from qbco.data.encoding import prompt_text

    tok = make_tokenizer([])
    tok.chat_template = CHAT_TEMPLATE
    text, templated = prompt_text(rows[0]["prompt"], tok)
    assert templated and "<extra_id_1>" not in text
    assert text == ("user : What is a good name for a cat? assistant : Whiskers is a classic choice. "
                    "user : Something less common, please. assistant :")


def test_pairs_from_scores_on_a_local_helpsteer2_copy_as_it_is(tmp_path):
    """The hub's file, unchanged: consecutive rows share a (multi-turn) prompt; the better-scored response of
    each prompt is thumbs-up, the worse thumbs-down, ties dropped; the CLI's summary counts the multi-turn
    prompts."""
    from typer.testing import CliRunner

    from qbco.cli.main import app

    src = write_hs2_jsonl_gz(tmp_path / "train.jsonl.gz")
    result = CliRunner().invoke(app, ["binarize", str(src), "-o", str(tmp_path / "pairs.jsonl"), "--pairs-from-scores"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = read_jsonl(tmp_path / "pairs.jsonl")
    # Hand count: the cat prompt 4 > 1, the Lisbon prompt 3 > 2; "c#" is a tie (3, 3).
    assert [(r["source"], r["label"]) for r in rows] == [
        ("train.jsonl.gz:1", True), ("train.jsonl.gz:2", False), ("train.jsonl.gz:5", False), ("train.jsonl.gz:6", True)]
    assert [r["prompt"] for r in rows] == [HS2_CAT_MESSAGES, HS2_CAT_MESSAGES, HS2_TRIP_MESSAGES, HS2_TRIP_MESSAGES]
    summary = json.loads((tmp_path / "pairs.summary.json").read_text())
    assert summary["dropped"] == {"tied scores": 2, "malformed messages": 1}
    assert (summary["prompts"], summary["multi_turn_prompts"]) == (2, 2)
    assert "2 (2 multi-turn)" in result.output


@pytest.mark.parametrize("prompt", [
    "<extra_id_1>Assistant\nHello there.\n<extra_id_1>User\nHi",  # opens with the assistant
    "One\n<extra_id_1>User\nTwo",  # two user turns in a row
    "One\n<extra_id_1>Assistant\n\n<extra_id_1>User\nThree",  # an empty turn
])
def test_turns_that_do_not_alternate_are_counted_as_malformed(tmp_path, prompt):
    src = tmp_path / "hs.jsonl"
    src.write_text(json.dumps({"prompt": prompt, "response": "ok", "helpfulness": 4}) + "\n"
                   + json.dumps({"prompt": "plain", "response": "ok", "helpfulness": 4}) + "\n", encoding="utf-8")
    summary = binarize(src, tmp_path / "out.jsonl")
    assert summary.dropped == {"malformed messages": 1} and summary.rows_written == 1


# ---------------------------------------------------------------- pairs


def test_pairs_from_scores_and_dpo_prompts_only(tmp_path):
    src = write_hs2_csv(tmp_path / "hs.csv")
    records = hs2_records()
    # Independent reference: group the usable, non-duplicate rows by prompt; a prompt with two different
    # scores gives its best response thumbs-up and its worst thumbs-down.
    usable = {n for _, _, _, n in expected_likert(records)[0]}
    by_prompt: dict[str, list[int]] = {}
    for n in sorted(usable):
        by_prompt.setdefault(records[n - 1]["prompt"], []).append(n)
    paired = {p: ns for p, ns in by_prompt.items() if len({float(records[n - 1]["helpfulness"]) for n in ns}) > 1}
    up = {max(ns, key=lambda n: float(records[n - 1]["helpfulness"])) for ns in paired.values()}
    down = {min(ns, key=lambda n: float(records[n - 1]["helpfulness"])) for ns in paired.values()}

    summary = binarize(src, tmp_path / "pairs.jsonl", Options(mode="pairs-from-scores"))
    rows = read_jsonl(tmp_path / "pairs.jsonl")
    assert {int(r["source"].split(":")[1]) for r in rows if r["label"]} == up == {1, 12, 14}
    assert {int(r["source"].split(":")[1]) for r in rows if not r["label"]} == down == {2, 13, 15}
    assert summary.dropped == {"empty prompt": 1, "empty response": 1, "missing score": 1, "non-numeric score": 1,
                               "duplicate": 1, "prompt without a pair": 2, "tied scores": 2}
    assert summary.rows_written + summary.dropped_total == summary.rows_read == 15
    assert summary.passes == 2

    # --dpo-prompts-only: the same prompts, labels from the threshold ("Rate me" has two thumbs-down).
    summary = binarize(src, tmp_path / "dpo.jsonl", Options(dpo_prompts_only=True))
    rows = read_jsonl(tmp_path / "dpo.jsonl")
    assert {(int(r["source"].split(":")[1]), r["label"]) for r in rows} == {
        (n, float(records[n - 1]["helpfulness"]) >= 4) for ns in paired.values() for n in ns
    } == {(1, True), (2, False), (12, True), (13, False), (14, False), (15, False)}
    assert summary.dropped["prompt without a pair"] == 2 and summary.dropped["tied scores"] == 2
    with pytest.raises(QbcoError, match="--threshold has no effect"):
        binarize(src, tmp_path / "x.jsonl", Options(mode="pairs-from-scores", threshold=3))


def msg(role, content):
    return {"role": role, "content": content}


def test_trl_pairs_become_one_up_and_one_down(tmp_path):
    # UltraFeedback as TRL stores it: full conversations (implicit prompt) plus the two scores.
    ultra = [
        {"chosen": [msg("user", "Name a colour."), msg("assistant", "Blue.")],
         "rejected": [msg("user", "Name a colour."), msg("assistant", "Seven.")],
         "score_chosen": 8.5, "score_rejected": 3.0},
        {"chosen": [msg("user", "Say hi."), msg("assistant", "Hi!")],  # identical pair: dropped twice
         "rejected": [msg("user", "Say hi."), msg("assistant", "Hi!")], "score_chosen": 5.0, "score_rejected": 5.0},
        {"chosen": [msg("user", "Count to 2."), msg("assistant", "1, 2")],  # rejected empty: only chosen kept
         "rejected": [msg("user", "Count to 2."), msg("assistant", " ")], "score_chosen": 9.0, "score_rejected": 1.0},
        # Capybara-style multi-turn: the prompt is every turn before the last assistant message.
        {"chosen": [msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "2+2?"), msg("assistant", "4")],
         "rejected": [msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "2+2?"), msg("assistant", "5")],
         "score_chosen": None, "score_rejected": None},
        {"chosen": [msg("user", "Oops")], "rejected": [msg("user", "Oops"), msg("assistant", "Fine.")],
         "score_chosen": 1.0, "score_rejected": 0.0},  # chosen has no assistant turn: malformed
    ]
    src = tmp_path / "ultrafeedback.parquet"
    pq.write_table(pa.Table.from_pylist(ultra), src)
    summary = binarize(src, tmp_path / "out.jsonl", Options(mode="pairs"))
    rows = read_jsonl(tmp_path / "out.jsonl")

    expected = []
    for n, r in enumerate(ultra, start=1):
        if r["chosen"] == r["rejected"]:
            continue
        for label, conv, score in ((True, r["chosen"], r["score_chosen"]), (False, r["rejected"], r["score_rejected"])):
            if conv[-1]["role"] == "assistant" and conv[-1]["content"].strip():
                expected.append((conv[:-1], conv[-1]["content"], label, score, f"ultrafeedback.parquet:{n}"))
    assert [(r["prompt"], r["completion"], r["label"], r["score"], r["source"]) for r in rows] == expected
    assert (summary.thumbs_up, summary.thumbs_down) == (3, 3)
    assert summary.dropped == {"chosen equals rejected": 2, "empty response": 1, "malformed messages": 1}
    assert summary.candidates == 2 * summary.rows_read == summary.rows_written + summary.dropped_total


def test_explicit_prompt_pairs(tmp_path):
    rows = [
        {"prompt": [msg("user", "Capital of France?")], "chosen": [msg("assistant", "Paris.")],
         "rejected": [msg("assistant", "Lyon.")]},
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "", "chosen": "a", "rejected": "b"},
    ]
    src = tmp_path / "pairs.json"
    src.write_text(json.dumps(rows), encoding="utf-8")
    summary = binarize(src, tmp_path / "out.jsonl", Options(mode="pairs"))
    out = [(r["prompt"], r["completion"], r["label"]) for r in read_jsonl(tmp_path / "out.jsonl")]
    assert out == [([msg("user", "Capital of France?")], "Paris.", True),
                   ([msg("user", "Capital of France?")], "Lyon.", False),
                   ("The sky is", " blue.", True), ("The sky is", " green.", False)]
    assert summary.dropped == {"empty prompt": 2}


# ---------------------------------------------------------------- files


def test_output_is_atomic_and_never_overwritten_by_accident(tmp_path):
    good = write_hs2_csv(tmp_path / "hs.csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b", "score": 4}) + "\n{not json\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n", encoding="utf-8")

    with pytest.raises(QbcoError, match="exists; pass --overwrite"):
        binarize(good, out)
    with pytest.raises(QbcoError, match=r"line 2: not valid JSON"):
        binarize(bad, out, overwrite=True)  # fails after a row went to the temporary file
    assert out.read_text(encoding="utf-8") == "precious\n"
    assert not summary_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "hs.csv", "out.jsonl"]  # no temp left

    binarize(good, out, overwrite=True)
    assert len(read_jsonl(out)) == 10 and summary_path(out).exists()
    with pytest.raises(QbcoError, match="replace the input"):
        binarize(good, good, overwrite=True)


def test_output_is_read_by_qbco_train_unchanged(tmp_path):
    from qbco.data.feedback import rows_to_examples
    from qbco.data.reader import read_rows

    out = tmp_path / "hs.jsonl"
    binarize(write_hs2_csv(tmp_path / "hs.csv"), out)
    examples = rows_to_examples(read_rows(out), str(out))
    assert [e.label for e in examples] == [r["label"] for r in read_jsonl(out)]
    assert sum(e.label for e in examples) == 3 and len(examples) == 10


def test_streaming_memory_stays_far_below_the_file_size(tmp_path):
    """A ~300 MB jsonl: the binarizer's peak RSS (VmHWM, python and imports included) stays far below it."""
    src = tmp_path / "big.jsonl"
    filler = "lorem ipsum dolor sit amet " * 110  # ~3 KB per row
    t0 = time.perf_counter()
    with open(src, "w", encoding="utf-8") as f:
        for i in range(100_000):
            f.write(f'{{"prompt": "question {i}", "response": "{filler}{i}", "helpfulness": {i % 5}}}\n')
    size = src.stat().st_size
    assert size > 280e6
    child = (
        "import json, sys\n"
        "from qbco.data.binarize import binarize\n"
        "s = binarize(sys.argv[1], sys.argv[2])\n"
        "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print(json.dumps({'written': s.rows_written, 'up': s.thumbs_up, 'peak_kb': hwm}))\n"
    )
    result = subprocess.run([sys.executable, "-c", child, str(src), str(tmp_path / "out.jsonl")],
                            capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    report = json.loads(result.stdout)
    peak = report["peak_kb"] * 1024
    print(f"\nfile {size / 2**20:.0f} MiB, peak RSS {peak / 2**20:.0f} MiB, {time.perf_counter() - t0:.1f} s")
    assert (report["written"], report["up"]) == (100_000, 20_000)
    assert peak < size / 3


# ---------------------------------------------------------------- CLI


def test_cli_binarize(tmp_path):
    from typer.testing import CliRunner

    from qbco.cli.main import app

    src = write_hs2_csv(tmp_path / "helpsteer2.csv")
    out = tmp_path / "hs.jsonl"
    runner = CliRunner()
    result = runner.invoke(app, ["binarize", str(src), "-o", str(out), "--scale", "0-4"])
    assert result.exit_code == 0, result.output
    assert "rows written" in result.output and "non-numeric score" in result.output
    summary = json.loads((tmp_path / "hs.summary.json").read_text())
    assert (summary["rows_read"], summary["rows_written"], summary["thumbs_up"]) == (15, 10, 3)
    first = out.read_bytes()

    again = runner.invoke(app, ["binarize", str(src), "-o", str(out), "--threshold", "3"])
    assert again.exit_code == 2
    assert "--overwrite" in again.output and "Traceback" not in again.output
    assert out.read_bytes() == first

    bad = runner.invoke(app, ["binarize", str(src), "-o", str(tmp_path / "x.jsonl"), "--scale", "1-4"])
    assert bad.exit_code == 2 and "helpsteer2.csv row 13: helpfulness = 0 is outside the scale 1-4" in bad.output
    assert not (tmp_path / "x.jsonl").exists()
    both = runner.invoke(app, ["binarize", str(src), "-o", str(tmp_path / "y.jsonl"), "--pairs", "--pairs-from-scores"])
    assert both.exit_code == 2 and "exclude each other" in both.output
