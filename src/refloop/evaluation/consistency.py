"""Self-consistency evaluation (SC-Tune, Sec. 1 and appendix 6).

For one box per image, the describe-then-locate cycle with greedy decoding: the model describes
the box with its REG prompt, then locates its own description with its REC prompt; the sample
is consistent when IoU(box, located) > 0.5. Pr@0.5 is the consistent fraction. When the data
carries referring expressions, REC accuracy on the first (canonical) expression is measured in
the same run, by the REC rule (IoU >= the same threshold, `refloop.cycle.REC_ACCURACY`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from accelerate import PartialState
from pydantic import BaseModel, ConfigDict, Field

from refloop.cycle import REC_ACCURACY, SC_TUNE_CONSISTENCY, Consistency, describe_then_locate, locate_boxes
from refloop.data.loaders import LoadReport
from refloop.data.records import ImageRecord, ObjectAnnotation
from refloop.data.shards import ShardedRun, share
from refloop.errors import RefloopError
from refloop.limits import BatchSize, NewTokens, Seed
from refloop.models.base import VLM, GenerateOptions
from refloop.models.spec import ModelSpec
from refloop.runs import earlier_value, files_digest, model_fingerprint, release_outputs, shared_run_directory, write_text_whole

log = logging.getLogger(__name__)


class ConsistencyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_boxes: int = Field(1000, ge=1, description="boxes to evaluate, one per image (the paper: 4000)")
    seed: Seed = Field(0, description="seed of the box choice within each image")
    iou_threshold: float = Field(SC_TUNE_CONSISTENCY.threshold, ge=0, le=1, description="consistent when IoU is above this (Pr@0.5)")
    batch_size: BatchSize = Field(64, description="images per generation batch")
    max_new_tokens: NewTokens = Field(32, description="longest caption generated")


@dataclass(frozen=True)
class BoxSample:
    sample_id: str
    record: ImageRecord
    target: ObjectAnnotation


def sample_boxes(records: list[ImageRecord], num_boxes: int, seed: int = 0) -> list[BoxSample]:
    """One box per image (appendix 6: every box from a different image), images in file order."""
    rng = random.Random(seed)
    out = []
    for rec in records:
        if len(out) >= num_boxes:
            break
        if not rec.objects:
            continue
        target = rec.objects[rng.randrange(len(rec.objects))]
        out.append(BoxSample(sample_id=f"{rec.image_id}:{target.ann_id}", record=rec, target=target))
    return out


def summarize(rows: list[dict], consistency: Consistency = SC_TUNE_CONSISTENCY) -> dict:
    n = len(rows)
    if n == 0:
        return {"num_boxes": 0, "consistency_rate": 0.0, "mean_iou": 0.0, "parse_failure_rate": 0.0}
    metrics = {
        "num_boxes": n,
        "consistency_rate": sum(bool(consistency(r["iou"])) for r in rows) / n,
        "mean_iou": sum(r["iou"] for r in rows) / n,
        "parse_failure_rate": sum(r["predicted_box"] is None for r in rows) / n,
    }
    rec_rows = [r for r in rows if r.get("rec_iou") is not None]
    if rec_rows:
        rec_rule = replace(REC_ACCURACY, threshold=consistency.threshold)
        metrics["rec_accuracy"] = sum(bool(rec_rule(r["rec_iou"])) for r in rec_rows) / len(rec_rows)
        metrics["rec_num"] = len(rec_rows)
    return metrics


def evaluate_consistency(
    vlm: VLM,
    samples: list[BoxSample],
    out_dir: Path,
    cfg: ConsistencyConfig,
    data_name: str = "",
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
    on_error: str = "fail",
) -> dict:
    """Run the loop, append per-sample JSONL (resumable by sample id), write metrics.json. The
    directory is locked while written and refuses samples of another model, data or decoding.
    `data_name`: the data file or domain the samples come from (the CLI passes it): its content
    identifies the run, so more or fewer boxes of the same data resume by id. Without it the
    samples themselves do (every image and box), so other data is never taken for this run's."""
    if 0 < len(samples) < cfg.num_boxes and PartialState().is_main_process:
        log.warning(
            f"{data_name}: {len(samples)} boxes evaluated, not {cfg.num_boxes} (num_boxes): one box per image "
            f"(SC-Tune appendix 6), and {len(samples)} images have a box"
        )
    fingerprint = {
        "task": "consistency",
        "model": model_fingerprint(vlm),
        "data": data_name,
        # what the sample ids stand for: the data file's content and where its images are (more or fewer
        # boxes of the same data resume by id; another file, changed in place, or another image root does not)
        "data_files": files_digest(data_name),
        "first_image": str(samples[0].record.path) if samples else "",
        "seed": cfg.seed,
        "max_new_tokens": cfg.max_new_tokens,
        "iou_threshold": cfg.iou_threshold,
    }
    if not data_name:  # the Python API without a data name: the samples are the data
        shown = json.dumps([[s.sample_id, str(s.record.path), s.target.box.as_list()] for s in samples])
        fingerprint["samples"] = hashlib.sha256(shown.encode()).hexdigest()[:16]
    with shared_run_directory(out_dir, fingerprint, overwrite) as state:
        return _evaluate(vlm, samples, out_dir, cfg, data_name, progress, on_error, state)


def _evaluate(
    vlm: VLM, samples: list[BoxSample], out_dir: Path, cfg: ConsistencyConfig, data_name: str, progress, on_error: str, state
) -> dict:
    """Sharded under `accelerate launch` (see `ShardedRun`): samples.jsonl equals one process's."""
    samples_path = out_dir / "samples.jsonl"
    options = GenerateOptions(max_new_tokens=cfg.max_new_tokens)  # greedy, as the protocol says
    consistency = Consistency(cfg.iou_threshold)
    started, evaluated = time.perf_counter(), 0
    run = ShardedRun(samples_path, samples, lambda s: s.sample_id, cfg.batch_size, state=state)
    for batch in run.batches(lambda s: s.record.load_image(), on_error, progress):
        chunk, images = batch.items, batch.images
        targets = [s.target.box for s in chunk]
        cycle = describe_then_locate(vlm, vlm, images, targets, options, consistency=consistency)
        with_expr = [i for i, s in enumerate(chunk) if s.target.expressions]
        rec_iou: dict[int, float] = {}
        if with_expr:
            expressions = [chunk[i].target.expressions[0] for i in with_expr]
            _, ious = locate_boxes(vlm, [images[i] for i in with_expr], expressions, [targets[i] for i in with_expr])
            rec_iou = {i: float(v) for i, v in zip(with_expr, ious, strict=True)}
        rows = []
        for i, (s, cap, loc, iou) in enumerate(zip(chunk, cycle.expressions, cycle.located, cycle.iou, strict=True)):
            rows.append(
                {
                    "id": s.sample_id,
                    "image": str(s.record.path),
                    "image_id": s.record.image_id,
                    "box": s.target.box.as_list(),
                    "category": s.target.category,
                    "caption": cap,
                    "located_text": loc.text,
                    "predicted_box": loc.box.as_list() if loc.box else None,
                    "iou": float(iou),
                    "consistent": bool(consistency(iou)),
                    "reference_expression": s.target.expressions[0] if s.target.expressions else None,
                    "rec_iou": rec_iou.get(i),
                }
            )
        run.write(rows)
        evaluated += len(rows)
    elapsed = time.perf_counter() - started
    evaluated = run.total(evaluated)
    skipped_count = run.finish()
    rows = run.rows()
    metrics = summarize(rows, consistency)
    metrics.update(
        {
            "boxes_per_second": (evaluated / elapsed)
            if evaluated and elapsed > 0
            else earlier_value(out_dir / "metrics.json", "boxes_per_second"),
            "boxes_evaluated_now": evaluated,  # 0: every box was done, the rate is the earlier run's
            "model": getattr(vlm, "name", "model"),
            "data": data_name,
            "iou_threshold": cfg.iou_threshold,
        }
    )
    if skipped_count:
        metrics["skipped_images"] = skipped_count
    if state.num_processes > 1:
        metrics["processes"] = state.num_processes
    if state.is_main_process:
        with open(samples_path) as f:
            held = sum(1 for line in f if line.strip())
        if held > len(rows):  # rows of boxes this run did not ask (an earlier, larger run): they stay, the metrics read these
            metrics["samples_file_rows"] = held
            log.warning(f"{samples_path} holds {held} rows (an earlier run here evaluated more); metrics read the {len(rows)} asked for")
        write_text_whole(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def run_consistency(
    spec: ModelSpec,
    data: str,
    out: Path,
    cfg: ConsistencyConfig,
    images: Path | None = None,
    on_error: str = "fail",
    report: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> tuple[dict, LoadReport, Path | None] | None:
    """`refloop consistency`: `data` loaded (a shapes-world domain exported once, by the main
    process), one box per image, the evaluation, and with `report` report.html. The main process
    returns the metrics, the data's load report and the report's path; the others None.
    `progress`: show a progress bar."""
    from refloop.data.sources import load_data
    from refloop.progress import progress_bar
    from refloop.report.consistency import REPORT_FILES, write_consistency_report

    state = spec.process_state()
    with state.main_process_first():
        records, load_report = load_data(data, images, on_error=on_error, num_images=cfg.num_boxes)
    samples = sample_boxes(records, cfg.num_boxes, cfg.seed)
    if not samples:
        raise RefloopError(f"{data}: no boxes to evaluate{load_report.skipped_note()}")
    vlm = spec.load_vlm(cfg.batch_size, generation=True)
    with progress_bar(f"consistency {data}", share(len(samples), cfg.batch_size), enabled=progress) as advance:
        metrics = evaluate_consistency(vlm, samples, out, cfg, data_name=data, progress=advance, overwrite=overwrite, on_error=on_error)
    if not state.is_main_process:  # the main process merged the shards and reports
        return None
    if load_report.skipped:
        metrics["skipped_records"] = load_report.skipped
        write_text_whole(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    path = write_consistency_report(out, metrics, images={str(s.record.path): s.record.load_image for s in samples}) if report else None
    if not report:  # an earlier run's report would stand beside other results
        release_outputs(Path(out), *(Path(out) / name for name in REPORT_FILES))
    return metrics, load_report, path
