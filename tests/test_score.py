"""`qbco score`, the Scorer API and `qbco generate --best-of` on a tiny 4-bit llama trained a few steps:
scores equal qbco eval's rewards and an independent full-logits computation; p_up is the stored Platt scale;
best-of-n picks the arg-max; mistakes are one-line errors that write nothing."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import separable_rows
from typer.testing import CliRunner

from qbco.cli.main import app
from qbco.common.errors import QbcoError
from qbco.data.feedback import load_feedback
from qbco.eval import generate as gen
from qbco.eval.score import Scorer
from qbco.export.merge import merge
from qbco.run.folder import load_run

CPU = torch.device("cpu")
runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    """Rows not seen in training: other question numbers, with a task column carried through to the output."""
    rows = [{**r, "prompt": r["prompt"].replace("q", "q1"), "task": "t"} for r in separable_rows(12, seed=5)]
    return write_jsonl(tmp_path_factory.mktemp("score-data") / "rows.jsonl", rows)


def full_logits_logp(model, ids, prompt_length: int) -> float:
    """Sum of log softmax(logits)[next token] over the completion positions."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, prompt_length - 1 : -1].float()
    targets = ids[0, prompt_length:]
    return float(logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).sum())


def full_logits_rewards(run, rows):
    """r = beta * (log pi_theta - log pi_ref) from the model's own forward: full [T, vocab] logits, log_softmax,
    the completion tokens' entries summed; prompts through the chat template, completions ended by EOS. No qbco
    log-prob code."""
    config, tokenizer, model = load_run(run, CPU)
    out = []
    for row in rows:
        text = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + completion])
        policy = full_logits_logp(model, ids, len(prompt))
        with model.disable_adapter():
            reference = full_logits_logp(model, ids, len(prompt))
        out.append((policy, reference, config.beta * (policy - reference)))
    return out


def test_score_equals_eval_and_an_independent_computation(tiny_run, rows_file, tmp_path):
    """Per row: qbco score's log-probs and reward are qbco eval's for the same rows, and those of full logits;
    r - delta uses the saved reward shift; p_up is sigmoid(a (r - delta) + b) with calibration.json's a, b."""
    out = tmp_path / "scored.jsonl"
    result = invoke("score", tiny_run, "--data", rows_file, "-o", out)
    scored = read_jsonl(out)
    rows = read_jsonl(rows_file)
    assert len(scored) == len(rows) and [s["source"] for s in scored] == [f"{rows_file}:{i}" for i in range(1, len(rows) + 1)]
    assert all(s["task"] == "t" and s["label"] == r["label"] for s, r in zip(scored, rows))

    invoke("eval", tiny_run, "--data", rows_file)
    eval_dir = tiny_run / f"eval-{rows_file.stem}"  # eval --data FILE writes RUN/eval-NAME/
    evaluated = {s["source"]: s for s in read_jsonl(eval_dir / "scores.jsonl")}
    shift = json.loads((tiny_run / "adapter" / "reward_shift.json").read_text())
    delta = (shift["mu_up"] + shift["mu_down"]) / 2
    cal = json.loads((tiny_run / "calibration.json").read_text())
    assert cal["method"] == "platt" and cal["fit_on"].startswith("held-out part of")
    for s, (policy, reference, reward) in zip(scored, full_logits_rewards(tiny_run, rows)):
        e = evaluated[s["source"]]
        assert s["reward"] == pytest.approx(e["reward"], abs=1e-6) and s["p_up"] == pytest.approx(e["p_up"], abs=1e-6)
        assert s["policy_logp"] == pytest.approx(policy, abs=2e-4) and s["reference_logp"] == pytest.approx(reference, abs=2e-4)
        assert s["reward"] == pytest.approx(reward, abs=2e-5)
        assert s["reward_minus_delta"] == pytest.approx(s["reward"] - delta, abs=1e-6)
        assert s["completion_tokens"] >= 1 and s["reward_per_token"] == pytest.approx(s["reward"] / s["completion_tokens"], rel=1e-6)
        assert s["p_up_uncalibrated"] == pytest.approx(sigmoid(s["reward"] - delta), rel=1e-5)
        assert s["p_up"] == pytest.approx(sigmoid(cal["a"] * (s["reward"] - delta) + cal["b"]), rel=1e-5)
    assert any(s["reward"] != 0 for s in scored)  # the adapter moved the policy: a test of something

    # With labels, the summary of qbco eval on these rows; the figures match eval's.
    summary = json.loads((tmp_path / "scored.summary.json").read_text())
    full = json.loads((eval_dir / "metrics.json").read_text())
    assert full["calibration"]["fit_on_these_rows"] is False and full["calibration"]["a"] == cal["a"]  # applied, not refit
    report = full["overall"]["binary"]
    figures = summary["figures"]["all"]
    for key in ("roc_auc", "ece", "log_loss"):
        assert figures[key] == pytest.approx(report[key], abs=1e-6)
    assert figures["at_0.5"]["f1"] == report["at_0.5"]["f1"]
    assert figures["calibrated"]["ece"] == pytest.approx(report["calibrated"]["ece"], abs=1e-6)
    assert "held_out" not in summary["figures"]  # not the run's data: no held-out rows among them
    flat = " ".join(result.output.split())
    assert "ROC-AUC" in flat and "ECE, calibrated p_up" in flat and "Platt" in flat


def test_the_scorer_api_gives_the_same_numbers(tiny_run, rows_file, tmp_path):
    rows = read_jsonl(rows_file)
    out = tmp_path / "scored.jsonl"
    invoke("score", tiny_run, "--data", rows_file, "-o", out)
    scored = read_jsonl(out)
    scorer = Scorer.load(tiny_run, CPU, batch_size=3)  # another batching: the same sums
    p_up = scorer.p_up([r["prompt"] for r in rows], [r["completion"] for r in rows])
    rewards = scorer.rewards([r["prompt"] for r in rows], [r["completion"] for r in rows])
    assert p_up.tolist() == pytest.approx([s["p_up"] for s in scored], abs=1e-6)
    assert rewards.tolist() == pytest.approx([s["reward"] for s in scored], abs=1e-6)
    # One prompt, text or chat messages, is paired with every completion.
    one = scorer.rewards(rows[0]["prompt"], [rows[0]["completion"], rows[1]["completion"]])
    chat = scorer.rewards([{"role": "user", "content": rows[0]["prompt"]}], [rows[0]["completion"], rows[1]["completion"]])
    assert one.tolist() == pytest.approx([s["reward"] for s in scored[:2]], abs=1e-6) and one.tolist() == chat.tolist()
    with pytest.raises(QbcoError, match="2 prompts for 3 completions"):
        scorer.p_up(["a", "b"], ["x", "y", "z"])


def test_score_marks_the_runs_held_out_rows_and_reads_unlabelled_rows(tiny_run, tmp_path):
    """On the run's own data, each line says whether the run held the row out, and the summary has a column
    for those rows; unlabelled rows get a p_up and no summary."""
    from qbco.run.config import load_run_config

    config = load_run_config(tiny_run / "config.yaml")
    out = tmp_path / "own.jsonl"
    result = invoke("score", tiny_run, "--data", config.data, "-o", out)
    _, held = load_feedback(config.data, config.eval_fraction, config.seed)
    scored = read_jsonl(out)
    assert {s["source"] for s in scored if s["held_out"]} == {e.source for e in held}
    summary = json.loads((tmp_path / "own.summary.json").read_text())
    assert summary["figures"]["held_out"]["rows"] == len(held) and "held-out rows of the run" in result.output
    # The held-out figures are those of the rows the calibration was fit on (its ece_before).
    cal = json.loads((tiny_run / "calibration.json").read_text())
    assert summary["figures"]["held_out"]["ece"] == pytest.approx(cal["ece_before"], abs=1e-6)

    unlabelled = write_jsonl(tmp_path / "new.csv.jsonl", [{"prompt": "question q5 ?", "completion": "good answer a1 ."},
                                                           {"prompt": "question q5 ?", "completion": "bad answer a2 .", "label": None}])
    invoke("score", tiny_run, "--data", unlabelled, "-o", tmp_path / "new.jsonl")
    lines = read_jsonl(tmp_path / "new.jsonl")
    assert [s["label"] for s in lines] == [None, None] and all(0 < s["p_up"] < 1 for s in lines)
    assert not (tmp_path / "new.summary.json").exists()


def test_score_mistakes_are_one_line_errors_that_write_nothing(tiny_run, tiny_model_dir, rows_file, tmp_path):
    no_completion = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "question q1 ?", "completion": "good answer a1 ."},
                                                         {"prompt": "question q2 ?", "label": True}])
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "question q1 ?", "completion": " "}])
    no_adapter = tmp_path / "no-adapter"
    no_adapter.mkdir()
    shutil.copy(tiny_run / "config.yaml", no_adapter / "config.yaml")
    existing = tmp_path / "existing.jsonl"
    existing.write_text("keep me\n")
    out = tmp_path / "out.jsonl"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for args, needle in (
        ([tiny_run, "--data", no_completion, "-o", out], "row 2: missing column(s) completion"),
        ([tiny_run, "--data", empty, "-o", out], "row 1, column completion: empty"),
        ([no_adapter, "--data", rows_file, "-o", out], "not a finished qbco run"),
        ([tmp_path / "nowhere", "--data", rows_file, "-o", out], "not a finished qbco run"),
        ([tiny_model_dir, "--data", rows_file, "-o", out], "without qbco_merge.json, so its reference (the base) is unknown"),
        ([tiny_run, "--data", "nope", "-o", out], "neither a file nor a registered dataset"),
        ([tiny_run, "--data", rows_file, "-o", existing], "exists; pass --overwrite"),
        ([tiny_run, "--data", rows_file, "-o", rows_file, "--overwrite"], "would replace the input"),
        ([tiny_run, "--data", rows_file, "-o", out, "--batch-size", "0"], "--batch-size must be >= 1"),
    ):
        result = runner.invoke(app, ["score", *map(str, args)], env={"COLUMNS": "400"})
        assert result.exit_code == 2 and needle in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert existing.read_text() == "keep me\n"


def test_a_merged_folder_scores_against_its_base(tiny_run, rows_file, tmp_path):
    """A folder written by qbco merge (fp32, into the dequantized base): its reference is that base, and its
    rewards are the run's (the same model up to rounding)."""
    merged = merge(tiny_run, tmp_path / "merged", dtype="fp32", device=CPU, log=lambda m: None).output
    invoke("score", tiny_run, "--data", rows_file, "-o", tmp_path / "run.jsonl")
    result = invoke("score", merged, "--data", rows_file, "-o", tmp_path / "merged.jsonl")
    assert "merged folder" in result.output
    run_rows, merged_rows = read_jsonl(tmp_path / "run.jsonl"), read_jsonl(tmp_path / "merged.jsonl")
    for a, b in zip(run_rows, merged_rows):
        assert b["reward"] == pytest.approx(a["reward"], abs=1e-4) and b["p_up"] == pytest.approx(a["p_up"], abs=1e-4)
        assert b["reference_logp"] == pytest.approx(a["reference_logp"], abs=1e-3)

    # A merged folder whose config names a softcap its forward does not apply (llama ignores the key): every
    # reward would be wrong, so loading refuses it, as load_base refuses a base (docs/pitfalls.md, 15).
    config = json.loads((merged / "config.json").read_text())
    (merged / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 0.5}))
    result = runner.invoke(app, ["score", str(merged), "--data", str(rows_file), "-o", str(tmp_path / "capped.jsonl")])
    assert result.exit_code == 2 and "own forward" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "capped.jsonl").exists()


def test_pick_best_by_sum_or_per_token():
    """r sums over tokens, so a long answer can out-rank a short better one; per token (r / tokens) it does not."""
    rewards, tokens = [4.0, 1.5, -1.0], [40, 5, 1]
    assert gen.pick_best(rewards) == 0 and gen.pick_best(rewards, tokens, "sum") == 0  # 4.0 > 1.5
    assert gen.pick_best(rewards, tokens, "per-token") == 1  # 0.1, 0.3, -1.0
    assert gen.pick_best([0.0, 0.0], [0, 3], "per-token") == 0  # a tie: the first; an empty answer counts one token
    with pytest.raises(QbcoError, match="--rank-by must be one of per-token, sum"):
        gen.pick_best([1.0], [1], "mean")


def test_best_of_returns_the_arg_max_of_its_candidates_scores(tiny_run, tmp_path):
    prompts = ["question q3 ?", [{"role": "user", "content": "question q8 ?"}]]
    sampling = gen.Sampling(max_new_tokens=6, temperature=1.5, seed=2)
    scorer = Scorer.load(tiny_run, CPU)
    results, kind = gen.best_of(tiny_run, prompts, 5, sampling, scorer=scorer, rank_by="sum")
    assert "reward" in kind and [r.prompt for r in results] == prompts
    for r in results:
        assert len(r.answers) == 5 and len(set(r.answers)) > 1  # sampled, not one answer five times
        again = scorer.rewards(r.prompt, r.answers)  # scored afresh, one candidate at a time
        for answer, reward in zip(r.answers, r.rewards):
            assert scorer.rewards(r.prompt, [answer])[0] == pytest.approx(reward, abs=1e-6)
        assert r.best == int(again.argmax()) and r.rewards[r.best] == max(r.rewards)
    assert gen.pick_best([0.1, 0.7, -2.0, 0.7]) == 1 and gen.pick_best([-3.0]) == 0
    per_token, _ = gen.best_of(tiny_run, prompts, 5, sampling, scorer=scorer, rank_by="per-token")
    for r in per_token:  # the same samples (same seed), ranked by r / tokens
        assert r.best == max(range(5), key=lambda k: (r.rewards[k] / r.tokens[k], -k))

    out = tmp_path / "cands" / "best.jsonl"
    result = invoke("generate", tiny_run, "--prompt", "question q3 ?", "--best-of", "5", "--temperature", "1.5",
                    "--seed", "2", "--max-new-tokens", "6", "-o", out)
    lines = read_jsonl(out)
    assert [line["answer"] for line in lines] == results[0].answers and [line["best"] for line in lines].count(True) == 1
    best = next(line for line in lines if line["best"])
    assert best["reward"] == max(line["reward"] for line in lines) and best["answer"].split()[0] in result.output
    for args, needle in (
        (["--best-of", "4"], "--temperature above 0"),
        (["--best-of", "1", "--temperature", "1"], "at least 2"),
        (["--best-of", "4", "--temperature", "1", "--compare"], "exclude each other"),
        (["-o", tmp_path / "x.jsonl"], "give --best-of"),
        (["--best-of", "4", "--temperature", "1", "-o", out], "exists"),
    ):
        result = runner.invoke(app, ["generate", str(tiny_run), "--prompt", "question q3 ?", *map(str, args)])
        assert result.exit_code == 2 and needle in " ".join(result.output.split()), result.output


def test_best_of_samples_stop_at_every_eos_id_of_the_generation_config(tiny_model_dir):
    """As `qbco generate`'s answers do (Qwen 2.5 lists two EOS ids): each of the N samples ends at the first
    stop id of the generation config or the tokenizer, and the padding after it is not part of the answer."""
    from qbco.model.loading import load_base, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_base(str(tiny_model_dir), False, torch.float32, CPU).eval()
    sampling = gen.Sampling(max_new_tokens=12, temperature=1.0, seed=5)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "question q3 ?"}], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    model.generation_config.eos_token_id = eos
    torch.manual_seed(sampling.seed)  # as sample_answers does: the same draws
    free = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                          num_return_sequences=3, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)[:, len(prompt_ids):].tolist()
    first = free[0]
    k = next(i for i in range(2, len(first)) if first[i] not in first[:i] and first[i] != eos)  # a second stop id
    assert eos not in first[:k]
    model.generation_config.eos_token_id = [eos, first[k]]

    answers = gen.sample_answers(model, tokenizer, "question q3 ?", 3, sampling, CPU)

    def cut(row):
        end = next((i for i, t in enumerate(row) if t in (eos, first[k])), len(row))
        return tokenizer.decode(row[:end], skip_special_tokens=True).strip()

    assert answers == [cut(row) for row in free]
    assert len(answers[0].split()) == k < len(first)  # shorter than the sample that ignored the second id


def test_a_run_without_held_out_rows_is_calibrated_by_identity_and_says_so(tmp_path, tiny_model_dir, separable_file):
    from qbco.run.config import build_config
    from qbco.train.loop import train

    config = build_config(model=str(tiny_model_dir), data=str(separable_file), output=str(tmp_path / "run"), eval_fraction=0.0,
                          lr=1e-2, beta=0.5, max_steps=2, batch_size=8, max_prompt_length=32, max_completion_length=16)
    result = train(config, log=lambda message: None)
    assert result.calibration.method == "identity" and "held out no rows" in result.calibration.describe()
    stored = json.loads((result.output / "calibration.json").read_text())
    assert stored["method"] == "identity" and stored["a"] == 1.0 and stored["b"] == 0.0
    out = tmp_path / "s.jsonl"
    scored = runner.invoke(app, ["score", str(result.output), "--data", str(separable_file), "-o", str(out)])
    assert scored.exit_code == 0 and "identity" in scored.output and "held out no rows" in " ".join(scored.output.split())
    assert all(s["p_up"] == s["p_up_uncalibrated"] for s in read_jsonl(out))


def test_importing_qbco_stays_cheap():
    """Scorer is exported lazily: `import qbco` loads neither torch nor transformers."""
    code = "import sys, qbco; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; print(qbco.Scorer.__name__)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "Scorer"
