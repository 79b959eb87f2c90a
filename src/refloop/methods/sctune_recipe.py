"""`refloop sctune`: a YAML recipe around the SC-Tune loop (data, training, export, evaluation)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from accelerate import PartialState
from pydantic import Field, field_validator, model_validator

from refloop.config import DataSpec
from refloop.data.items import detection_items, referring_items
from refloop.data.records import BoxItem
from refloop.data.sources import load_data
from refloop.errors import RefloopError
from refloop.evaluation.consistency import ConsistencyConfig, evaluate_consistency, sample_boxes
from refloop.methods.recipe import RecipeRun, run_recipe
from refloop.methods.sctune import SCTune, SCTuneConfig
from refloop.models.base import VLM
from refloop.models.spec import ModelSpec
from refloop.report.plots import sctune_curves
from refloop.training.trackers import TrackingSpec
from refloop.world import DOMAINS

log = logging.getLogger(__name__)


class SCTuneRecipe(ModelSpec, TrackingSpec):
    """The model fields come from `ModelSpec`, the tracker fields from `TrackingSpec`; data entries
    are a path or domain, or {data, images} with their own image root (default: the recipe's `images`, then the file's directory)."""

    train_data: DataSpec = Field(..., description="shapes-world domain, COCO-style .json (filtered on the fly) or triplets .jsonl")
    images: str | None = Field(None, description="image root of every data file that does not name its own")
    train_images: int = Field(2000, ge=1, le=1_000_000, description="scenes exported when train_data is a shapes-world domain")
    train_degrade_prob: float = Field(
        0.0, ge=0, le=1, description="a shapes-world train_data's images degraded with this probability (an augmentation beyond the paper)"
    )
    max_overlap_iou: float = Field(0.5, ge=0, le=1, description="appendix-9 filter: overlap threshold")
    min_area_fraction: float = Field(0.02, ge=0, le=1, description="appendix-9 filter: smallest box as a fraction of the image")
    supervised_data: DataSpec | None = Field(None, description="referring data (domain or .jsonl) mixed into locator phases (L_sup)")
    eval_data: list[DataSpec] = Field(default_factory=list, description="held-out data evaluated before and after tuning")
    eval_boxes: int = Field(1000, ge=1, description="boxes per evaluation set")
    sctune: SCTuneConfig = Field(default_factory=SCTuneConfig, description="the method's hyperparameters")

    @field_validator("train_data", "supervised_data", mode="before")
    @classmethod
    def _one_spec(cls, value):
        return None if value is None else DataSpec.of(value)

    @field_validator("eval_data", mode="before")
    @classmethod
    def _many_specs(cls, value):
        return [DataSpec.of(v) for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _degrade_a_domain(self) -> SCTuneRecipe:
        if self.train_degrade_prob > 0 and self.train_data.data not in DOMAINS:
            raise ValueError("train_degrade_prob redraws shapes-world scenes degraded: train_data must be a domain, not a data file")
        return self

    @model_validator(mode="after")
    def _supervised_data_given(self) -> SCTuneRecipe:
        if self.sctune.supervised_ratio > 0 and self.supervised_data is None:
            raise ValueError("sctune.supervised_ratio > 0 mixes in referring pairs: set supervised_data (a domain or referring .jsonl)")
        return self

    def root(self, spec: DataSpec) -> str | None:
        return spec.images or self.images


def eval_folders(specs: list[DataSpec]) -> list[str]:
    """One folder name per eval set: the file's stem (a domain's name), prefixed by its parent
    folder's name when stems repeat (RefCOCO, RefCOCO+ and RefCOCOg exports are all refs.jsonl),
    numbered when even those repeat; two sets never share a folder."""
    stems = [Path(spec.data).stem for spec in specs]
    names = [f"{Path(spec.data).parent.name}-{stem}" if stems.count(stem) > 1 else stem for spec, stem in zip(specs, stems, strict=True)]
    return [f"{name}-{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def evaluate(vlm: VLM, recipe: SCTuneRecipe, out: Path, label: str, bars: bool = False) -> dict[str, float]:
    """Pr@0.5 of `vlm` on every eval set; keyed by the data as the recipe names it. `bars`: a
    progress bar per set (on the main process)."""
    from refloop.data.shards import share
    from refloop.progress import progress_bar

    results = {}
    for spec, folder in zip(recipe.eval_data, eval_folders(recipe.eval_data), strict=True):
        with PartialState().main_process_first():  # a shapes-world domain is exported once, by the main process
            records, _ = load_data(spec.data, recipe.root(spec), num_images=recipe.eval_boxes)
        samples = sample_boxes(records, recipe.eval_boxes)
        cfg = ConsistencyConfig(num_boxes=recipe.eval_boxes)
        state = PartialState()
        mine = share(len(samples), cfg.batch_size)  # the main process's share of the sharded pass
        with progress_bar(f"{label} model: consistency {spec.data}", mine, enabled=bars and state.is_main_process) as advance:
            metrics = evaluate_consistency(vlm, samples, out / label / folder, cfg, data_name=spec.data, progress=advance)
        results[spec.data] = metrics["consistency_rate"]
    return results


def run_sctune(
    recipe: SCTuneRecipe, out: Path, progress: Callable[[dict], None] | None = None, evaluate_base: bool = True, overwrite: bool = False
) -> dict:
    """Train, export and evaluate in `out`. Rerunning resumes; a run with another recipe (other
    than its evaluation sets and thread count) is refused unless `overwrite`."""

    def body(run: RecipeRun) -> dict:
        return _run_sctune(recipe, run, progress, evaluate_base)

    def prepare():  # before the directory is claimed and anything loads (the base evaluation takes hours at GPU sizes)
        recipe.check_generation_backend(vision_tower=recipe.sctune.lora.vision_tower)
        return recipe.load_profile()

    unchanged = {"eval_data", "eval_boxes"} | ({"train_degrade_prob"} if recipe.train_degrade_prob == 0 else set())  # runs before it

    def card(results: dict) -> dict:  # the evaluations say what they measure
        return {f"self-consistency Pr@0.5, {k} model" if k in ("base", "tuned") else k: v for k, v in results.items()}

    return run_recipe("sctune", recipe, out, body, overwrite, unchanged=frozenset(unchanged), card_metrics=card, prepare=prepare)


SMALL_MODEL_PARAMETERS = 100_000_000


def _warn_paper_rates_on_a_small_model(cfg: SCTuneConfig, vlm: VLM) -> None:
    """SCTuneConfig's learning rates are the paper's for 7B models; a recipe for a much smaller
    model that leaves them unset trains for nothing (approx-KL ~0). Said once, at the start."""
    unset = [name for name in ("describer_lr", "locator_lr") if name not in cfg.model_fields_set]
    model = getattr(vlm, "model", None)
    if not unset or model is None:
        return
    parameters = sum(p.numel() for p in model.parameters())
    if parameters < SMALL_MODEL_PARAMETERS:
        log.warning(
            f"sctune.{' and sctune.'.join(unset)} left at the paper's rates for 7B models "
            f"({' / '.join(f'{SCTuneConfig.model_fields[n].default:g}' for n in unset)}) on a model of "
            f"{parameters / 1e6:.1f}M parameters, which barely moves at them; set them (the packaged sctune-shapes recipe: 3e-4 / 2e-4)"
        )


def _supervised_pairs(recipe: SCTuneRecipe) -> list[BoxItem] | None:
    """L_sup's referring pairs: refused when the data holds none (a detection file has boxes but
    no expressions, and L_sup would be off without a word); data given at ratio 0 is said unused."""
    if recipe.supervised_data is None:
        return None
    pairs = referring_items(recipe.supervised_data.data, recipe.root(recipe.supervised_data))  # read either way: a bad file is refused
    if recipe.sctune.supervised_ratio <= 0:
        if PartialState().is_main_process:
            log.warning(f"supervised_data {recipe.supervised_data.data} is unused: sctune.supervised_ratio is 0 (L_sup off)")
        return None
    if not pairs:
        raise RefloopError(
            f"supervised_data {recipe.supervised_data.data}: no referring expressions, so no L_sup pairs "
            "(it needs referring data: a shapes-world domain, a referring .jsonl, RefCOCO)"
        )
    return pairs


def _run_sctune(recipe: SCTuneRecipe, run: RecipeRun, progress: Callable[[dict], None] | None, evaluate_base: bool) -> dict:
    out = run.out
    with PartialState().main_process_first():  # a shapes-world domain is exported once, by the main process
        train, filter_counts = detection_items(
            recipe.train_data.data,
            recipe.root(recipe.train_data),
            recipe.train_images,
            recipe.max_overlap_iou,
            recipe.min_area_fraction,
            recipe.train_degrade_prob,
        )
        supervised = _supervised_pairs(recipe)
    if not train:
        raise RefloopError(f"no training boxes left after filtering {recipe.train_data.data}: {filter_counts}")
    vlm = recipe.load_vlm(batch_size=recipe.sctune.generation_batch_size)
    _warn_paper_rates_on_a_small_model(recipe.sctune, vlm)
    results: dict = {"train_data": recipe.train_data.data, "train_boxes": len(train), "filter": filter_counts}
    # Every process evaluates: under `accelerate launch` each takes its share of the boxes.
    if evaluate_base and recipe.eval_data:
        results["base"] = evaluate(vlm, recipe, out / "eval", "base", bars=progress is not None)
    tuner = SCTune.from_base(vlm, recipe.sctune, train, supervised, engine=recipe.vllm_engine(recipe.sctune.lora.r))
    tuner.trainer.track(run.tracking)
    started = time.perf_counter()
    summary = tuner.run(out / "train", progress=progress)
    results["train_seconds"] = summary["train_seconds"]
    results["wall_seconds"] = time.perf_counter() - started  # this invocation's: see resumed_from_step
    results["resumed_from_step"] = summary["resumed_from_step"]
    results["processes"] = tuner.trainer.world_size
    adapters, tuned = tuner.adapters, tuner.vlm
    if adapters.sharded:  # FSDP: export and evaluate from a gathered, unsharded copy
        adapters = adapters.unsharded()
        tuned = vlm.with_module(adapters.module, batch_size=recipe.sctune.generation_batch_size)
    if run.main_process:
        run.export(vlm.processor, adapters, tuner.final_role)
    if recipe.eval_data:
        results["tuned"] = evaluate(adapters.view(tuned, tuner.final_role), recipe, out / "eval", "tuned", bars=progress is not None)
    if run.main_process:
        sctune_curves(out / "train" / "metrics.jsonl", out / "curves.png")
    return results
