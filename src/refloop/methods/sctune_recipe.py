"""`refloop sctune`: a YAML recipe around the SC-Tune loop (data, training, export, evaluation)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib
from accelerate import PartialState
from pydantic import BaseModel, ConfigDict, Field

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from refloop.boxes import Box  # noqa: E402
from refloop.data.filters import sctune_triplets  # noqa: E402
from refloop.data.jsonl import read_records  # noqa: E402
from refloop.data.loaders import iter_jsonl, load_coco  # noqa: E402
from refloop.data.paths import resolve_image_path  # noqa: E402
from refloop.data.sources import cache_dir, load_data  # noqa: E402
from refloop.errors import RefloopError  # noqa: E402
from refloop.methods.consistency import ConsistencyConfig, evaluate_consistency, sample_boxes  # noqa: E402
from refloop.methods.sctune import BoxItem, SCTune, SCTuneConfig  # noqa: E402
from refloop.models import load_vlm  # noqa: E402
from refloop.models.processors import save_processor  # noqa: E402
from refloop.world import DOMAINS, TRAIN_SEED  # noqa: E402
from refloop.world.export import COCO_FILE, export_split  # noqa: E402


class SCTuneRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="base model directory or hub id (default: refloop-tiny)")
    profile: str | None = Field(None, description="prompt profile name (default: chosen from the model's config)")
    trust_remote_code: bool = Field(False, description="allow the checkpoint's own modelling code")
    processor_options: dict = Field(default_factory=dict, description="processor settings, e.g. image size limits {max_pixels: ...}")
    train_data: str = Field(..., description="shapes-world domain, COCO-style .json (filtered on the fly) or triplets .jsonl")
    images: str | None = Field(None, description="image root of train_data files (default: the file's directory)")
    train_images: int = Field(2000, description="scenes exported when train_data is a shapes-world domain (training seed)")
    max_overlap_iou: float = Field(0.5, description="appendix-9 filter: overlap threshold")
    min_area_fraction: float = Field(0.02, description="appendix-9 filter: smallest box as a fraction of the image")
    supervised_data: str | None = Field(None, description="referring data (domain or .jsonl) mixed into locator phases (L_sup)")
    eval_data: list[str] = Field(default_factory=list, description="held-out data evaluated before and after tuning")
    eval_boxes: int = Field(1000, description="boxes per evaluation set")
    device: str = Field("auto", description="auto, cpu, cuda, mps")
    dtype: str = Field("auto", description="auto, fp32, bf16, fp16")
    threads: int | None = Field(None, description="torch CPU threads (default: torch's choice)")
    sctune: SCTuneConfig = Field(default_factory=SCTuneConfig, description="the method's hyperparameters")


def _boxes_from_triplets(rows: list[dict], root: Path, source: str) -> list[BoxItem]:
    items = []
    for i, row in enumerate(rows):
        path = resolve_image_path(root, row["file_name"], source, f"line {i + 1}")
        items += [BoxItem(str(path), Box(*b)) for b in row["boxes"]]
    return items


def training_boxes(recipe: SCTuneRecipe) -> tuple[list[BoxItem], dict]:
    """Boxes to tune on, from detection boxes alone (appendix 9 filter unless given triplets)."""
    spec = recipe.train_data
    if spec in DOMAINS:
        directory = export_split(
            spec, cache_dir() / "world" / f"{spec}-seed{TRAIN_SEED}-n{recipe.train_images}", recipe.train_images, TRAIN_SEED
        )
        spec, root = str(directory / COCO_FILE), directory
    else:
        root = Path(recipe.images) if recipe.images else Path(spec).parent
    if spec.endswith(".jsonl"):
        rows = [row for _, row in iter_jsonl(Path(spec))]
        return _boxes_from_triplets(rows, root, spec), {"triplets": len(rows)}
    if not spec.endswith(".json"):
        raise RefloopError(f"train_data {spec!r} is neither a domain ({', '.join(DOMAINS)}) nor a .json / .jsonl file")
    records, _ = load_coco(spec, root)
    triplets, counts = sctune_triplets(records, recipe.max_overlap_iou, recipe.min_area_fraction)
    return _boxes_from_triplets([t.to_json() for t in triplets], root, spec), counts.as_dict()


def supervised_pairs(spec: str) -> list[tuple[BoxItem, str]]:
    records, _ = load_data(spec, seed=TRAIN_SEED) if spec in DOMAINS else load_data(spec)
    return [(BoxItem(str(r.path), o.box), o.expressions[0]) for r in records for o in r.objects if o.expressions]


def evaluate(vlm, specs: list[str], boxes: int, out: Path, label: str) -> dict[str, float]:
    results = {}
    for spec in specs:
        records, _ = load_data(spec, num_images=boxes)
        samples = sample_boxes(records, boxes)
        metrics = evaluate_consistency(vlm, samples, out / label / Path(spec).stem, ConsistencyConfig(num_boxes=boxes))
        results[spec] = metrics["consistency_rate"]
    return results


def plot_curves(metrics_path: Path, path: Path) -> Path:
    rows = read_records(metrics_path)
    d = [r for r in rows if r["role"] == "describer"]
    loc = [r for r in rows if r["role"] == "locator"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4), dpi=110)
    a.plot([r["step"] for r in d], [r["reward"] for r in d], ".", markersize=3, label="reward IoU (sampled)")
    a.plot([r["step"] for r in d], [r["baseline_reward"] for r in d], ".", markersize=3, label="baseline IoU")
    a.plot([r["step"] for r in d], [r["consistency"] for r in d], ".", markersize=3, label="Pr@0.5 of samples")
    a.set_title("describer phases (PPO)")
    a.set_xlabel("step")
    a.legend(fontsize=7)
    b.plot([r["step"] for r in loc], [r["loss"] for r in loc], ".", markersize=3, color="#d04a4a")
    b.set_title("locator phases (MLE loss)")
    b.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_sctune(recipe: SCTuneRecipe, out: Path, progress: Callable[[dict], None] | None = None, evaluate_base: bool = True) -> dict:
    import torch

    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(recipe.model_dump_json(indent=2))
    train, filter_counts = training_boxes(recipe)
    if not train:
        raise RefloopError(f"no training boxes left after filtering {recipe.train_data}: {filter_counts}")
    vlm = load_vlm(
        recipe.model,
        device=recipe.device,
        dtype=recipe.dtype,
        batch_size=recipe.sctune.generation_batch_size,
        profile=recipe.profile,
        trust_remote_code=recipe.trust_remote_code,
        processor_options=recipe.processor_options,
    )
    results: dict = {"train_data": recipe.train_data, "train_boxes": len(train), "filter": filter_counts}
    if evaluate_base and recipe.eval_data and PartialState(cpu=recipe.device == "cpu").is_main_process:
        results["base"] = evaluate(vlm, recipe.eval_data, recipe.eval_boxes, out / "eval", "base")
    supervised = supervised_pairs(recipe.supervised_data) if recipe.supervised_data else None
    tuner = SCTune.from_base(vlm, recipe.sctune, train, supervised)
    started = time.perf_counter()
    summary = tuner.run(out / "train", progress=progress)
    results["train_seconds"] = summary["train_seconds"]
    results["wall_seconds"] = time.perf_counter() - started
    results["processes"] = tuner.state.num_processes
    if not tuner.state.is_main_process:
        return results
    tuner.roles.save_adapters(out / "adapters")
    merged = tuner.roles.merged_copy(tuner.final_role)
    merged.save_pretrained(out / "merged")
    save_processor(vlm.processor, out / "merged")
    tuner.roles.use(tuner.final_role, trainable=False)
    if recipe.eval_data:
        results["tuned"] = evaluate(tuner.vlm, recipe.eval_data, recipe.eval_boxes, out / "eval", "tuned")
    plot_curves(out / "train" / "metrics.jsonl", out / "curves.png")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`key.sub=value` strings (value parsed as YAML) applied onto a nested dict."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise RefloopError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_recipe(path: Path | None, overrides: list[str]) -> SCTuneRecipe:
    import yaml
    from pydantic import ValidationError

    data = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise RefloopError(f"recipe not found: {path}") from None
    data = apply_overrides(data, overrides)
    try:
        return SCTuneRecipe.model_validate(data)
    except ValidationError as exc:
        raise RefloopError(f"{path or 'recipe'}: {exc}") from None
