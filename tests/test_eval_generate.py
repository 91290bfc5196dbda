"""`qbco eval --generate` on the tiny trained run: the answers are `qbco generate --compare`'s, each answer's
reward is the run's (checked against a plain full-vocabulary forward of the 4-bit model with the adapter on
and off), task success follows the rows' checks, and the summary figures are those of the records."""

import json
import shutil

import pytest
import torch
from conftest import separable_rows
from typer.testing import CliRunner

from qbco.cli.main import app
from qbco.data.encoding import prompt_text
from qbco.eval import generate as gen
from qbco.eval.evaluate import answer_figures
from qbco.run.folder import load_run

CPU = torch.device("cpu")
runner = CliRunner()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_run):
    """A copy of the tiny run (the shared one stays as it is), evaluated with --generate on rows that carry a
    check ('good' is the right answer) or a reference, sliced by task."""
    folder = tmp_path_factory.mktemp("eval-generate")
    run = shutil.copytree(tiny_run, folder / "run")
    rows = []
    for r in separable_rows(6):
        task = "even" if int(r["prompt"].split()[1][1:]) % 2 == 0 else "odd"
        spec = {"check": {"kind": "mentions", "any": ["good"]}} if task == "even" else {"reference": "good"}
        rows.append({**r, "task": task, **spec})
    data = folder / "checked.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = runner.invoke(app, ["eval", str(run), "--data", str(data), "--slice-by", "task", "--generate",
                                 "--max-new-tokens", "6"])
    assert result.exit_code == 0, (result.output, result.exception)
    records = [json.loads(line) for line in (run / "eval-checked" / "generations.jsonl").read_text().splitlines()]
    report = json.loads((run / "eval-checked" / "metrics.json").read_text())
    return run, rows, records, report, result.output


def test_answers_are_generate_compares_and_success_follows_the_checks(evaluated):
    run, rows, records, report, output = evaluated
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    assert [r["prompt"] for r in records] == prompts
    answers, _ = gen.generate(run, prompts, gen.Sampling(max_new_tokens=6), compare=True, device=CPU)
    assert [(r["base"]["answer"], r["tuned"]["answer"]) for r in records] == [(a.base, a.tuned) for a in answers]
    for r in records:
        assert r["task"] in ("even", "odd") and r["check"] == {"kind": "mentions", "any": ["good"]}
        for who in ("base", "tuned"):
            assert r[who]["success"] == ("good" in r[who]["answer"].split())
    assert any(r["base"]["answer"] != r["tuned"]["answer"] for r in records)
    assert report["generation_kind"] == gen.CPU_FLOAT and "greedy" in report["sampling"]
    flat = " ".join(output.split())
    assert "task success: base" in flat and "task=odd" in flat and gen.CPU_FLOAT[:30] in flat
    assert f"wrote{run / 'eval-checked' / 'generations.jsonl'}" in "".join(output.split())  # rich may fold a long path


def test_each_answer_carries_its_reward_under_the_run(evaluated):
    """reward = beta * (log pi_theta - log pi_ref) of the answer (EOS appended), recomputed here with a full
    log_softmax of the 4-bit model as trained, adapter on and off; p_up = sigmoid(reward - delta)."""
    run, _, records, report, _ = evaluated
    config, tokenizer, model = load_run(run, CPU)
    delta = report["delta"]

    def logp(prompt, answer):
        text, templated = prompt_text(prompt, tokenizer)
        p = tokenizer(text, add_special_tokens=not templated)["input_ids"]
        c = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        return float(logps[torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)].sum())

    for r in records:
        for who in ("base", "tuned"):
            on = logp(r["prompt"], r[who]["answer"])
            with model.disable_adapter():
                off = logp(r["prompt"], r[who]["answer"])
            assert r[who]["reward"] == pytest.approx(config.beta * (on - off), abs=1e-4)
            assert r[who]["p_up"] == pytest.approx(1 / (1 + torch.exp(torch.tensor(delta - r[who]["reward"])).item()), abs=1e-6)
            assert r[who]["tokens"] == len(tokenizer(r[who]["answer"], add_special_tokens=False)["input_ids"])
    # the figures are those of the records
    assert report["generation"] == answer_figures(records, "task")


def test_answer_figures_by_hand():
    def rec(task, base, tuned, check=True):
        spec = {"kind": "mentions", "any": ["x"]} if check else None
        side = lambda text, reward, ok, n: {"answer": text, "tokens": n, "reward": reward, "p_up": 0.5,  # noqa: E731
                                            "success": ok if check else None}
        return {"prompt": "p", "task": task, "check": spec, "base": side(*base), "tuned": side(*tuned)}

    records = [
        rec("a", ("x y", 0.0, True, 2), ("x y", 0.0, True, 2)),  # unchanged
        rec("a", ("no", -1.0, False, 4), ("x", 1.0, True, 1)),  # fixed
        rec("b", ("x", 0.5, True, 3), ("nope", 0.25, False, 6)),  # broken
        rec("b", ("q", 0.0, None, 1), ("r", 2.0, None, 1), check=False),  # no check
    ]
    figures = answer_figures(records, "task")
    overall = figures["overall"]
    assert overall["prompts"] == 4 and overall["changed"] == 0.75 and overall["checked"] == 3
    assert overall["tokens"] == {"base": 10 / 4, "tuned": 10 / 4}
    assert overall["reward"] == {"base": -0.5 / 4, "tuned": 3.25 / 4}
    assert overall["tuned_reward_higher"] == 0.5  # the fixed one and the one without a check
    assert overall["success"] == {"base": 2 / 3, "tuned": 2 / 3} and overall["success_counts"] == {"base": 2, "tuned": 2}
    a, b = figures["slices"]["values"]["a"], figures["slices"]["values"]["b"]
    assert a["success"] == {"base": 0.5, "tuned": 1.0} and b["success"] == {"base": 1.0, "tuned": 0.0}
    assert b["checked"] == 1 and b["prompts"] == 2
    unchecked = answer_figures(records[3:])["overall"]
    assert unchecked["success"] is None and unchecked["checked"] == 0


def test_a_malformed_check_is_one_line_and_nothing_is_written(tmp_path, tiny_run):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    rows = [{**r, "check": {"kind": "number"}} for r in separable_rows(3)]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = runner.invoke(app, ["eval", str(run), "--data", str(data), "--generate"], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "a number check needs value" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not any(p.name.startswith("eval") for p in run.iterdir())
    result = runner.invoke(app, ["eval", str(run), "--generate", "--max-prompts", "0"])
    assert result.exit_code == 2 and "--max-prompts must be >= 1" in result.output
