"""Every command given a damaged run or a damaged file exits 2 with one line naming the file, and writes nothing
(issue 25): a run without its adapter, with its adapter's weights cut short, empty or gone, a missing or unreadable
config, damaged JSON files, a damaged metrics log, a damaged checkpoint on --resume, a damaged merged folder.
Before these checks the adapter cut short ended eval, merge, score and generate in a 50-line safetensors traceback."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qbco.cli.main import app
from qbco.common.files import safetensors_damage

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cut(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])


# Each: (what is done to a copy of the finished run, the fragment of the one line that names the file).
DAMAGE = {
    "no adapter": (lambda r: shutil.rmtree(r / "adapter"), "is not a finished qbco run"),
    "adapter cut short": (lambda r: cut(r / "adapter/adapter_model.safetensors", -1000), "adapter/adapter_model.safetensors is damaged (cut short"),
    "adapter header cut short": (lambda r: cut(r / "adapter/adapter_model.safetensors", 100),
                                 "adapter/adapter_model.safetensors is damaged (cut short"),
    "adapter empty": (lambda r: cut(r / "adapter/adapter_model.safetensors", 0), "adapter/adapter_model.safetensors is damaged (0 bytes"),
    "adapter weights missing": (lambda r: (r / "adapter/adapter_model.safetensors").unlink(), "adapter/adapter_model.safetensors is missing"),
    "adapter config not json": (lambda r: (r / "adapter/adapter_config.json").write_text('{"r": '),
                                "adapter/adapter_config.json is damaged: not JSON"),
    "tokenizer not json": (lambda r: (r / "adapter/tokenizer.json").write_text("{"), "adapter/tokenizer.json is damaged: not JSON"),
    "config missing": (lambda r: (r / "config.yaml").unlink(), "is not a finished qbco run"),
    "config not utf-8": (lambda r: (r / "config.yaml").write_bytes(b"\xff\xfe model: x"), "config.yaml: not UTF-8 text"),
    "config not yaml": (lambda r: (r / "config.yaml").write_text("model: [x\n"), "config.yaml: not valid YAML"),
}
COMMANDS = {
    "eval": lambda run, tmp: ["eval", str(run)],
    "score": lambda run, tmp: ["score", str(run), "--data", str(run.parent / "data.jsonl"), "-o", str(tmp / "scored.jsonl")],
    "merge": lambda run, tmp: ["merge", str(run), "-o", str(tmp / "merged"), "--device", "cpu"],
    "generate": lambda run, tmp: ["generate", str(run), "-p", "hello", "--max-new-tokens", "2"],
}


def one_line_exit_2(result, fragment):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and fragment in " ".join(result.output.split()), result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 2  # the error (and a merge's estimate)
    assert result.output.strip().splitlines()[-1].startswith("error:")


def files(folder: Path) -> dict:
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture
def damaged(tiny_run, tmp_path):
    def make(case: str) -> Path:
        run = tmp_path / "copy" / "run"
        shutil.copytree(tiny_run, run)
        shutil.copy(tiny_run.parent / "data.jsonl", run.parent / "data.jsonl")
        DAMAGE[case][0](run)
        return run
    return make


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_run_is_one_line_exit_2_and_nothing_written(damaged, tmp_path, case, command):
    run = damaged(case)
    out = tmp_path / "out"
    out.mkdir()
    before = files(tmp_path)
    result = runner.invoke(app, COMMANDS[command](run, out), env={"COLUMNS": "400"})
    one_line_exit_2(result, DAMAGE[case][1])
    assert files(tmp_path) == before  # nothing written, in the run or beside it


# Files that only scoring reads: the reward shift (p_up) and the calibration (eval of other rows and score apply it).
FIGURES = {
    "reward shift not json": (lambda r: (r / "adapter/reward_shift.json").write_text("nope"),
                              "adapter/reward_shift.json is damaged: not JSON"),
    "calibration not utf-8": (lambda r: (r / "calibration.json").write_bytes(b"\xff\xfe"), "calibration.json is damaged: not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(FIGURES))
def test_damaged_figures_files_stop_score_and_eval_on_other_rows(tiny_run, tmp_path, case):
    run = tmp_path / "copy" / "run"
    shutil.copytree(tiny_run, run)
    shutil.copy(tiny_run.parent / "data.jsonl", run.parent / "data.jsonl")
    damage, fragment = FIGURES[case]
    damage(run)
    for args in (["score", str(run), "--data", str(run.parent / "data.jsonl"), "-o", str(tmp_path / "s.jsonl")],
                 ["eval", str(run), "--data", str(run.parent / "data.jsonl")]):
        before = files(tmp_path)
        one_line_exit_2(runner.invoke(app, args, env={"COLUMNS": "400"}), fragment)
        assert files(tmp_path) == before


def test_a_damaged_metrics_log_stops_plot_and_merge_before_any_work(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "metrics.jsonl").write_bytes(b'{"step": 1}\n\xff\xfe\n{"step": 2}\n')
    before = files(tmp_path)
    for args in (["plot", str(run)], ["merge", str(run), "-o", str(tmp_path / "merged"), "--device", "cpu"]):
        one_line_exit_2(runner.invoke(app, args, env={"COLUMNS": "400"}), "metrics.jsonl: line 2 is not UTF-8 text")
        assert files(tmp_path) == before


@pytest.fixture(scope="module")
def merged(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "m"
    result = runner.invoke(app, ["merge", str(tiny_run), "-o", str(out), "--dtype", "fp32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("case, damage, fragment", [
    ("weights cut short", lambda m: cut(m / "model.safetensors", -1000), "model.safetensors is damaged (cut short"),
    ("merge record not json", lambda m: (m / "qbco_merge.json").write_text('{"run": '), "qbco_merge.json is damaged: not JSON"),
    ("config not json", lambda m: (m / "config.json").write_text("{"), "config.json is damaged: not JSON"),
])
def test_a_damaged_merged_folder_is_one_line_for_score_and_generate(merged, tmp_path, case, damage, fragment):
    folder = tmp_path / "m"
    shutil.copytree(merged, folder)
    damage(folder)
    before = files(tmp_path)
    for args in (["score", str(folder), "--data", str(folder.parent / "x.jsonl"), "-o", str(tmp_path / "s.jsonl")],
                 ["generate", str(folder), "-p", "hello", "--max-new-tokens", "2"]):
        (tmp_path / "x.jsonl").write_text(json.dumps({"prompt": "q1 ?", "completion": "good answer a1 ."}) + "\n")
        before = files(tmp_path)
        one_line_exit_2(runner.invoke(app, args, env={"COLUMNS": "400"}), fragment)
        assert files(tmp_path) == before


@pytest.mark.parametrize("case, damage, fragment", [
    ("adapter cut short", lambda c: cut(c / "adapter_model.safetensors", 100), "adapter_model.safetensors: cut short"),
    ("state cut short", lambda c: cut(c / "state.pt", 100), "state.pt: PytorchStreamReader failed"),
    ("record not json", lambda c: (c / "state.json").write_text('{"st'), "state.json: Unterminated string"),
])
def test_resume_from_a_damaged_checkpoint_names_it_and_the_one_before(tmp_path, tiny_model_dir, separable_file, case, damage,
                                                                     fragment):
    """--resume reads the last checkpoint; a damaged one is one line naming it and the checkpoint to resume from
    once it is removed; the run folder is left as it was."""
    run = tmp_path / "run"
    args = ["train", "--quiet", "--model", str(tiny_model_dir), "--data", str(separable_file), "--output", str(run),
            "--max-steps", "4", "--save-every", "2", "--batch-size", "8", "--max-prompt-length", "32",
            "--max-completion-length", "16", "--no-4bit"]
    assert runner.invoke(app, args).exit_code == 0
    shutil.rmtree(run / "adapter")  # stopped before its end, as a killed run is
    (run / "calibration.json").unlink()
    damage(run / "checkpoints" / "step-00000004")
    before = files(run)
    result = runner.invoke(app, ["train", "--quiet", "--resume", str(run)], env={"COLUMNS": "400"})
    one_line_exit_2(result, f"checkpoint step-00000004 is damaged ({fragment}")
    assert f"remove {run / 'checkpoints' / 'step-00000004'} to resume from step-00000002" in " ".join(result.output.split())
    assert files(run) == before


def test_safetensors_damage_by_hand(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(3)}, path)
    assert safetensors_damage(path) is None
    whole = path.read_bytes()
    for keep, said in ((len(whole) - 1, "cut short: its tensors need 76 bytes"), (8, "its header says"), (3, "shorter than")):
        path.write_bytes(whole[:keep])
        assert said in safetensors_damage(path)
    path.write_bytes(whole + b"x")  # a byte more than the tensors cover: not what safetensors wrote
    assert "1 bytes after its last tensor" in safetensors_damage(path)


def test_every_damage_case_is_in_docs_errors_md():
    doc = (ROOT / "docs" / "errors.md").read_text()
    for case in [*DAMAGE, *FIGURES]:
        assert f"| {case} |" in doc, case
