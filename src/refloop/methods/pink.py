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
record per image in records.jsonl. The run is the shared sharded pass (`data.shards.ShardedRun`:
resumable by image id, batch b on process b mod P, sampling seeded per batch), so a batch's
records are the same whichever process runs it and however often the run was killed, and the
outputs equal a one-process run's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from refloop.boxes import Box, iou_matrix
from refloop.cycle import Consistency, CycleResult, describe_then_locate
from refloop.data.jsonl import iter_records
from refloop.data.records import ImageRecord, ObjectAnnotation
from refloop.data.shards import ShardedRun, readable
from refloop.data.sources import Detections, load_detections  # noqa: F401  (re-exported: bootstrap's input)
from refloop.errors import RefloopError
from refloop.limits import BatchSize, NewTokens, Samples, Seed
from refloop.models.base import VLM, GenerateOptions
from refloop.runs import model_fingerprint, records_digest, shared_run_directory
from refloop.seeding import step_seed

# A.2's 2000 px is 0.65% of a 640x480 COCO / Objects365-sized image; the same share of a 112x112 scene.
SHAPES_MIN_AREA_PX = 82.0

KEPT, REJECTED, SKIPPED = "kept", "rejected", "skipped"
TOO_MANY_OBJECTS, SMALL_BOX, UNREADABLE = "too_many_objects", "small_box", "unreadable_image"  # skipped, never described
INCONSISTENT, DISTRACTOR, EMPTY = "inconsistent", "distractor", "empty_expression"  # described and rejected
NOT_CHOSEN = "not_chosen"  # a candidate that passed, while another sample of its box was kept

RECORDS = "records.jsonl"  # one record per image: every box, its candidates and decision
OUTPUTS = ("candidates.jsonl", "pairs.jsonl", "refs.json", "instances.json")


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
    wanted = [(e, r) for e, (_, r) in zip(entries, batch) if any(b["reason"] is None for b in e["boxes"])]
    loaded, images = readable(wanted, lambda item: item[1].load_image(), on_error, [])
    decoded = {e["index"] for e, _ in loaded}
    for entry, _ in wanted:
        if entry["index"] not in decoded:  # on_error="skip": counted, never described
            entry["skip"] = UNREADABLE
            for box in entry["boxes"]:
                box["decision"], box["reason"] = SKIPPED, box["reason"] or UNREADABLE
    targets = [(box, record, k, image) for (entry, record), image in zip(loaded, images) for k, box in enumerate(entry["boxes"])]
    targets = [t for t in targets if t[0]["reason"] is None]
    if not targets:
        return entries
    row_images, row_boxes = [t[3] for t in targets], [t[1].objects[t[2]].box for t in targets]
    keep = Consistency(cfg.iou_lambda, inclusive=True)  # IoU(B, B_hat) >= lambda, Sec. 3.3 / 4.1
    # Stage 1 (describe B: D_B) and stage 2 (locate D_B: B_hat, IoU): greedy, as Pink.
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
    for t, (box, record, k, _) in enumerate(targets):
        rows = [(cycle, row) for cycle in cycles for row in range(t * cycle.samples, (t + 1) * cycle.samples)]
        candidates = [_candidate(sample, cycle, row, record.objects, k, cfg, grammar) for sample, (cycle, row) in enumerate(rows)]
        _decide(box, candidates)
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
    meta = meta | {"processes": state.num_processes, "boxes_per_second": described / elapsed if described and elapsed > 0 else None}
    return write_outputs(records, out_dir, cfg, grammar, meta, write_report)


# ---- outputs ------------------------------------------------------------------------------------
class BootstrapStats:
    """Counts in the layout of Pink Table 5 (images, referring expressions, mean expression length),
    with what the filters skipped and rejected by reason."""

    def __init__(self, grammar: bool) -> None:
        self.images = Counter()
        self.boxes = Counter()
        self.skipped_images = Counter()
        self.skipped_boxes = Counter()
        self.rejected = Counter()
        self.words = Counter()
        self.unique = Counter()
        self.grammar = grammar
        self.iou_sum = 0.0
        self.ious = array("f")  # the chosen candidate's IoU of each described box (the histogram)

    def add(self, record: dict) -> None:
        self.images["all"] += 1
        if record["skip"]:
            self.skipped_images[record["skip"]] += 1
        self.images["considered"] += any(b["candidates"] for b in record["boxes"])
        self.images["with_pairs"] += any(b["decision"] == KEPT for b in record["boxes"])
        for box in record["boxes"]:
            self.boxes["all"] += 1
            if box["decision"] == SKIPPED:
                self.skipped_boxes[box["reason"]] += 1
                continue
            chosen = box["candidates"][box["chosen"]]
            decision = box["decision"]
            self.boxes["considered"] += 1
            self.boxes[decision] += 1
            self.boxes["candidates"] += len(box["candidates"])
            self.boxes["parse_failures"] += sum(c["located_box"] is None for c in box["candidates"])
            if decision == REJECTED:
                self.rejected[box["reason"]] += 1
            self.words[decision] += len(chosen["expression"].split())
            self.unique[decision] += bool(chosen["grammar_unique"])
            self.iou_sum += chosen["iou"]
            self.ious.append(chosen["iou"])

    def as_dict(self, cfg: BootstrapConfig) -> dict:
        considered, kept, rejected = self.boxes["considered"], self.boxes[KEPT], self.boxes[REJECTED]
        out = {
            "images": self.images["considered"],  # Table 5 "Images": images with a box left by A.2's filters
            "referring_expressions": kept,  # Table 5 "Referring-expressions": kept pairs
            "avg_expression_length": self.words[KEPT] / kept if kept else None,  # Table 5: words per kept expression
            "images_total": self.images["all"],
            "images_with_pairs": self.images["with_pairs"],
            "images_skipped": dict(sorted(self.skipped_images.items())),
            "boxes_total": self.boxes["all"],
            "boxes_considered": considered,
            "boxes_skipped": dict(sorted(self.skipped_boxes.items())),
            "kept": kept,
            "rejected": rejected,
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "keep_rate": kept / considered if considered else None,
            "avg_rejected_expression_length": self.words[REJECTED] / rejected if rejected else None,
            "mean_iou": self.iou_sum / considered if considered else None,
            "candidates": self.boxes["candidates"],
            "parse_failures": self.boxes["parse_failures"],
            "samples": cfg.samples,
            "iou_lambda": cfg.iou_lambda,
            "distractor_check": cfg.distractor_check,
        }
        if self.grammar:  # share of kept / rejected expressions that are among the target's reference (grammar) expressions
            out["grammar_unique"] = {
                KEPT: self.unique[KEPT] / kept if kept else None,
                REJECTED: self.unique[REJECTED] / rejected if rejected else None,
            }
        return out


class _Examples:
    """The first kept and rejected boxes (rejected ones taken in turn from each reason), for the report."""

    def __init__(self, count: int = 8) -> None:
        self.count = count
        self.kept: list[dict] = []
        self.rejected: dict[str, list[dict]] = {}

    def add(self, record: dict, image: Path) -> None:
        for box in record["boxes"]:
            if box["decision"] == SKIPPED:
                continue
            shelf = self.kept if box["decision"] == KEPT else self.rejected.setdefault(box["reason"], [])
            if len(shelf) < self.count:
                shelf.append({"image": str(image), "box": box["box"]} | box["candidates"][box["chosen"]])

    def rejected_mix(self) -> list[dict]:
        shelves = list(self.rejected.values())
        mixed = [shelf[i] for i in range(self.count) for shelf in shelves if i < len(shelf)]
        return mixed[: self.count]


class _JsonArray:
    """A JSON array written element by element to a part file (instances.json at Objects365 scale
    does not fit in memory as Python objects)."""

    def __init__(self, path: Path) -> None:
        self.path, self.count = path, 0
        self.handle = open(path, "w")

    def add(self, value: object) -> None:
        self.handle.write(("," if self.count else "") + json.dumps(value))
        self.count += 1

    def close(self) -> None:
        self.handle.close()


# The candidate fields of a skipped box's line, in a candidate's order.
_NO_CANDIDATE = dict.fromkeys(
    ("sample", "expression", "located_box", "located_text", "iou", "distractor_iou", "grammar_unique", "decision", "reason")
)


def _flat(record: dict, box: dict) -> Iterator[dict]:
    """candidates.jsonl lines of one box: one per candidate, or one for a skipped box."""
    base = {"image_id": record["image_id"], "ann_id": box["ann_id"], "category": box["category"], "box": box["box"]}
    if not box["candidates"]:
        yield {
            "id": f"{record['image_id']}:{box['ann_id']}",
            **base,
            **_NO_CANDIDATE,
            "decision": SKIPPED,
            "reason": box["reason"],
            "chosen": False,
        }
    for j, c in enumerate(box["candidates"]):
        yield {"id": f"{record['image_id']}:{box['ann_id']}:{c['sample']}", **base, **c, "chosen": j == box["chosen"]}


def write_outputs(
    records: Sequence[ImageRecord], out_dir: Path, cfg: BootstrapConfig, grammar: bool, meta: dict, write_report: bool
) -> dict:
    """From records.jsonl: candidates.jsonl (every candidate and skipped box), pairs.jsonl (kept
    pairs, the referring JSONL `load_referring` reads, file names relative to the image root), a
    RefCOCO-style refs.json + instances.json (every box of the images with pairs), stats.json and
    the report. Each file appears whole (written aside, then renamed)."""
    parts = out_dir / ".parts"
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir()
    stats, examples = BootstrapStats(grammar), _Examples()
    images, annotations, refs = (_JsonArray(parts / f"{name}.part") for name in ("images", "annotations", "refs"))
    categories: dict[str, int] = {}
    with open(parts / "candidates.jsonl", "w") as candidates, open(parts / "pairs.jsonl", "w") as pairs:
        for record in iter_records(out_dir / RECORDS):
            stats.add(record)
            examples.add(record, records[record["index"]].path)
            candidates.writelines(json.dumps(line) + "\n" for box in record["boxes"] for line in _flat(record, box))
            if any(box["decision"] == KEPT for box in record["boxes"]):
                _add_pairs(record, pairs, images, annotations, refs, categories)
        for handle in (candidates, pairs):
            handle.flush()
            os.fsync(handle.fileno())
    if stats.images["all"] != len(records):
        raise RefloopError(f"{out_dir / RECORDS}: {len(records) - stats.images['all']} images have no record; rerun the same command")
    for part in (images, annotations, refs):
        part.close()
    _assemble(parts / "instances.json", [("images", images), ("annotations", annotations)], categories)
    _assemble(parts / "refs.json", [(None, refs)], None)
    for name in OUTPUTS:
        os.replace(parts / name, out_dir / name)
    shutil.rmtree(parts)
    result = stats.as_dict(cfg) | meta | {"config": cfg.model_dump(mode="json")}
    if write_report:
        from refloop.report.bootstrap import write_bootstrap_report

        step = max(1, len(stats.ious) // 200_000)  # the histogram's shape from at most ~200k boxes
        write_bootstrap_report(out_dir, result, examples.kept, examples.rejected_mix(), [{"iou": v} for v in stats.ious[::step]])
    tmp = out_dir / "stats.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out_dir / "stats.json")
    return result


def _add_pairs(record: dict, pairs, images: _JsonArray, annotations: _JsonArray, refs: _JsonArray, categories: dict[str, int]) -> None:
    """One image with kept pairs: its pairs.jsonl lines (the ground-truth box B stored, as Pink),
    its COCO image entry, every one of its boxes as an annotation, a RefCOCO ref per kept pair."""
    image = {k: record[k] for k in ("image_id", "file_name", "width", "height")}
    images.add({"id": record["image_id"], "file_name": record["file_name"], "width": record["width"], "height": record["height"]})
    for box in record["boxes"]:
        ann_id = annotations.count + 1
        xywh = Box(*box["box"]).as_xywh()
        category_id = categories.setdefault(box["category"], len(categories) + 1)
        annotations.add(
            {
                "id": ann_id,
                "image_id": record["image_id"],
                "category_id": category_id,
                "bbox": xywh,
                "area": box["area"],
                "iscrowd": 0,
                "source_ann_id": box["ann_id"],
            }
        )
        if box["decision"] != KEPT:
            continue
        chosen = box["candidates"][box["chosen"]]
        ref_id = refs.count + 1
        sentence = chosen["expression"]
        pairs.write(
            json.dumps(
                {
                    "ref_id": ref_id,
                    **image,
                    "bbox": xywh,
                    "sentences": [sentence],
                    "category": box["category"],
                    "ann_id": box["ann_id"],
                    "iou": chosen["iou"],
                }
            )
            + "\n"
        )
        refs.add(
            {
                "ref_id": ref_id,
                "ann_id": ann_id,
                "image_id": record["image_id"],
                "category_id": category_id,
                "file_name": record["file_name"],
                "split": "train",
                "sentences": [{"sent_id": ref_id, "sent": sentence, "raw": sentence, "tokens": sentence.split()}],
                "sent_ids": [ref_id],
            }
        )


def _assemble(path: Path, arrays: list[tuple[str | None, _JsonArray]], categories: dict[str, int] | None) -> None:
    """Write a JSON file from part files: a bare array (refs) or a COCO object of arrays."""
    with open(path, "w") as out:
        if categories is not None:
            out.write('{"info": {"description": "refloop bootstrap: Pink self-consistent pairs"}')
        for key, part in arrays:
            out.write(f', "{key}": [' if key else "[")
            with open(part.path) as handle:
                shutil.copyfileobj(handle, out)
            out.write("]")
        if categories is not None:
            out.write(f', "categories": {json.dumps([{"id": i, "name": name} for name, i in categories.items()])}}}')
        out.flush()
        os.fsync(out.fileno())
