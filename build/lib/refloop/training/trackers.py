"""Experiment trackers (TensorBoard, Weights & Biases, Trackio) through accelerate's tracker
classes (`accelerate.tracking`), the ones `Accelerator(log_with=...)` builds.

The trainer hands every `metrics.jsonl` row to the tracker, at the row's own step (1-based, as
in the file), and the run's config once as hyperparameters. Only the main process logs. A
resumed run logs again from its checkpoint's step: TensorBoard is opened with `purge_step`, so
the rows a killed run logged after its last checkpoint are discarded when read back (they are
computed again, as in `metrics.jsonl`, which is truncated the same way); wandb and Trackio start
a new run of the same name in the project.

Accelerate skips an uninstalled tracker silently; refloop refuses it with a message instead.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, Field

from refloop.errors import RefloopError

ReportTo = Literal["none", "tensorboard", "wandb", "trackio"]
TRACKERS: tuple[str, ...] = get_args(ReportTo)
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def require_tracker(report_to: str) -> None:
    """Refuse an unknown tracker name, or one whose package is not installed."""
    if report_to not in TRACKERS:
        raise RefloopError(f"report_to {report_to!r} is not a tracker refloop knows; choose one of {', '.join(TRACKERS)}")
    package = _PACKAGES.get(report_to)
    if package is not None and importlib.util.find_spec(package) is None:
        raise RefloopError(
            f"report_to: {report_to} needs the {package!r} package, which is not installed: "
            f"pip install {package} (or pip install 'refloop[{report_to}]'), or use report_to: none"
        )


@dataclass(frozen=True)
class Tracking:
    """Where a training run reports: the tracker, the wandb/Trackio project, the config logged
    as hyperparameters (nested keys flattened with dots)."""

    report_to: str = "none"
    project: str = "refloop"
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        require_tracker(self.report_to)

    @property
    def enabled(self) -> bool:
        return self.report_to != "none"


def flat_hparams(config: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """`config` as the scalar key/values trackers take: nested mappings as dotted keys, lists
    and None as JSON text."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flat_hparams(value, f"{name}.")
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def metric_values(row: dict) -> dict[str, int | float]:
    """The numeric fields of a metrics row, without its step (trackers get it separately); text
    fields such as SC-Tune's `role` stay in metrics.jsonl only."""
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


class RunTracker:
    """One accelerate tracker for one training work directory (the main process's)."""

    def __init__(self, tracking: Tracking, work_dir: Path, start_step: int) -> None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        tracker_class = LOGGER_TYPE_TO_CLASS[tracking.report_to]
        work_dir = Path(work_dir)
        if tracking.report_to == "tensorboard":
            # event files under WORK/tensorboard; purge what a killed run logged after its checkpoint
            options = {"purge_step": start_step + 1} if start_step else {}
            self.tracker = tracker_class("tensorboard", str(work_dir), **options)
        else:
            name = f"{work_dir.resolve().parent.name}/{work_dir.name}"
            options = {"name": name, "dir": str(work_dir)} if tracking.report_to == "wandb" else {"name": name}
            self.tracker = tracker_class(tracking.project, **options)
        try:
            self.tracker.start()
            self.tracker.store_init_configuration(flat_hparams(tracking.config))
        except ImportError as exc:
            raise RefloopError(f"report_to: {tracking.report_to} could not start: {exc}") from None

    def log(self, row: dict) -> None:
        self.tracker.log(metric_values(row), step=row["step"])

    def finish(self) -> None:
        self.tracker.finish()


class TrackingSpec(BaseModel):
    """Where a training recipe reports its metrics besides metrics.jsonl; every training recipe
    inherits these fields. They do not change a run: a run resumes under another tracker."""

    report_to: ReportTo = Field("none", description="none, tensorboard (event files in the run's train/tensorboard), wandb or trackio")
    tracker_project: str = Field("refloop", min_length=1, description="wandb / Trackio project of the run")

    def tracking(self) -> Tracking:
        """The tracker settings, with this recipe as the run's logged config; an uninstalled
        tracker is refused here, before any model loads."""
        return Tracking(self.report_to, self.tracker_project, self.model_dump(mode="json"))


TRACKING_FIELDS = frozenset(TrackingSpec.model_fields)
"""Recipe fields left out of a run's fingerprint (resuming under another tracker is allowed)."""
