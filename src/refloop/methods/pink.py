"""Pink's self-consistent bootstrapping (paper 001, Sec. 3.3 and Fig. 3, Sec. 4.1, appendix A.2).

Detection boxes become referring-expression / box pairs in two stages (Sec. 3.3):
1. bounding-box description bootstrapping: the model describes box B (grounding caption, REG);
2. self-consistent filtering: the same model locates its description D_B (visual grounding, REC)
   and the pair is kept when IoU(B, B_hat) >= lambda, lambda = 0.5 (Sec. 4.1). The stored box is
   the annotated B, never B_hat (the authors' release).
Both stages are one call of the shared describe-then-locate cycle. Before them, appendix A.2's
filters: images with more than 15 objects are skipped, and so are boxes under 2000 pixels (the
paper says "more than 2,000"; the release skips boxes under it: they differ only at exactly 2000).

Beyond Pink, both off by default:
- `samples` K: the greedy description plus K-1 sampled ones per box; the most consistent candidate
  that passes every rule is kept;
- `distractor_check`: a description whose located box overlaps another box of the target's
  category at least as well as the target fits two objects, so it is no referring expression.

Every candidate, its located box, IoU and decision (with the rejection reason) is recorded, one
record per image in records.jsonl; the dataset files and Table 5's counts are made from those
records below this module (`data.bootstrapped`, `report.bootstrap`). The run is the shared sharded pass (`data.shards.ShardedRun`:
resumable by image id, batch b on process b mod P, sampling seeded per batch), so a batch's
records are the same whichever process runs it and however often the run was killed, and the
outputs equal a one-process run's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from refloop.boxes import Box, iou_matrix
from refloop.cycle import Consistency, CycleResult, describe_then_locate
from refloop.data.bootstrapped import (
    DISTRACTOR,
    EMPTY,
    INCONSISTENT,
    KEPT,
    NOT_CHOSEN,
    RECORDS,
    REJECTED,
    SKIPPED,
    SMALL_BOX,
    TOO_MANY_OBJECTS,
    UNREADABLE,
    write_bootstrapped,
    write_stats,
)
from refloop.data.records import ImageRecord, ObjectAnnotation
from refloop.data.shards import ShardedRun, readable
from refloop.limits import BatchSize, NewTokens, Samples, Seed
from refloop.models.base import VLM, GenerateOptions
from refloop.runs import earlier_value, model_fingerprint, records_digest, shared_run_directory
from refloop.seeding import step_seed

# A.2's 2000 px is 0.65% of a 640x480 COCO / Objects365-sized image; the same share of a 112x112 scene.
SHAPES_MIN_AREA_PX = 82.0


class BootstrapConfig(BaseModel):
    """Defaults are Pink's (Sec. 4.1, appendix A.2, the authors' release); `samples` and
    `distractor_check` go beyond the paper and are off by default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    iou_lambda: float = Field(0.5, ge=0, le=1, description="lambda: keep a description when IoU(B, B_hat) >= lambda (Sec. 3.3, 4.1)")
    max_objects: int = Field(15, ge=1, description="skip images with more objects than this (A.2)")
    min_area_px: float = Field(2000.0, ge=0, description="skip boxes under this many pixels (A.2); shapes world: SHAPES_MIN_AREA_PX")
    samples: Samples = Field(1, description="K: the greedy description plus K-1 sampled ones per box (Pink: 1, greedy)")
    distractor_check: bool = Field(False, description="reject a description located on another box of the target's category as well")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the K-1 sampled descriptions")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus mass of the K-1 sampled descriptions")
    max_new_tokens: NewTokens = Field(32, description="longest description generated")
    batch_size: BatchSize = Field(64, description="images per batch; all their boxes go to the model together")
    seed: Seed = Field(0, description="seed of the sampled descriptions (one stream per batch)")

    @classmethod
    def shapes(cls, **fields) -> BootstrapConfig:
        """The shapes-world recipe: A.2's area filter scaled to 112 px scenes."""
        return cls(**({"min_area_px": SHAPES_MIN_AREA_PX} | fields))


# ---- the rules ----------------------------------------------------------------------------------
def skip_reason(record: ImageRecord, target: ObjectAnnotation, cfg: BootstrapConfig) -> str | None:
    """Appendix A.2: images with more than `max_objects` objects, boxes under `min_area_px`."""
    if len(record.objects) > cfg.max_objects:
        return TOO_MANY_OBJECTS
    if target.box.area < cfg.min_area_px:
        return SMALL_BOX
    return None


def distractor_iou(located: Box | None, objects: Sequence[ObjectAnnotation], target: int) -> float | None:
    """The best IoU of the located box with another object of the target's category (None: no
    located box, or no such object)."""
    others = [o.box for j, o in enumerate(objects) if j != target and o.category == objects[target].category]
    if located is None or not others:
        return None
    return float(iou_matrix([located], others).max())


def rejection(expression: str, consistent: bool, iou: float, distractor: float | None, cfg: BootstrapConfig) -> str | None:
    """Why a candidate is rejected, None when it passes: an empty description, IoU below lambda
    (Sec. 3.3), or with the distractor check a same-category box found at least as well."""
    if not expression.strip():
        return EMPTY
    if not consistent:
        return INCONSISTENT
    if cfg.distractor_check and distractor is not None and distractor >= iou:
        return DISTRACTOR
    return None


def choose(candidates: Sequence[dict]) -> int:
    """The most consistent candidate that passes every rule, else the most consistent of all (its
    reason is the box's); the first on ties, so greedy wins a tie with a sample."""
    passing = [j for j, c in enumerate(candidates) if c["reason"] is None]
    return max(passing or range(len(candidates)), key=lambda j: candidates[j]["iou"])


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


# ---- one batch: A.2's filters, then Sec. 3.3's two stages ------------------------------------------
class _Target(NamedTuple):
    """A box left by A.2's filters: its entry in the output record, its image record, its index
    among the record's objects and the decoded image."""

    entry: dict
    record: ImageRecord
    index: int
    image: Image.Image


def bootstrap_batch(
    vlm: VLM,
    batch: Sequence[tuple[int, ImageRecord]],
    cfg: BootstrapConfig,
    batch_seed: int,
    on_error: str = "fail",
    grammar: bool = False,
) -> list[dict]:
    """One record per (index, image) of `batch`: each box with its candidates and decision.
    `grammar`: mark candidates found among the target's reference expressions."""
    entries = [_image_entry(index, record, cfg) for index, record in batch]
    # Pixels only of images with a box left by the filters, under the failure policy.
    wanted = [(e, r) for e, (_, r) in zip(entries, batch, strict=True) if any(b["reason"] is None for b in e["boxes"])]
    loaded, images = readable(wanted, lambda item: item[1].load_image(), on_error, [])
    decoded = {e["index"] for e, _ in loaded}
    for entry, _ in wanted:
        if entry["index"] not in decoded:  # on_error="skip": counted, never described
            entry["skip"] = UNREADABLE
            for box in entry["boxes"]:
                box["decision"], box["reason"] = SKIPPED, box["reason"] or UNREADABLE
    targets = [
        _Target(box, record, k, image)
        for (entry, record), image in zip(loaded, images, strict=True)
        for k, box in enumerate(entry["boxes"])
        if box["reason"] is None
    ]
    if not targets:
        return entries
    row_images, row_boxes = [t.image for t in targets], [t.record.objects[t.index].box for t in targets]
    keep = Consistency(cfg.iou_lambda, inclusive=True)  # IoU(B, B_hat) >= lambda, Sec. 3.3 / 4.1
    # Sec. 3.3, stage 1 "bounding box description bootstrapping": the model's grounding caption D_B
    # of each box B; stage 2 "self-consistent filtering": D_B located again (B_hat) and IoU(B, B_hat).
    # Both in one describe-then-locate call, greedy as Pink.
    cycles = [describe_then_locate(vlm, vlm, row_images, row_boxes, GenerateOptions(max_new_tokens=cfg.max_new_tokens), consistency=keep)]
    if cfg.samples > 1:  # beyond Pink: K-1 sampled descriptions, one seed per batch wherever it runs
        torch.manual_seed(batch_seed)
        sampled = GenerateOptions(
            do_sample=True,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            num_return_sequences=cfg.samples - 1,
        )
        cycles.append(describe_then_locate(vlm, vlm, row_images, row_boxes, sampled, consistency=keep))
    for t, target in enumerate(targets):
        rows = [(cycle, row) for cycle in cycles for row in range(t * cycle.samples, (t + 1) * cycle.samples)]
        candidates = [
            _candidate(sample, cycle, row, target.record.objects, target.index, cfg, grammar) for sample, (cycle, row) in enumerate(rows)
        ]
        _decide(target.entry, candidates)  # Sec. 3.3: D_B "removed if the IoU between B and B_hat is below lambda"
    return entries


def _image_entry(index: int, record: ImageRecord, cfg: BootstrapConfig) -> dict:
    boxes = []
    for target in record.objects:
        reason = skip_reason(record, target, cfg)
        boxes.append(
            {
                "ann_id": target.ann_id,
                "category": target.category,
                "box": target.box.as_list(),
                "area": target.box.area,
                "decision": SKIPPED if reason else None,
                "reason": reason,
                "chosen": None,
                "candidates": [],
            }
        )
    skip = TOO_MANY_OBJECTS if len(record.objects) > cfg.max_objects else None
    return {
        "index": index,  # first: the merge reads it from the line's head
        "image_id": record.image_id,
        "file_name": record.file_name,
        "width": record.width,
        "height": record.height,
        "skip": skip,
        "boxes": boxes,
    }


def _candidate(
    sample: int, cycle: CycleResult, row: int, objects: Sequence[ObjectAnnotation], target: int, cfg: BootstrapConfig, grammar: bool
) -> dict:
    located, iou, expression = cycle.located[row], float(cycle.iou[row]), cycle.expressions[row]
    distractor = distractor_iou(located.box, objects, target)
    unique = _normal(expression) in {_normal(e) for e in objects[target].expressions} if grammar else None
    return {
        "sample": sample,  # 0: greedy; 1..K-1: sampled
        "expression": expression,
        "located_box": located.box.as_list() if located.box else None,
        "located_text": located.text,
        "iou": iou,
        "distractor_iou": distractor,
        "grammar_unique": unique,
        "decision": None,
        "reason": rejection(expression, bool(cycle.consistent[row]), iou, distractor, cfg),
    }


def _decide(box: dict, candidates: list[dict]) -> None:
    best = choose(candidates)
    kept = candidates[best]["reason"] is None
    for j, c in enumerate(candidates):
        c["decision"] = KEPT if kept and j == best else REJECTED
        if j != best and c["reason"] is None:
            c["reason"] = NOT_CHOSEN
    box.update(decision=candidates[best]["decision"], reason=candidates[best]["reason"], chosen=best, candidates=candidates)


# ---- the run ------------------------------------------------------------------------------------
def bootstrap(
    vlm: VLM,
    records: Sequence[ImageRecord],
    out_dir: Path,
    cfg: BootstrapConfig,
    data: str = "",
    image_root: Path | None = None,
    grammar: bool | None = None,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
    on_error: str = "fail",
    write_report: bool = True,
    extra_stats: dict | None = None,
) -> dict | None:
    """Bootstrap every box of `records` into `out_dir`; rerun to resume. Under `accelerate launch`
    (initialise `PartialState` before loading the model) each process runs its share of the
    batches; the main process writes the outputs and returns the stats (the others return None).
    `grammar` (default: whether any object carries expressions) adds the grammar-unique shares."""
    grammar = any(o.expressions for r in records for o in r.objects) if grammar is None else grammar
    fingerprint = {
        "task": "bootstrap",
        "model": model_fingerprint(vlm),
        "data": {"name": data, "image_root": str(image_root or ""), "records": records_digest(records)},
        "config": cfg.model_dump(mode="json"),
    }
    meta = {"model": getattr(vlm, "name", "model"), "data": data, "image_root": str(image_root or "")} | (extra_stats or {})
    with shared_run_directory(out_dir, fingerprint, overwrite) as state:
        return bootstrap_pass(vlm, list(records), Path(out_dir), cfg, state, grammar, progress, on_error, write_report, meta)


def bootstrap_pass(vlm, records, out_dir: Path, cfg, state, grammar, progress, on_error, write_report, meta) -> dict | None:
    """The sharded pass over the images (in a run directory already held), then the outputs."""
    started = time.perf_counter()
    run = ShardedRun(out_dir / RECORDS, list(enumerate(records)), lambda item: item[1].image_id, cfg.batch_size, "image_id", state)
    described = 0
    for batch in run.batches(progress=progress):
        # The whole batch reruns, so a batch cut short by a kill gives the same records again.
        entries = bootstrap_batch(vlm, batch.items, cfg, step_seed(cfg.seed, batch.number, "torch"), on_error, grammar)
        todo = [e for e in entries if e["image_id"] not in run.done]
        run.write(todo)
        described += sum(bool(box["candidates"]) for e in todo for box in e["boxes"])
    described = run.total(described)
    elapsed = time.perf_counter() - started
    run.finish()
    if not state.is_main_process:
        return None
    # a rerun that found every image done described none: the rate stays the run's that did
    rate = described / elapsed if described and elapsed > 0 else earlier_value(out_dir / "stats.json", "boxes_per_second")
    meta = meta | {"processes": state.num_processes, "boxes_per_second": rate, "boxes_described_now": described}
    return write_outputs(records, out_dir, cfg, grammar, meta, write_report)


def write_outputs(
    records: Sequence[ImageRecord], out_dir: Path, cfg: BootstrapConfig, grammar: bool, meta: dict, write_report: bool
) -> dict:
    """The dataset files of the kept pairs (`data.bootstrapped`), Table 5's counts in stats.json
    and, with `write_report`, report.html."""
    stats, examples = write_bootstrapped(records, out_dir, grammar)
    settings = {"samples": cfg.samples, "iou_lambda": cfg.iou_lambda, "distractor_check": cfg.distractor_check}
    result = stats.as_dict(settings) | meta | {"config": cfg.model_dump(mode="json")}
    # pairs.jsonl names images by file_name: images held only inside the data (a parquet's bytes) have no file to name
    result["images_in_data_file"] = any(r.data is not None for r in records)
    if write_report:
        from refloop.report.bootstrap import write_bootstrap_report

        write_bootstrap_report(out_dir, result, examples, stats.ious)
    write_stats(out_dir, result)
    return result
