"""The object-level evaluations of the papers: REC accuracy at IoU >= 0.5 on every (object,
expression) pair, and REG caption metrics of one greedy description per referred object against
all its expressions. Prompts come from the model's profile: deterministic, no random templates.

REC accuracy counts a prediction right at IoU >= 0.5 (`refloop.cycle.REC_ACCURACY`), as lmms-eval's
RefCOCO utils and Qwen-VL's evaluate_grounding do; SC-Tune's Pr@0.5 (`evaluation.consistency`)
keeps its paper's IoU > 0.5. Unlike lmms-eval, a predicted box is clipped to the image and an
inverted or unparseable one scores IoU 0 (lmms-eval raises ZeroDivisionError on those)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from refloop.cycle import REC_ACCURACY, Consistency, locate_boxes
from refloop.data.loaders import LoadReport
from refloop.data.records import ImageRecord
from refloop.data.shards import ShardedRun, share
from refloop.errors import RefloopError
from refloop.evaluation.captions import caption_metrics
from refloop.models.base import VLM
from refloop.models.spec import ModelSpec
from refloop.runs import model_fingerprint, records_digest, release_outputs, shared_run_directory, write_text_whole


def rec_pairs(records: list[ImageRecord], limit: int | None = None) -> list[tuple[str, ImageRecord, int, str]]:
    pairs = []
    for rec in records:
        for i, obj in enumerate(rec.objects):
            for j, expr in enumerate(obj.expressions):
                pairs.append((f"{rec.image_id}:{obj.ann_id if obj.ann_id is not None else i}:{j}", rec, i, expr))
    return pairs[:limit] if limit else pairs


def evaluate_rec(
    vlm: VLM,
    records: list[ImageRecord],
    out: Path,
    batch_size: int = 64,
    limit: int | None = None,
    rule: Consistency = REC_ACCURACY,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
    on_error: str = "fail",
) -> dict:
    """REC accuracy over every (object, expression) pair; an image that does not decode stops the
    run, or with on_error="skip" drops its pairs (counted as `skipped_images`, retried on resume).
    `rule`: when a prediction counts as right (default IoU >= 0.5); the samples hold every IoU, so
    another rule rescoring the same directory asks nothing again."""
    with shared_run_directory(out, _fingerprint("rec", vlm, records) | {"iou_threshold": rule.threshold}, overwrite) as state:
        return _evaluate_rec(vlm, records, out, batch_size, limit, rule, progress, on_error, state)


def rec_accuracy(ious: Sequence[float], rule: Consistency = REC_ACCURACY) -> float:
    """The share of IoUs `rule` counts as right (IoU >= 0.5 by default; 0.0 for none)."""
    return sum(bool(rule(iou)) for iou in ious) / len(ious) if len(ious) else 0.0


def _fingerprint(task: str, vlm: VLM, records: list[ImageRecord]) -> dict:
    paths = hashlib.sha256("|".join(str(r.path) for r in records).encode()).hexdigest()[:16]
    return {
        "task": task,
        "model": model_fingerprint(vlm),
        "data": sorted({str(r.source) for r in records}),
        "records": records_digest(records) + paths,  # another file's content or image root is another run
    }


def _evaluate_rec(vlm, records, out, batch_size, limit, rule, progress, on_error, state) -> dict:
    """Sharded across the processes of an `accelerate launch` (see `ShardedRun`)."""
    pairs = rec_pairs(records, limit)
    run = ShardedRun(out / "rec_samples.jsonl", pairs, lambda pair: pair[0], batch_size, state=state)
    for batch in run.batches(lambda pair: pair[1].load_image(), on_error, progress):
        chunk, images = batch.items, batch.images
        targets = [rec.objects[i].box for _, rec, i, _ in chunk]
        located, ious = locate_boxes(vlm, images, [expr for *_, expr in chunk], targets)
        run.write(
            {
                "id": pid,
                "image": str(rec.path),
                "expression": expr,
                "box": rec.objects[i].box.as_list(),
                "predicted_box": loc.box.as_list() if loc.box else None,
                "answer": loc.text,
                "iou": float(iou),
            }
            for (pid, rec, i, expr), loc, iou in zip(chunk, located, ious, strict=True)
        )
    skipped = run.finish()
    rows = run.rows()
    metrics = {
        "rec_accuracy": rec_accuracy([r["iou"] for r in rows], rule),
        "num": len(rows),
        "parse_failure_rate": sum(r["predicted_box"] is None for r in rows) / max(len(rows), 1),
        "mean_iou": sum(r["iou"] for r in rows) / max(len(rows), 1),
        "iou_threshold": rule.threshold,
        "iou_rule": rule.rule,
    }
    if skipped:
        metrics["skipped_images"] = skipped
    if state.is_main_process:
        write_text_whole(out / "rec_metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def evaluate_reg(
    vlm: VLM,
    records: list[ImageRecord],
    out: Path,
    batch_size: int = 64,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    java: bool | None = None,
    overwrite: bool = False,
    on_error: str = "fail",
) -> dict:
    """One greedy description per referred object, scored against all its expressions; failure
    policy for undecodable images as in `evaluate_rec`."""
    with shared_run_directory(out, _fingerprint("reg", vlm, records), overwrite) as state:
        return _evaluate_reg(vlm, records, out, batch_size, limit, progress, java, on_error, state)


def reg_objects(records: list[ImageRecord], limit: int | None = None) -> list[tuple[str, ImageRecord, object]]:
    """The referred objects `eval reg` describes: (id, record, object), the first `limit`."""
    objects = [
        (f"{rec.image_id}:{obj.ann_id if obj.ann_id is not None else i}", rec, obj)
        for rec in records
        for i, obj in enumerate(rec.objects)
        if obj.expressions
    ]
    return objects[:limit] if limit else objects


def _evaluate_reg(vlm, records, out, batch_size, limit, progress, java, on_error, state) -> dict:
    """Sharded across the processes of an `accelerate launch` (see `ShardedRun`)."""
    objects = reg_objects(records, limit)
    run = ShardedRun(out / "reg_samples.jsonl", objects, lambda obj: obj[0], batch_size, state=state)
    for batch in run.batches(lambda obj: obj[1].load_image(), on_error, progress):
        chunk, images = batch.items, batch.images
        captions = vlm.describe(images, [obj.box for _, _, obj in chunk])
        run.write(
            {"id": oid, "image": str(rec.path), "box": obj.box.as_list(), "prediction": cap, "references": list(obj.expressions)}
            for (oid, rec, obj), cap in zip(chunk, captions, strict=True)
        )
    skipped = run.finish()
    rows = run.rows()
    empty = sum(not r["prediction"].strip() for r in rows)
    if rows and empty < len(rows):
        metrics = caption_metrics({r["id"]: r["prediction"] for r in rows}, {r["id"]: r["references"] for r in rows}, java=java)
        del metrics["samples"]
    else:  # no text to score: the metrics are undefined, not 0
        reason = f"all {len(rows)} predictions are empty (the model wrote no description)" if rows else "no object was described"
        scores = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr", "METEOR")
        metrics = dict.fromkeys(scores) | {"num": len(rows), "undefined": reason}
    metrics["empty_predictions"] = empty
    if skipped:
        metrics["skipped_images"] = skipped
    if state.is_main_process:
        write_text_whole(out / "reg_metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def load_referring_data(data: str, images: Path | None = None, refs: Path | None = None, split: str | None = None, on_error: str = "fail"):
    """Records with expressions: a RefCOCO/+/g `refs` file over a COCO instances `data` file, or
    what `--data` names (a referring JSONL, a parquet dataset, a shapes-world domain)."""
    if refs is not None:
        from refloop.data.formats import load_refcoco

        if images is None:
            raise RefloopError("--refs needs --images (the COCO image directory)")
        return load_refcoco(data, refs, images, split=split, on_error=on_error)
    from refloop.data.sources import load_data

    return load_data(data, images, on_error=on_error)


def run_referring_eval(
    task: str,
    spec: ModelSpec,
    data: str,
    out: Path,
    images: Path | None = None,
    refs: Path | None = None,
    split: str | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    on_error: str = "fail",
    overwrite: bool = False,
    progress: bool = False,
    report: bool = True,
) -> tuple[dict, LoadReport] | None:
    """`refloop eval rec` / `eval reg`: the referring data loaded (a shapes-world domain exported
    once, by the main process), the run, and with `report` report.html. The main process returns
    the metrics and the data's load report; the others None. `progress`: show a progress bar (on
    the main process)."""
    from refloop.progress import progress_bar
    from refloop.report.referring import REPORT_FILES, write_rec_report, write_reg_report

    if split is not None and refs is None:
        raise RefloopError("--split names a split of the --refs file (RefCOCO's refs); without --refs it would be ignored")
    state = spec.process_state()
    with state.main_process_first():
        records, loaded = load_referring_data(data, images, refs, split, on_error)
    total = len(rec_pairs(records, limit) if task == "rec" else reg_objects(records, limit))
    if not total:
        if refs is not None and split is not None and not loaded.skipped:
            raise RefloopError(f"{refs}: no referring expression in split {split!r} (RefCOCO: val, testA, testB; RefCOCOg: val, test)")
        where = "a referring .jsonl, RefCOCO refs or a shapes-world domain"
        raise RefloopError(f"{data}: no referring expressions to evaluate (`eval {task}` reads {where}){loaded.skipped_note()}")
    vlm = spec.load_vlm(batch_size, generation=True)
    run = evaluate_rec if task == "rec" else evaluate_reg
    with progress_bar(f"{task} {data}", share(total, batch_size), enabled=progress and state.is_main_process) as advance:
        metrics = run(vlm, records, out, batch_size=batch_size, limit=limit, progress=advance, overwrite=overwrite, on_error=on_error)
    if not state.is_main_process:
        return None
    if loaded.skipped:  # the metrics file people keep says its numbers are of a subset
        metrics["skipped_records"] = loaded.skipped
        write_text_whole(Path(out) / f"{task}_metrics.json", json.dumps(metrics, indent=2) + "\n")
    if report:
        write = write_rec_report if task == "rec" else write_reg_report
        write(Path(out), metrics, vlm.name, str(data), {str(r.path): r.load_image for r in records})
    else:  # an earlier run's report would stand beside other results
        release_outputs(Path(out), *(Path(out) / name for name in REPORT_FILES[task]))
    return metrics, loaded
