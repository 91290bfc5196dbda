"""The command line: flags mirror the config, recipes load, user mistakes are one line and exit 2, and one
end-to-end run on the real SmolLM2-135M model whose adapter reloads and reproduces its held-out figures."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from qbco.cli.main import app
from qbco.run.config import TrainConfig, auto_epochs, auto_lr, build_config, choose_recipe, field_names

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
FLAG_OF = {"load_in_4bit": "--4bit", "gradient_checkpointing": "--gradient-checkpointing"}


def test_train_help_documents_every_config_field():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.output)
    for name in field_names():
        flag = FLAG_OF.get(name, "--" + name.replace("_", "-"))
        assert flag in text, flag
    assert "--no-4bit" in text and "--quiet" in text


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_are_valid(recipe):
    config = build_config(recipe)
    assert isinstance(config, TrainConfig)


def test_defaults_follow_the_loss_the_file_and_the_model():
    """A plain run's settings (docs/results.md measured them): BCO with the thumbs-up NLL term at weight 3, the
    other losses without it; passes enough to see about 900 rows (at least 1, at most 10); lr 1e-3 at 135M
    parameters, times sqrt(135M / N) above. The numbers below are worked by hand from those rules."""
    assert TrainConfig().sft_weight == 3.0 and build_config().sft_weight == 3.0
    assert [build_config(loss=loss).sft_weight for loss in ("bce", "kto", "dpo")] == [0.0, 0.0, 0.0]
    assert build_config(loss="kto", sft_weight=1.0).sft_weight == 1.0  # a flag wins
    assert (TrainConfig().lr, TrainConfig().epochs) == (None, None)  # filled in by the run: TrainConfig.sized
    assert [auto_epochs(n) for n in (586, 100, 99, 90, 50, 900, 5000)] == [1.54, 9.0, 9.09, 10.0, 10.0, 1.0, 1.0]
    assert [auto_lr(n) for n in (134_515_008, 135e6, 540e6, 3.09e9, 7.6e9)] == [1e-3, 1e-3, 5e-4, 2.1e-4, 1.3e-4]
    sized = TrainConfig(data="f.jsonl").sized(rows=100, parameters=540e6)
    assert (sized.epochs, sized.lr) == (9.0, 5e-4)
    given = TrainConfig(lr=2e-4, epochs=1.0).sized(rows=100, parameters=540e6)
    assert (given.epochs, given.lr) == (1.0, 2e-4)  # what was given stays


def test_a_recipe_applies_to_the_loss_it_was_measured_for(captured):
    """The paper's recipe (BCO) is not applied to `--loss kto` on its pair: kto gets its own defaults, and the first
    line says so, under --quiet too (on stderr)."""
    result = runner.invoke(app, ["train", "--model", "qwen2.5-3b", "--data", "helpsteer2", "--loss", "kto"],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    first = " ".join(result.output.split())
    assert first.startswith("recipe qwen2.5-3b-helpsteer2 (shipped for --model qwen2.5-3b --data helpsteer2) was "
                            "measured for --loss bco, not applied: --loss kto runs its own defaults (sft_weight 0")
    assert (captured[-1].loss, captured[-1].sft_weight, captured[-1].max_prompt_length, captured[-1].lr) == ("kto", 0.0, 256, None)
    quiet = runner.invoke(app, ["train", "--model", "qwen2.5-3b", "--data", "helpsteer2", "--loss", "kto", "--quiet"])
    assert quiet.exit_code == 0 and "was measured for --loss bco, not applied" in " ".join(quiet.output.split())
    runner.invoke(app, ["train", "--model", "qwen2.5-3b", "--data", "helpsteer2", "--loss", "bco", "--quiet"])
    assert captured[-1].max_prompt_length == 1536  # the loss it was measured for: applied


def test_the_papers_loss_is_one_recipe_away():
    paper = build_config(choose_recipe("paper", None, None)[0])
    assert (paper.loss, paper.sft_weight, paper.lr, paper.epochs) == ("bco", 0.0, 3e-4, 1.0)


def test_flags_override_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("beta: 0.3\nlr: 2e-4\nlora_r: 8\n")
    config = build_config(recipe, beta=0.5)
    assert (config.beta, config.lr, config.lora_r) == (0.5, 2e-4, 8)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--beta", "0"], "beta must be > 0"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--lora-r", "0"], "lora_r must be >= 1"),
        (["--eval-fraction", "1"], "eval_fraction must be in [0, 1)"),
        (["--max-prompt-length", "0"], "max_prompt_length must be >= 1"),
        (["--loss", "ppo"], "loss must be one of"),
        (["--model", "qwen2.5-3"], "did you mean qwen2.5-3b"),
        (["--data", "nosuch"], "neither a file nor a registered dataset"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, args, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", "--output", str(out), "--quiet", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_recipe_with_an_unknown_key_suggests_the_nearest(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("beta: 0.1\nlearning_rte: 1e-4\n")
    result = runner.invoke(app, ["train", "--recipe", str(recipe), "--quiet"])
    assert result.exit_code == 2
    assert "unknown key 'learning_rte'" in result.output


def straightforward_logps(model, prompt_ids, completion_ids):
    """Independent of qbco.model.logprobs: one unpadded row, full logits, log_softmax, gather."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return float(torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt_ids) :, None]).sum())


@pytest.mark.slow
def test_end_to_end_on_smollm2(tmp_path):
    """qbco train on the real model, a few steps; then the saved adapter, reloaded with peft on a fresh 4-bit
    base, gives back the logged held-out accuracy and loss."""
    from qbco.data.encoding import encode
    from qbco.data.feedback import load_feedback
    from qbco.run.folder import load_run

    demo = [json.loads(line) for line in (ROOT / "qbco/data/demo.jsonl").read_text().splitlines()]
    rows = [r for r in demo if r["split"] == "train"][:24] + [r for r in demo if r["split"] == "eval"][:10]
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "completion", "label", "task", "split")}) + "\n" for r in rows))
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(data), "--output", str(out), "--max-steps", "3",
                                 "--batch-size", "4", "--eval-fraction", "0.3", "--quiet"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps, (logged,) = lines[:-1], lines[-1:]
    assert [m["step"] for m in steps] == [1, 2, 3] and logged["split"] == "eval"
    assert all(m["tokens"] > 0 and m["loss"] > 0 for m in steps)

    config, tokenizer, model = load_run(out)
    shift = json.loads((out / "adapter/reward_shift.json").read_text())
    delta = (shift["mu_up"] + shift["mu_down"]) / 2
    assert delta == pytest.approx(logged["delta"], abs=1e-9)
    _, eval_rows = load_feedback(config.data, config.eval_fraction, config.seed)
    assert len(eval_rows) == logged["eval_rows"]
    rewards, labels = [], []
    with torch.no_grad():
        for example in eval_rows:
            e = encode(example, tokenizer, config.max_prompt_length, config.max_completion_length)
            policy = straightforward_logps(model, e.prompt_ids, e.completion_ids)
            with model.disable_adapter():
                ref = straightforward_logps(model, e.prompt_ids, e.completion_ids)
            rewards.append(config.beta * (policy - ref))
            labels.append(example.label)
    r, y = torch.tensor(rewards) - delta, torch.tensor(labels)
    assert any(abs(x) > 1e-4 for x in rewards)  # the adapter was trained and reloaded, not fresh
    accuracy = float(((r > 0) == y).float().mean())
    loss = float(-F.logsigmoid(r[y]).mean() - F.logsigmoid(-r[~y]).mean())
    assert accuracy == pytest.approx(logged["eval_reward_accuracy"], abs=1e-6)
    assert loss == pytest.approx(logged["eval_loss"], rel=1e-3, abs=1e-4)


# ------------------------------------------------------------------ recipes that match (model, data)


@pytest.fixture
def captured(monkeypatch, tmp_path):
    """`qbco train` up to the training call: the config it would train with, nothing loaded."""
    import qbco.train.loop
    from qbco.train.loop import RunResult

    seen = []

    def fake_train(config, progress=None, log=print, resume=None, overwrite=False):
        seen.append(config)
        return RunResult(output=tmp_path / "run", steps=0, elapsed_s=0.0, tokens_per_s=0.0, final_loss=None, peak_memory_mb=0.0)

    monkeypatch.setattr(qbco.train.loop, "train", fake_train)  # where the command looks it up
    return seen


def test_the_paper_pair_runs_the_papers_settings(captured):
    """`qbco train --model qwen2.5-3b --data helpsteer2` trains with the shipped recipe for that pair (prompt
    1,536, completion 512, its lr and warm-up), names it first, and a flag still wins over it."""

    paper = yaml.safe_load((ROOT / "recipes" / "qwen2.5-3b-helpsteer2.yaml").read_text())
    assert (paper["max_prompt_length"], paper["max_completion_length"]) == (1536, 512)
    result = runner.invoke(app, ["train", "--model", "qwen2.5-3b", "--data", "helpsteer2"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    config = captured[-1]
    for key, value in paper.items():
        assert getattr(config, key) == value, key
    assert (config.max_prompt_length, config.max_completion_length, config.lr, config.warmup_ratio) == (1536, 512, 1e-4, 0.1)
    first = result.output.strip().splitlines()[0]
    assert first.startswith("recipe qwen2.5-3b-helpsteer2 (shipped for --model qwen2.5-3b --data helpsteer2 --loss bco)")
    assert "max_prompt_length 1536" in first and "--recipe none turns it off" in first

    # The hub id is the same model; a flag overrides the recipe; --recipe none is TrainConfig's defaults.
    runner.invoke(app, ["train", "--model", "Qwen/Qwen2.5-3B-Instruct", "--data", "helpsteer2", "--max-prompt-length", "1024"])
    assert (captured[-1].max_prompt_length, captured[-1].max_completion_length, captured[-1].lr) == (1024, 512, 1e-4)
    result = runner.invoke(app, ["train", "--model", "qwen2.5-3b", "--data", "helpsteer2", "--recipe", "none"])
    assert result.exit_code == 0 and "recipe" not in result.output.splitlines()[0]
    assert (captured[-1].max_prompt_length, captured[-1].max_completion_length, captured[-1].lr) == (256, 128, None)
    # Another pair has no recipe: the defaults; a shipped recipe can be named.
    runner.invoke(app, ["train", "--model", "qwen2.5-3b", "--data", "ultrafeedback", "--quiet"])
    assert captured[-1].max_prompt_length == TrainConfig().max_prompt_length
    runner.invoke(app, ["train", "--recipe", "qwen2.5-3b-helpsteer2", "--quiet"])
    assert (captured[-1].model, captured[-1].max_prompt_length) == ("qwen2.5-3b", 1536)


def test_an_error_with_brackets_is_printed_as_written(tmp_path):
    """Rich markup ate '[eval]' from "pip install 'qbco[eval]'"; a message is text, never markup."""
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "feedback[eval].jsonl"), "--quiet"])
    assert result.exit_code == 2
    assert f"data file not found: {tmp_path / 'feedback[eval].jsonl'}" in " ".join(result.output.split())


def test_a_missing_recipe_names_the_shipped_ones(tmp_path):
    result = runner.invoke(app, ["train", "--recipe", str(tmp_path / "paper.yaml"), "--quiet"])
    assert result.exit_code == 2
    assert (f"recipe not found: {tmp_path / 'paper.yaml'} (shipped recipes: paper, qwen2.5-3b-helpsteer2; "
            "or --recipe none)") in " ".join(result.output.split())


# ------------------------------------------------------------------ the flags: declared once, defaults as run


def help_text(*args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return re.sub(r"[\s│]+", " ", re.sub(r"\x1b\[[0-9;]*m", "", result.output))


def test_train_help_states_what_a_plain_run_uses():
    """Each flag's default is what a plain `qbco train` runs (`qbco train --help` once said lr 3e-4 while a plain
    run used 1e-3): the defaults that follow the loss, the file and the model say their rule."""
    text = help_text("train")
    assert re.search(r"--sft-weight .*?\(default: 3 with bco, measured \(docs/results.md\); 0 with bce, kto, dpo\)", text)
    assert re.search(r"--lr .*?\(default: auto: 1e-3 for a model of 135M parameters or fewer", text)
    assert re.search(r"--epochs .*?\(default: auto: 900 rows' worth, at least 1 pass, at most 10", text)
    assert re.search(r"--seed .*?\(default: 0\)", text)
    assert choose_recipe(None, None, None) == (None, None)  # the demo has no recipe of its own: the defaults


def test_every_train_flag_comes_from_one_config_field():
    """The train command's options are TrainConfig's fields and four of its own, each once."""
    import typer.main

    command = typer.main.get_command(app).commands["train"]
    names = [p.name for p in command.params]
    assert sorted(names) == sorted([*field_names(), "recipe", "resume", "overwrite", "quiet"])


@pytest.mark.parametrize("args", [[], ["train"], ["binarize"], ["datasets"], ["eval"], ["score"], ["plot"], ["merge"],
                                  ["generate"]])
def test_help_imports_no_torch(args):
    """`qbco --help` and every `qbco CMD --help` answer without importing torch (or transformers, peft,
    bitsandbytes): seconds before any output otherwise."""
    code = ("import sys\nfrom qbco.cli.main import app\ntry:\n    app([*sys.argv[1:], '--help'])\nexcept SystemExit:\n    pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "120"})
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout and out.stdout.strip().endswith("heavy: []"), out.stdout[-500:]
