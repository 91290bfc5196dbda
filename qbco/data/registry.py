"""Named feedback datasets on the Hugging Face Hub for `qbco train --data NAME`, binarized on load.

Each is converted by the same row-level code as `qbco binarize` (qbco.data.binarize.binarize_rows), so a
registered name and a local copy run through `qbco binarize` give the same rows. "demo" is the bundled
offline set, handled by qbco.data.feedback; it is listed here for `qbco datasets` but not registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qbco.common.errors import QbcoError
from qbco.data.binarize import Options, Summary, binarize_rows


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    hub_id: str
    kind: str  # "likert": scored responses, thumbs-up when score >= threshold; "pairs": chosen/rejected unpaired
    train_split: str
    eval_split: str | None  # the held-out split when the hub dataset has it
    description: str
    score_column: str | None = None
    threshold: float | None = None
    scale: tuple[float, float] | None = None

    def options(self) -> Options:
        if self.kind == "pairs":
            return Options(mode="pairs")
        return Options(mode="likert", score_column=self.score_column, threshold=self.threshold, scale=self.scale)

    def binarize_command(self) -> str:
        """The `qbco binarize` line that gives the same rows from a local copy of the train split."""
        local = f"{self.name}-{self.train_split}.parquet"
        if self.kind == "pairs":
            return f"qbco binarize {local} -o {self.name}.jsonl --pairs"
        lo, hi = self.scale
        return (f"qbco binarize {local} -o {self.name}.jsonl --score {self.score_column} "
                f"--threshold {self.threshold:g} --scale {lo:g}-{hi:g}")


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="helpsteer2", hub_id="nvidia/HelpSteer2", kind="likert", train_split="train",
            eval_split="validation", score_column="helpfulness", threshold=4, scale=(0, 4),
            description="human helpfulness ratings, two responses per prompt",
        ),
        DatasetSpec(
            name="ultrafeedback", hub_id="trl-lib/ultrafeedback_binarized", kind="pairs", train_split="train",
            eval_split="test",
            description="GPT-4-rated preference pairs",
        ),
        DatasetSpec(
            name="capybara", hub_id="trl-lib/Capybara-Preferences", kind="pairs", train_split="train",
            eval_split="test",
            description="multi-turn preference pairs",
        ),
    )
}


def is_registered(name: str) -> bool:
    return name in DATASETS


def listing() -> list[tuple[str, str, str, str]]:
    """(name, source, mapping, description) rows for `qbco datasets`, the bundled demo first."""
    rows = [("demo (bundled, offline)", "in the package", "labels as given", "small thumbs-up/down set")]
    for spec in DATASETS.values():
        splits = spec.train_split + (f" / {spec.eval_split}" if spec.eval_split else "")
        if spec.kind == "pairs":
            mapping = "chosen up, rejected down"
        else:
            mapping = f"{spec.score_column} >= {spec.threshold:g} (of {spec.scale[0]:g}-{spec.scale[1]:g})"
        rows.append((spec.name, f"{spec.hub_id} ({splits})", mapping, spec.description))
    return rows


def load_registered(name: str, summaries: list[Summary] | None = None) -> tuple[list[dict], list[dict] | None]:
    """(train rows, held-out rows or None), each a dict with prompt, completion, label (bool), score, source.

    Downloads through `datasets.load_dataset` (cached after the first time). When the hub cannot be
    reached, a QbcoError in one line names the dataset and the `qbco binarize` command for a local copy.
    Pass a list as `summaries` to receive one binarize Summary per split.
    """
    spec = DATASETS.get(name)
    if spec is None:
        raise QbcoError(f"unknown dataset {name!r}; registered: {', '.join(DATASETS)} (and the bundled demo)")
    import datasets

    try:
        data = datasets.load_dataset(spec.hub_id)
    except OSError as err:  # ConnectionError when offline or unreachable; HfHubHTTPError and not-found are OSErrors too
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise QbcoError(
            f"cannot load dataset '{name}' ({spec.hub_id}) from the Hugging Face Hub ({reason}); with a local "
            f"copy of its {spec.train_split} split run: {spec.binarize_command()} and then: "
            f"qbco train --data {spec.name}.jsonl"
        ) from None
    if spec.train_split not in data:
        raise QbcoError(f"{spec.hub_id} has no '{spec.train_split}' split (found: {', '.join(data)})")
    train = _convert(spec, data[spec.train_split], spec.train_split, summaries)
    held = None
    if spec.eval_split and spec.eval_split in data:
        held = _convert(spec, data[spec.eval_split], spec.eval_split, summaries)
    return train, held


def _convert(spec: DatasetSpec, split: Any, split_name: str, summaries: list[Summary] | None) -> list[dict]:
    origin = f"{spec.hub_id}:{split_name}"
    summary = Summary(input=origin, output=None, mode=spec.options().mode)
    rows = list(binarize_rows(lambda: enumerate(split, start=1), origin, spec.options(), summary))
    if summaries is not None:
        summaries.append(summary)
    return rows
