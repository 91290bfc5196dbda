"""`qbco train --report-to`: the metrics log's records, the resolved config and the held-out figures, also sent to
experiment trackers (TensorBoard, Weights & Biases, MLflow, Trackio) through each tracker's own client, under the
run's name. The run's metrics log is always written; a tracker is an optional extra (`pip install 'qbco[mlflow]'`).

Offline by default where the tracker has such a mode: TensorBoard event files and an MLflow SQLite store in the run
folder (unless MLFLOW_TRACKING_URI names another), W&B offline in the run folder (unless WANDB_MODE says otherwise;
`wandb sync` uploads later), Trackio's local database (its own default, unless a Space is configured). Rank 0 alone
reports: the other ranks write no metrics log either.

accelerate's trackers were the first choice; they log through accelerate's logger, which needs an
`accelerate.PartialState`, and creating one under torchrun on CPUs rewrites RANK / WORLD_SIZE and torch's thread
count in the middle of qbco's own set-up, so the few documented client calls each tracker needs are made here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time

from qbco.common.errors import QbcoError
from qbco.run.config import TrainConfig, report_targets
from qbco.run.folder import RunFolder

# tracker -> (module to import, the extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}
EXPERIMENT = "qbco"  # the W&B / Trackio project and the MLflow experiment, unless the tracker's own variable names one


def check_trackers(value: str) -> list[str]:
    """The trackers --report-to names, each installed; a missing one is a one-line error with its install command,
    raised before anything loads."""
    names = report_targets(value)
    for name in names:
        module, extra = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise QbcoError(f"--report-to {name}: the {module} package is not installed; pip install 'qbco[{extra}]'")
    return names


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers (a bool as 0 / 1); None, text and the split marker are left out."""
    return {k: float(v) for k, v in record.items()
            if k not in ("step", "split") and isinstance(v, (int, float)) and v is not None}


def flat_config(config: TrainConfig) -> dict:
    return {k: ("" if v is None else v) for k, v in config.to_dict().items()}


# ---------------------------------------------------------------- one class per tracker: start, log, finish


class TensorBoard:
    def __init__(self, folder: RunFolder, name: str, config: TrainConfig):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(str(folder.tensorboard))
        lines = "\n".join(f"    {k}: {v}" for k, v in config.to_dict().items())
        self.writer.add_text("config", f"run {name}\n\n{lines}", global_step=0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, folder: RunFolder, name: str, config: TrainConfig):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{folder.mlflow_store.resolve()}"
        self.client = MlflowClient(uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=None if os.environ.get("MLFLOW_TRACKING_URI") else folder.mlflow_artifacts.resolve().as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in flat_config(config).items()])
        self.uri = uri

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    def __init__(self, folder: RunFolder, name: str, config: TrainConfig):
        import wandb

        with _to_stderr():
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", EXPERIMENT), name=name, dir=str(folder.path),
                                  config=flat_config(config), mode=os.environ.get("WANDB_MODE", "offline"),
                                  settings=wandb.Settings(console="off", silent=True))

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self) -> None:
        with _to_stderr():
            self.run.finish()


class Trackio:
    def __init__(self, folder: RunFolder, name: str, config: TrainConfig):
        import trackio

        with _to_stderr():
            self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", EXPERIMENT), name=name,
                                    config=flat_config(config), auto_log_cpu=False, auto_log_gpu=False)

    def log(self, values: dict[str, float], step: int) -> None:
        with _to_stderr():
            self.run.log(values, step=step)

    def finish(self) -> None:
        import trackio

        with _to_stderr():
            trackio.finish()  # the module's, not the run's: it also forgets the run, which its atexit hook would finish again


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}


@contextlib.contextmanager
def _to_stderr():
    """A tracker's own chatter goes to stderr: `qbco train --quiet` prints the run folder alone on stdout."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# ---------------------------------------------------------------- the metrics log with its trackers


class Reported:
    """The run's metrics writer, each record also sent to the trackers (`names`). A tracker that fails is said once
    and dropped: a run is never lost to its dashboard."""

    def __init__(self, writer, folder: RunFolder, config: TrainConfig, names: list[str], log=print):
        self.writer, self.folder, self.config, self.names, self.log = writer, folder, config, names, log
        self.trackers: dict[str, object] = {}

    def __enter__(self) -> "Reported":
        self.writer.__enter__()
        name = self.folder.path.name
        for tracker in self.names:
            self._safely(tracker, "start", lambda t=tracker: self.trackers.__setitem__(
                t, TRACKERS[t](self.folder, name, self.config)))
        if self.trackers:
            self.log(f"reporting to {', '.join(self.trackers)} as {name}{self._where()}")
        return self

    def write(self, record: dict) -> None:
        self.writer.write(record)
        values = scalars(record)
        if record.get("split") == "eval":  # the held-out figures, under names of their own (eval_loss, ...)
            values = {k if k.startswith("eval_") else f"eval_{k}": v for k, v in values.items()}
        for tracker, client in list(self.trackers.items()):
            self._safely(tracker, "log", lambda c=client: c.log(values, record["step"]))

    def __exit__(self, *exc) -> None:
        for tracker, client in list(self.trackers.items()):
            self._safely(tracker, "finish", client.finish)
        self.writer.__exit__(*exc)

    def _safely(self, tracker: str, what: str, call) -> None:
        try:
            call()
        except Exception as err:  # a tracker's own failure (a full disk, a server gone): the run goes on without it
            self.trackers.pop(tracker, None)
            self.log(f"--report-to {tracker}: {what} failed ({type(err).__name__}: {err}); no more reports to it, "
                     f"the metrics log goes on")

    def _where(self) -> str:
        places = []
        if "tensorboard" in self.trackers:
            places.append(f"tensorboard --logdir {self.folder.tensorboard}")
        if "mlflow" in self.trackers:
            places.append(f"mlflow ui --backend-store-uri {self.trackers['mlflow'].uri}")
        if "wandb" in self.trackers and os.environ.get("WANDB_MODE", "offline") == "offline":
            places.append(f"wandb sync {self.folder.path / 'wandb'}/offline-run-*")
        if "trackio" in self.trackers:
            places.append("trackio show")
        return f" ({'; '.join(places)})" if places else ""
