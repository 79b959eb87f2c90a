"""The `refloop` command line."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from refloop.errors import DataError, RefloopError

app = typer.Typer(
    help="refloop: make vision-language models self-consistent about the objects they talk about.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


class OnErrorChoice(str, Enum):
    fail = "fail"
    skip = "skip"


ModelOpt = typer.Option(None, "--model", help="Model directory or hub id (default: the embedded refloop-tiny).")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (bf16 on capable GPUs, else fp32), fp32, bf16 or fp16.")
BatchOpt = typer.Option(64, "--batch-size", min=1, help="Images per generation batch.")
RefDataOpt = typer.Option(..., "--data", help="Shapes-world domain, referring .jsonl, or with --refs a COCO instances .json.")
RefsOpt = typer.Option(None, "--refs", help="RefCOCO/+/g refs file (.json export or the original .p, read safely).")
SplitOpt = typer.Option(None, "--split", help="RefCOCO split to keep (train, val, test, testA, testB).")
ImagesOpt = typer.Option(None, "--images", help="Image root.")
OverwriteOpt = typer.Option(
    False, "--overwrite", help="Replace the outputs of a different earlier run in --out (refused by default; the same run resumes)."
)
OnErrorOpt = typer.Option(OnErrorChoice.fail, "--on-error", help="fail: stop at the first bad record; skip: skip and count.")

ProfileOpt = typer.Option(
    None,
    "--profile",
    help="Prompt profile (refloop-tiny, qwen2-vl, qwen2.5-vl, qwen3-vl, florence-2, kosmos-2, paligemma, internvl); "
    "default: chosen from the checkpoint's model_type.",
)
RemoteOpt = typer.Option(False, "--trust-remote-code", help="Allow a checkpoint's own modelling code (only for checkpoints you trust).")


def _model_spec(model: str | None, device: str, dtype: str, profile: str | None, trust_remote_code: bool):
    """The command's model options, validated (device, dtype) before any weights load."""
    from pydantic import ValidationError

    from refloop.config import ModelSpec

    try:
        return ModelSpec(model=model, device=device, dtype=dtype, profile=profile, trust_remote_code=trust_remote_code)
    except ValidationError as exc:
        problems = "; ".join(f"--{'-'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise RefloopError(f"invalid model options: {problems}") from None


@app.command()
def consistency(
    data: str = typer.Option(
        ..., "--data", help="Shapes-world domain (in-domain, crowded, wild), a COCO-style .json or a referring .jsonl."
    ),
    out: Path = typer.Option(..., "--out", help="Output directory: samples.jsonl, metrics.json, report.html, PNGs."),
    images: Path | None = typer.Option(None, "--images", help="Image root for --data files (default: the file's directory)."),
    model: str | None = ModelOpt,
    num_boxes: int = typer.Option(1000, "--num-boxes", min=1, help="Boxes to evaluate, one per image."),
    seed: int = typer.Option(0, "--seed", help="Seed of the box chosen in each image."),
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    on_error: OnErrorChoice = OnErrorOpt,
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.html with plots and examples."),
    profile: str | None = ProfileOpt,
    trust_remote_code: bool = RemoteOpt,
    overwrite: bool = OverwriteOpt,
) -> None:
    """Self-consistency Pr@0.5 (SC-Tune appendix 6): box -> caption -> box, IoU > 0.5. Resumable."""
    from refloop.data.sources import load_data
    from refloop.evaluation.consistency import ConsistencyConfig, evaluate_consistency, sample_boxes
    from refloop.progress import progress_bar
    from refloop.report.consistency import write_consistency_report

    spec = _model_spec(model, device, dtype, profile, trust_remote_code)
    records, load_report = load_data(data, images, on_error=on_error.value, num_images=num_boxes)
    if load_report.skipped:
        err_console.print(f"skipped {load_report.skipped} bad records: {dict(load_report.reasons)}", markup=False)
    cfg = ConsistencyConfig(num_boxes=num_boxes, seed=seed, batch_size=batch_size)
    samples = sample_boxes(records, cfg.num_boxes, cfg.seed)
    if not samples:
        raise RefloopError(f"{data}: no boxes to evaluate")
    vlm = spec.load_vlm(batch_size)
    with progress_bar(f"consistency {data}", len(samples)) as advance:
        metrics = evaluate_consistency(
            vlm, samples, out, cfg, data_name=data, progress=advance, overwrite=overwrite, on_error=on_error.value
        )
    if load_report.skipped:
        metrics["skipped_records"] = load_report.skipped
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if report:
        path = write_consistency_report(out, metrics)
        console.print(f"report: {path}", markup=False)
    console.print_json(json.dumps(metrics))


@app.command()
def demo(
    out: Path = typer.Option(Path("refloop-demo"), "--out", help="Output directory of the demo."),
    model: str | None = ModelOpt,
    num_boxes: int = typer.Option(1000, "--num-boxes", min=1, help="Boxes per domain."),
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    sctune_domain: str = typer.Option("crowded", "--sctune-domain", help="OOD style whose boxes SC-Tune trains on."),
    sctune: bool = typer.Option(True, "--sctune/--no-sctune", help="Also run a short SC-Tune and add the tuned row."),
) -> None:
    """The main job: self-consistency of refloop-tiny in and out of domain, then SC-Tune, beside SC-Tune's Table 1."""
    from refloop.demo import run_demo
    from refloop.world import DOMAINS

    if sctune and (sctune_domain not in DOMAINS):
        raise RefloopError(f"--sctune-domain {sctune_domain!r} is not a shapes-world domain ({', '.join(DOMAINS)})")
    run_demo(
        out,
        model=model,
        num_boxes=num_boxes,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        console=console,
        sctune_domain=sctune_domain if sctune else None,
    )


@app.command("pretrain-tiny")
def pretrain_tiny(
    out: Path = typer.Option(Path("refloop-tiny"), "--out", help="Where the finished HF checkpoint directory is written."),
    work_dir: Path = typer.Option(Path("runs/pretrain-tiny"), "--work-dir", help="Checkpoints and curves; rerun to resume."),
    config: Path | None = typer.Option(None, "--config", help="YAML file overriding PretrainConfig fields."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Override the number of optimizer steps."),
    seed: int | None = typer.Option(None, "--seed", help="Override the seed."),
) -> None:
    """Train refloop-tiny from scratch on in-domain shapes scenes (deterministic, resumable)."""
    import shutil

    from refloop.config import load_recipe
    from refloop.models.tiny.pretrain import PretrainConfig, pretrain
    from refloop.progress import progress_bar
    from refloop.report.plots import pretrain_curves

    overrides = [f"{k}={v}" for k, v in {"steps": steps, "seed": seed}.items() if v is not None]
    cfg = load_recipe(PretrainConfig, config, overrides)
    with progress_bar("pretrain refloop-tiny", cfg.steps) as advance:

        def on_record(record: dict) -> None:
            advance(1)
            if "rec_acc" in record:
                console.print(
                    f"step {record['step']}: REC {record['rec_acc']:.3f}  REG exact {record['reg_exact']:.3f}  "
                    f"self-consistency {record['self_consistency']:.3f}"
                )

        summary = pretrain(cfg, work_dir, export_dir=out, progress=on_record)
    shutil.copyfile(work_dir / "metrics.jsonl", out / "training_log.jsonl")
    pretrain_curves(work_dir / "metrics.jsonl", out / "learning_curves.png")
    console.print(f"refloop-tiny written to {out} ({summary['elapsed_s'] / 60:.1f} min of training)", markup=False)


@app.command()
def sctune(
    config: Path | None = typer.Option(None, "--config", help="YAML recipe (see configs/sctune-*.yaml)."),
    out: Path = typer.Option(
        ..., "--out", help="Run directory: train/ (checkpoints, metrics.jsonl), adapters/, merged/, eval/, results.json."
    ),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe field, e.g. --set sctune.describer_lr=1e-4 (repeatable)."),
    skip_base_eval: bool = typer.Option(False, "--skip-base-eval", help="Do not evaluate the base model before tuning."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """SC-Tune: describer (PPO on the locator's IoU) and locator (MLE) alternating on one base model. Resumable: rerun the same command."""
    from refloop.config import load_recipe
    from refloop.methods.sctune import schedule
    from refloop.methods.sctune_recipe import SCTuneRecipe, run_sctune
    from refloop.progress import progress_bar

    recipe = load_recipe(SCTuneRecipe, config, overrides)
    total = sum(phase.steps for phase in schedule(recipe.sctune))
    with progress_bar("sc-tune", total) as advance:
        results = run_sctune(recipe, out, progress=lambda row: advance(1), evaluate_base=not skip_base_eval, overwrite=overwrite)
    console.print_json(json.dumps(results))


class EvalTask(str, Enum):
    rec = "rec"
    reg = "reg"


def _referring_records(data: str, images: Path | None, refs: Path | None, split: str | None, on_error: str):
    if refs is not None:
        from refloop.data.formats import load_refcoco

        if images is None:
            raise RefloopError("--refs needs --images (the COCO image directory)")
        return load_refcoco(data, refs, images, split=split, on_error=on_error)
    from refloop.data.sources import load_data

    return load_data(data, images, on_error=on_error)


@app.command("eval")
def evaluate(
    task: EvalTask = typer.Argument(
        ...,
        help="rec: REC accuracy, a predicted box is correct when IoU with the referred box > 0.5 (every expression counts). "
        "reg: one greedy description per referred object, scored against all its expressions (METEOR, CIDEr, BLEU, ROUGE-L).",
    ),
    data: str = RefDataOpt,
    out: Path = typer.Option(..., "--out", help="Output directory: TASK_samples.jsonl (resumable), TASK_metrics.json."),
    refs: Path | None = RefsOpt,
    split: str | None = SplitOpt,
    images: Path | None = ImagesOpt,
    model: str | None = ModelOpt,
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Evaluate only the first N items (rec: (object, expression) pairs; reg: referred objects)."
    ),
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    on_error: OnErrorChoice = OnErrorOpt,
    profile: str | None = ProfileOpt,
    trust_remote_code: bool = RemoteOpt,
    overwrite: bool = OverwriteOpt,
) -> None:
    """Object-level benchmarks of the papers: REC accuracy (`eval rec`) and REG caption metrics (`eval reg`)."""
    from refloop.evaluation.referring import evaluate_rec, evaluate_reg

    spec = _model_spec(model, device, dtype, profile, trust_remote_code)
    records, report = _referring_records(data, images, refs, split, on_error.value)
    vlm = spec.load_vlm(batch_size)
    run = evaluate_rec if task == EvalTask.rec else evaluate_reg
    metrics = run(vlm, records, out, batch_size=batch_size, limit=limit, overwrite=overwrite, on_error=on_error.value)
    if report.skipped:
        metrics["skipped_records"] = report.skipped
    console.print_json(json.dumps(metrics))


@app.command("filter")
def filter_detections(
    detections: Path = typer.Argument(..., help="COCO-style detection JSON (COCO, Objects365, a shapes-world export)."),
    out: Path = typer.Option(..., "--out", help="Triplets JSONL: image_id, category, boxes (xyxy pixels), file_name."),
    images: Path | None = typer.Option(None, "--images", help="Image root (default: the detection file's directory)."),
    exclude: Path | None = typer.Option(
        None, "--exclude", help="JSONL whose image_id fields name held-out images (e.g. a consistency samples.jsonl)."
    ),
    max_overlap_iou: float = typer.Option(0.5, "--max-overlap-iou", help="Drop a triplet whose box overlaps another box above this IoU."),
    min_area_fraction: float = typer.Option(
        0.02, "--min-area-fraction", help="Drop a triplet holding a box smaller than this fraction of the image."
    ),
    on_error: OnErrorChoice = OnErrorOpt,
) -> None:
    """SC-Tune appendix 9: (image, category, boxes) triplets for training, from boxes alone."""
    from refloop.data import JsonlWriter
    from refloop.data.filters import sctune_triplets
    from refloop.data.loaders import iter_jsonl, read_coco_table

    inputs = [p.resolve() for p in (detections, exclude) if p is not None]
    if out.resolve() in inputs:
        raise RefloopError(f"--out {out} is one of the input files; write the triplets elsewhere")
    if out.is_dir():
        raise RefloopError(f"--out {out} is a directory; name a .jsonl file")
    # annotations only: image paths must stay under the image root, but no image file is read (or needed)
    table, report = read_coco_table(detections, images, on_error=on_error.value)
    held_out = set()
    for number, row in iter_jsonl(exclude) if exclude else ():
        image_id = row.get("image_id") if isinstance(row, dict) else None
        if not isinstance(image_id, (str, int)) or isinstance(image_id, bool):
            raise DataError(exclude, f"line {number}", f"expected an object with a string or integer image_id, got {row!r:.80}")
        held_out.add(image_id)
    triplets, counts = sctune_triplets(table, max_overlap_iou, min_area_fraction, held_out)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with JsonlWriter(tmp, key="image_id", resume=False) as writer:
            writer.write_many(t.to_json() for t in triplets)
        os.replace(tmp, out)  # the old file stays whole until the new one is
    except OSError as exc:
        raise RefloopError(f"cannot write {out}: {exc.strerror or exc}") from None
    summary = counts.as_dict() | {"skipped_records": report.skipped}
    console.print_json(json.dumps(summary))
    console.print(f"wrote {counts.triplets_kept} triplets ({counts.boxes_kept} boxes) to {out}", markup=False)


@app.command("export-world")
def export_world(
    domain: str = typer.Option(..., "--domain", help="in-domain, crowded or wild."),
    out: Path = typer.Option(..., "--out", help="Directory for images/, instances.json (COCO) and refs.jsonl."),
    num_images: int = typer.Option(1000, "--num-images", min=1, help="Scenes to export."),
    seed: int = typer.Option(1, "--seed", help="Scene seed (0: training scenes, 1: evaluation scenes)."),
) -> None:
    """Write a shapes-world split as COCO-style detection JSON + referring JSONL + PNG images."""
    from refloop.world import DOMAINS
    from refloop.world.export import export_split

    if domain not in DOMAINS:
        raise RefloopError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    path = export_split(domain, out, num_images, seed)
    console.print(f"exported {num_images} scenes of {domain} to {path}", markup=False)


@app.command()
def inspect(
    model: str | None = ModelOpt,
    profile: str | None = ProfileOpt,
    max_pixels: int | None = typer.Option(None, "--max-pixels", help="Image pixel budget passed to the processor (Qwen-VL)."),
    trust_remote_code: bool = RemoteOpt,
) -> None:
    """What refloop will do with a checkpoint, without loading its weights: the chosen prompt profile,
    prompts and answer for an example box, the box codec, and the LoRA targets (vision excluded)."""
    from refloop.models import default_model_path
    from refloop.models.inspect import inspect_checkpoint

    options = {"max_pixels": max_pixels} if max_pixels else None
    console.print_json(json.dumps(inspect_checkpoint(model or default_model_path(), profile, options, trust_remote_code)))


def main() -> None:
    try:
        app()
    except RefloopError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
