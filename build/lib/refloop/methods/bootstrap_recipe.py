"""`refloop bootstrap`: a YAML recipe around Pink's self-consistent bootstrapping (`methods.pink`):
the detection data, the model, the method's settings; the outputs are Pink's (pairs.jsonl,
refs.json + instances.json, candidates.jsonl, records.jsonl, stats.json, report.html)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from refloop.data.shards import share
from refloop.data.sources import load_detections
from refloop.errors import RefloopError
from refloop.methods.pink import SHAPES_MIN_AREA_PX, BootstrapConfig, bootstrap_pass
from refloop.methods.recipe import RecipeRun, run_recipe
from refloop.models.spec import ModelSpec
from refloop.runs import checkpoint_digest


def shapes_area(data, data_key: str, config_key: str, default_data: str | None = None):
    """A recipe's raw fields with Pink's area filter scaled to shapes-world scenes (112 px) when
    `data_key` names a shapes-world domain and `config_key`'s settings leave min_area_px unset."""
    from refloop.world import DOMAINS

    if isinstance(data, dict) and data.get(data_key, default_data) in DOMAINS:
        settings = data.get(config_key) or {}
        if isinstance(settings, dict) and "min_area_px" not in settings:
            data = data | {config_key: settings | {"min_area_px": SHAPES_MIN_AREA_PX}}
    return data


class BootstrapRecipe(ModelSpec):
    """The model fields come from `ModelSpec`; `bootstrap` holds Pink's settings (its
    `min_area_px` defaults to SHAPES_MIN_AREA_PX on shapes-world domains' 112 px scenes)."""

    data: str = Field(..., description="detection boxes: a shapes-world domain, a COCO / Objects365 .json or a referring .jsonl")
    images: str | None = Field(None, description="image root of a data file (default: the file's directory)")
    num_images: int | None = Field(None, ge=1, description="shapes-world domain: scenes exported (default 1000); files: the first N images")
    scene_seed: int = Field(0, description="shapes-world scene seed (0: training scenes, 1: evaluation scenes)")
    on_error: Literal["fail", "skip"] = Field("fail", description="a bad record or image: stop, or skip and count")
    report: bool = Field(True, description="write report.html with kept and rejected examples")
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig, description="the method's settings")

    @model_validator(mode="before")
    @classmethod
    def _shapes_area(cls, data):
        return shapes_area(data, "data", "bootstrap")


def run_bootstrap(
    recipe: BootstrapRecipe, out: Path, progress: Callable[[str, int, int], None] | None = None, overwrite: bool = False
) -> dict | None:
    """Bootstrap (or resume) into `out`; a run with another recipe (other than its thread count),
    or of a model retrained in place, is refused unless `overwrite`. The data is read (and a bad
    record refused) before the output directory is touched. The main process returns the stats,
    the others None."""
    from accelerate import PartialState

    from refloop.models import resolve_model

    recipe.check_device()  # before the data is read
    state = PartialState(cpu=recipe.device == "cpu")
    with state.main_process_first():  # a shapes-world domain is exported once, by the main process
        source = load_detections(recipe.data, recipe.images, recipe.on_error, recipe.num_images, recipe.scene_seed)
    if not source.records:
        raise RefloopError(f"{recipe.data}: no images to bootstrap")

    def body(run: RecipeRun) -> dict | None:
        return _run_bootstrap(recipe, source, run, state, progress)

    model = {"model_files": checkpoint_digest(Path(resolve_model(recipe.model)))}
    return run_recipe("bootstrap", recipe, out, body, overwrite, results_file=None, trains=False, fingerprint=model)


def _run_bootstrap(recipe: BootstrapRecipe, source, run: RecipeRun, state, progress) -> dict | None:
    cfg = recipe.bootstrap
    vlm = recipe.load_vlm(cfg.batch_size, generation=True)
    total = share(len(source.records), cfg.batch_size, state.process_index, state.num_processes)
    stage = f"bootstrap {recipe.data}" + (f" (process 1 of {state.num_processes})" if state.num_processes > 1 else "")
    tick = (lambda n: progress(stage, n, total)) if progress else None
    meta = {"model": getattr(vlm, "name", "model"), "data": recipe.data, "image_root": str(source.image_root or "")}
    if source.report.skipped:
        meta["skipped_records"] = source.report.skipped
    return bootstrap_pass(vlm, source.records, run.out, cfg, state, source.expressions, tick, recipe.on_error, recipe.report, meta)
