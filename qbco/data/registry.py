"""Named feedback datasets on the Hugging Face Hub for `qbco train --data NAME`, binarized on load.

Each is converted by the same row-level code as `qbco binarize` (qbco.data.binarize.binarize_rows, reading
the layout named in its spec), so a registered name and a local copy run through `qbco binarize` give the
same rows. "demo" is the bundled
offline set, handled by qbco.data.feedback; it is listed here for `qbco datasets` but not registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qbco.common.errors import QbcoError
from qbco.data.binarize import Options, Summary, binarize_rows
from qbco.data.layouts import LAYOUTS


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    hub_id: str
    layout: str  # one of qbco.data.layouts.LAYOUTS: how its rows become thumbs
    train_split: str
    eval_split: str | None  # the held-out split when the hub dataset has it
    description: str
    mode: str | None = None  # None: the layout's default
    score_column: str | None = None
    threshold: float | None = None
    scale: tuple[float, float] | None = None

    def options(self) -> Options:
        return Options(mode=self.mode, layout=self.layout, score_column=self.score_column, threshold=self.threshold,
                       scale=self.scale)

    def binarize_command(self) -> str:
        """The `qbco binarize` line that gives the same rows from a local copy of the train split."""
        line = f"qbco binarize {self.name}-{self.train_split}.parquet -o {self.name}.jsonl"
        if self.layout == "pairs":
            return line + " --pairs"
        if self.layout != "likert":
            line += f" --layout {self.layout}"
        if self.score_column:
            line += f" --score {self.score_column}"
        if self.threshold is not None:
            line += f" --threshold {self.threshold:g}"
        if self.scale:
            line += f" --scale {self.scale[0]:g}-{self.scale[1]:g}"
        return line

    def mapping(self) -> str:
        if self.threshold is not None:
            scale = f" (of {self.scale[0]:g}-{self.scale[1]:g})" if self.scale else ""
            return f"{self.score_column} >= {self.threshold:g}{scale}"
        return LAYOUTS[self.layout].rule


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="helpsteer2", hub_id="nvidia/HelpSteer2", layout="likert", train_split="train",
            eval_split="validation", score_column="helpfulness", threshold=4, scale=(0, 4),
            description="human helpfulness ratings, two responses per prompt",
        ),
        DatasetSpec(
            name="ultrafeedback", hub_id="trl-lib/ultrafeedback_binarized", layout="pairs", train_split="train",
            eval_split="test", description="GPT-4-rated preference pairs",
        ),
        DatasetSpec(
            name="capybara", hub_id="trl-lib/Capybara-Preferences", layout="pairs", train_split="train",
            eval_split="test", description="multi-turn preference pairs",
        ),
        DatasetSpec(
            name="hh-rlhf", hub_id="Anthropic/hh-rlhf", layout="hh-rlhf", train_split="train", eval_split="test",
            description="human preference between two assistant transcripts (helpful and harmless)",
        ),
        DatasetSpec(
            name="ultrafeedback-h4", hub_id="HuggingFaceH4/ultrafeedback_binarized", layout="pairs",
            train_split="train_prefs", eval_split="test_prefs",
            description="UltraFeedback's best and a random other completion, with a prompt column",
        ),
        DatasetSpec(
            name="ultrafeedback-ratings", hub_id="openbmb/UltraFeedback", layout="ultrafeedback", train_split="train",
            eval_split=None, score_column="fine-grained_score", threshold=4,
            description="four completions per instruction, each rated 1-5 on four aspects by GPT-4",
        ),
        DatasetSpec(
            name="shp", hub_id="stanfordnlp/SHP", layout="shp", train_split="train", eval_split="validation",
            description="Reddit posts and two comments with their upvotes",
        ),
        DatasetSpec(
            name="oasst1", hub_id="OpenAssistant/oasst1", layout="oasst", train_split="train", eval_split="validation",
            description="human conversation trees with +1/-1 votes on assistant messages",
        ),
        DatasetSpec(
            name="oasst2", hub_id="OpenAssistant/oasst2", layout="oasst", train_split="train", eval_split="validation",
            description="oasst1's successor: more trees, the same votes",
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
        rows.append((spec.name, f"{spec.hub_id} ({splits})", spec.mapping(), spec.description))
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
    summary = Summary(input=origin, output=None, mode=spec.mode)
    rows = list(binarize_rows(lambda: enumerate(split, start=1), origin, spec.options(), summary))
    if summaries is not None:
        summaries.append(summary)
    return rows
