"""--gradient-checkpointing auto|on|off and --memory-budget: old recipes keep working, checkpointing fewer
layers trains exactly the same, the run reports what it chose, and running out of memory names the flag."""

import json
import math

import pytest
import torch
from conftest import make_tiny_llama, separable_rows
from typer.testing import CliRunner

from qbco.cli.main import app
from qbco.common.errors import QbcoError
from qbco.model.memory import GiB
from qbco.model.recompute import recomputed_layers
from qbco.run.config import build_config
from qbco.train.loop import train

runner = CliRunner()


@pytest.mark.parametrize("written, meant", [("true", "on"), ("false", "off"), ("on", "on"), ("off", "off"),
                                            ("auto", "auto"), ("'on'", "on")])
def test_recipes_from_before_auto_keep_working(tmp_path, written, meant):
    """A recipe or a finished run's config.yaml says true / false (YAML also reads on / off as booleans)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"gradient_checkpointing: {written}\n")
    assert build_config(recipe).gradient_checkpointing == meant


@pytest.mark.parametrize("values, message", [
    ({"gradient_checkpointing": "sometimes"}, "gradient_checkpointing must be one of auto, on, off"),
    ({"memory_budget": 0}, "memory_budget must be > 0 GiB"),
    ({"memory_budget": "lots"}, "memory_budget must be of type float"),
])
def test_bad_values_are_one_line(values, message):
    with pytest.raises(QbcoError, match=message):
        build_config(**values)


@pytest.fixture(scope="module")
def four_layer_model(tmp_path_factory):
    from conftest import make_tokenizer, words_of

    folder = tmp_path_factory.mktemp("four-layers")
    rows = separable_rows(60)
    tok = make_tokenizer(words_of(rows) + [f"q{k}" for k in range(200)] + [f"a{k}" for k in range(8)])
    make_tiny_llama(len(tok), layers=4).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run(tmp_path, model, name, **flags):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in separable_rows(20)), encoding="utf-8")
    config = build_config(model=str(model), data=str(data), output=str(tmp_path / name), eval_fraction=0.0,
                          batch_size=8, max_steps=4, warmup_ratio=0.0, lr=1e-2, beta=0.5, max_prompt_length=32,
                          max_completion_length=16, load_in_4bit=False, seed=1, sft_weight=0.0, **flags)
    result = train(config, log=lambda message: None)
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in records if m.get("split") != "eval"]
    return result, [m["loss"] for m in steps], [m["grad_norm"] for m in steps]


def test_checkpointing_fewer_layers_gives_the_same_losses(tmp_path, four_layer_model, monkeypatch):
    """Every layer, two of four (a budget that fits two checkpointed layers and not one), and none: the same
    per-step losses (rel. 1e-5) and gradient norms; the layers that recompute are the ones planned."""
    import qbco.model.lora as qlora
    import qbco.model.recompute as qrecompute

    seen = []
    original = qrecompute.enable_recompute
    spy = lambda m, n: (original(m, n), seen.append(recomputed_layers(m)))  # noqa: E731
    monkeypatch.setattr(qlora, "enable_recompute", spy)  # at loading (attach_lora)
    monkeypatch.setattr(qrecompute, "enable_recompute", spy)  # the run's plan (apply_recompute)
    on, on_losses, on_norms = run(tmp_path, four_layer_model, "on", gradient_checkpointing="on")
    est = on.recompute.estimate
    two = est.total(2) / GiB
    part, part_losses, part_norms = run(tmp_path, four_layer_model, "part", memory_budget=two)
    off, off_losses, off_norms = run(tmp_path, four_layer_model, "off", gradient_checkpointing="off")

    assert (on.recompute.every_n, off.recompute.every_n) == (1, None)
    assert part.recompute.every_n == 3 and part.recompute.budget == pytest.approx(est.total(2))  # k=3: layers 0 and 3
    assert seen[1::2] == [[0, 1, 2, 3], [0, 3], []]  # each run: at loading, then its plan
    assert part_losses == pytest.approx(on_losses, rel=1e-5) and off_losses == pytest.approx(on_losses, rel=1e-5)
    assert part_norms == pytest.approx(on_norms, rel=1e-4) and off_norms == pytest.approx(on_norms, rel=1e-4)
    assert on_losses[0] == pytest.approx(2 * math.log(2), rel=1e-6) and abs(on_losses[-1] - on_losses[0]) > 0.05


def test_the_summary_shows_the_choice_budget_and_estimate(tmp_path, four_layer_model):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in separable_rows(20)), encoding="utf-8")
    result = runner.invoke(app, ["train", "--model", str(four_layer_model), "--data", str(data), "--output",
                                 str(tmp_path / "run"), "--max-steps", "1", "--no-4bit", "--memory-budget", "50"],
                           env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "no layer checkpointed, estimate" in result.output and "for a budget of 50.00 GiB" in result.output
    assert "memory estimate" in result.output and "(--gradient-checkpointing auto)" in result.output


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")])
def test_out_of_memory_in_a_step_names_the_flag(tmp_path, four_layer_model, monkeypatch, error):
    """A step that runs out of memory: one line that says which flag to change, no traceback, exit code 4."""
    import qbco.train.loop as qtrain

    def fail(*args, **kwargs):
        if torch.is_grad_enabled():
            raise error
        return original(*args, **kwargs)

    original = qtrain.completion_logps  # the training step's; the reference pass runs without grad
    monkeypatch.setattr(qtrain, "completion_logps", fail)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in separable_rows(20)), encoding="utf-8")
    result = runner.invoke(app, ["train", "--model", str(four_layer_model), "--data", str(data), "--output",
                                 str(tmp_path / "run"), "--max-steps", "2", "--no-4bit", "--memory-budget", "50", "--quiet"])
    assert result.exit_code == 4, result.output
    assert "Traceback" not in result.output and "out of memory in step 1" in result.output
    assert "lower --memory-budget below 50.0" in result.output and "--gradient-checkpointing on" in result.output


def test_the_out_of_memory_advice_can_be_followed_on_resume(tmp_path, four_layer_model, monkeypatch):
    """Out of memory in step 3 (exit 4), then `qbco train --resume RUN --memory-budget X --gradient-checkpointing
    on`, as the message advises: the run continues from its step-2 checkpoint to the losses a straight run gives
    (checkpointing other layers changes memory, not the losses), and config.yaml records the change."""
    import qbco.train.loop as qtrain
    from qbco.run.folder import RunFolder

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in separable_rows(20)), encoding="utf-8")
    args = ["--model", str(four_layer_model), "--data", str(data), "--max-steps", "4", "--save-every", "2",
            "--no-4bit", "--memory-budget", "50", "--quiet", "--eval-fraction", "0.25"]
    straight = runner.invoke(app, ["train", *args, "--output", str(tmp_path / "straight")])
    assert straight.exit_code == 0, straight.output

    original, calls = qtrain.completion_logps, []

    def fail_in_step_3(*a, **k):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*a, **k)

    monkeypatch.setattr(qtrain, "completion_logps", fail_in_step_3)
    run = tmp_path / "run"
    stopped = runner.invoke(app, ["train", *args, "--output", str(run)])
    assert stopped.exit_code == 4 and "out of memory in step 3" in stopped.output
    monkeypatch.setattr(qtrain, "completion_logps", original)
    resumed = runner.invoke(app, ["train", "--quiet", "--resume", str(run), "--memory-budget", "1",
                                  "--gradient-checkpointing", "on"])
    assert resumed.exit_code == 0, resumed.output
    a, b = RunFolder(tmp_path / "straight").metrics(), RunFolder(run).metrics()
    assert [m["step"] for m in b.steps] == [1, 2, 3, 4]
    assert [m["loss"] for m in b.steps] == pytest.approx([m["loss"] for m in a.steps], rel=1e-5)
    assert b.eval["eval_loss"] == pytest.approx(a.eval["eval_loss"], rel=1e-5)
    text = (run / "config.yaml").read_text()
    assert "gradient_checkpointing: 'on'" in text or "gradient_checkpointing: on" in text
    assert "memory_budget: 1.0" in text
