"""The one wrapper around every recipe (SC-Tune, SFT, SVP, bootstrapping, refloop-tiny's
pretraining; torchtune's recipe over components): the launch-engine check, the run's fingerprint
(the recipe's fields that change results), the run directory held by the main process,
recipe.json, the tracker, the exports, results.json and the model cards. A recipe's body is then
its method's loop and nothing else.

A recipe is a pydantic model. A `ModelSpec` recipe (a model to load: every method's) also has
its device checked and, by default, its model's profile read before the run; a recipe with
`tracking()` (`TrackingSpec`) has its tracker checked. A recipe that is neither (refloop-tiny's
pretraining, which builds its model from code and trains on the CPU) gets only the rest."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState
from pydantic import BaseModel

from refloop.models.processors import save_processor
from refloop.models.spec import ModelSpec
from refloop.runs import files_digest, shared_run_directory, write_text_whole
from refloop.training.distributed import check_engine
from refloop.training.model_card import write_model_cards
from refloop.training.trackers import TRACKING_FIELDS, Tracking


@dataclass
class RecipeRun:
    """What a recipe's body gets: its output directory, whether this process is the main one
    (the one that writes shared files), and where its trainers report."""

    out: Path
    main_process: bool
    tracking: Tracking
    prepared: Any = None  # what the recipe's `prepare` returned (checked before the run began)
    folded: str | None = None  # what out/merged holds beyond the base, for its model card (`export`)

    def export(self, processor, adapters=None, role: str | None = None, merged=None, folded: str | None = None) -> None:
        """Main process: the PEFT adapters (out/adapters) and the merged checkpoint with its
        processor (out/merged: the adapters' `role` folded into the base, or `merged` as given,
        `folded` saying what it holds); the merged model card names it."""
        if adapters is not None:
            adapters.save_pretrained(self.out / "adapters")
            merged = adapters.merged_copy(role) if merged is None else merged
        merged.save_pretrained(self.out / "merged")
        save_processor(processor, self.out / "merged")
        self.folded = folded or (f"the `{role}` adapter" if role else None)


def recipe_fingerprint(task: str, recipe: BaseModel, unchanged: frozenset[str] = frozenset(), more: dict | None = None) -> dict:
    """What identifies a run of `recipe` (stored as run.json): the task, the recipe's fields but the
    `unchanged` ones, the thread count and the tracker, `more` (e.g. digests of the model's files)
    and digests of the data files the recipe names (a file changed in place is other data). A
    command that checks its `--out` before any work compares against this."""
    fingerprint = {
        "task": task,
        "recipe": recipe.model_dump(mode="json", exclude={"threads", *TRACKING_FIELDS, *unchanged}),
    } | (more or {})
    fingerprint["data_files"] = files_digest(fingerprint["recipe"])
    return fingerprint


def run_recipe(
    task: str,
    recipe: BaseModel,
    out: Path,
    body: Callable[[RecipeRun], dict | None],
    overwrite: bool = False,
    unchanged: frozenset[str] = frozenset(),
    card_metrics: Callable[[dict], dict] | None = None,
    results_file: str | None = "results.json",
    trains: bool = True,
    fingerprint: dict | None = None,
    prepare: Callable[[], Any] | None = None,
) -> dict | None:
    """Run (or resume) `body` in `out` for `recipe`. A rerun with another recipe (other than the
    `unchanged` fields, the thread count and the tracker) is refused unless `overwrite`. The main
    process writes `results_file` and, with `card_metrics` (results -> the card's numbers), the
    model cards of the exports; every process returns the body's results. `fingerprint`: more of
    what identifies the run (see `recipe_fingerprint`). Before the directory is claimed and
    anything loads: the device, the tracker, and `prepare` (default: a ModelSpec's model profile
    read from its config and processor, which checks the model path and processor options; None
    for other recipes), whose result the body gets as `run.prepared` (e.g. training data checked
    against that profile)."""
    spec = recipe if isinstance(recipe, ModelSpec) else None  # no model to load: trains on the CPU
    cpu = spec is None or spec.device == "cpu"
    if trains:
        check_engine()  # an FSDP1 or DeepSpeed launch config is refused before anything loads
    if spec is not None:
        spec.check_device()
    if hasattr(recipe, "tracking"):
        recipe.tracking()  # an uninstalled tracker is refused here
    if prepare is not None:
        prepared = prepare()
    else:
        prepared = spec.load_profile() if spec is not None else None
    fingerprint = recipe_fingerprint(task, recipe, unchanged, fingerprint)
    main_process = PartialState(cpu=cpu).is_main_process
    # the other processes of an `accelerate launch` write nothing (not even recipe.json) before the main
    # one has checked the directory; a run that fails before writing more than recipe.json leaves no fingerprint
    with shared_run_directory(out, fingerprint, overwrite, setup_files=("recipe.json",), cpu=cpu):
        out.mkdir(parents=True, exist_ok=True)
        write_text_whole(out / "recipe.json", recipe.model_dump_json(indent=2))
        tracking = recipe.tracking() if hasattr(recipe, "tracking") else Tracking()
        run = RecipeRun(out, main_process, tracking, prepared)
        results = body(run)
        if main_process and results is not None:
            if results_file:
                write_text_whole(out / results_file, json.dumps(results, indent=2) + "\n")
            if card_metrics is not None:
                base = (spec.model if spec is not None else None) or "refloop-tiny"
                write_model_cards(out, base, task, recipe.model_dump(mode="json"), card_metrics(results), folded=run.folded)
        return results
