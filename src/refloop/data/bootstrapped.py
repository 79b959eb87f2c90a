"""The files of a bootstrapping run (Pink Sec. 3.3, `methods.pink`), made from its records.jsonl:
one record per image, every box with its candidates and decision. From them: candidates.jsonl
(every candidate and skipped box), pairs.jsonl (the kept pairs as the referring JSONL
`load_referring` reads), a RefCOCO-style refs.json + instances.json (every box of the images with
pairs), and the counts of Pink Table 5 (`BootstrapStats`). Streamed: at Objects365 scale
(1.7M images) no file is held in memory, and each appears whole (written aside, then renamed)."""

from __future__ import annotations

import json
import os
import shutil
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from refloop.boxes import Box
from refloop.data.jsonl import iter_records, write_text_whole
from refloop.data.records import ImageRecord, ObjectAnnotation
from refloop.errors import RefloopError

KEPT, REJECTED, SKIPPED = "kept", "rejected", "skipped"
TOO_MANY_OBJECTS, SMALL_BOX, UNREADABLE = "too_many_objects", "small_box", "unreadable_image"  # skipped, never described
INCONSISTENT, DISTRACTOR, EMPTY = "inconsistent", "distractor", "empty_expression"  # described and rejected
NOT_CHOSEN = "not_chosen"  # a candidate that passed, while another sample of its box was kept

RECORDS = "records.jsonl"  # one record per image: every box, its candidates and decision
OUTPUTS = ("candidates.jsonl", "pairs.jsonl", "refs.json", "instances.json")
STATS = "stats.json"


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

    def as_dict(self, settings: dict[str, Any]) -> dict:
        """The counts, then `settings` (samples, iou_lambda, distractor_check) as the run used them."""
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
        } | settings
        if self.grammar:  # share of kept / rejected expressions that are among the target's reference (grammar) expressions
            out["grammar_unique"] = {
                KEPT: self.unique[KEPT] / kept if kept else None,
                REJECTED: self.unique[REJECTED] / rejected if rejected else None,
            }
        return out


class Examples:
    """The first kept and rejected boxes (rejected ones taken in turn from each reason), for the report."""

    def __init__(self, count: int = 8) -> None:
        self.count = count
        self.kept: list[dict] = []
        self.rejected: dict[str, list[dict]] = {}

    def add(self, record: dict, image: ImageRecord) -> None:
        """`image`: the record's ImageRecord, kept so the report reads its pixels as the run did
        (a file, or the bytes a parquet dataset holds)."""
        for box in record["boxes"]:
            if box["decision"] == SKIPPED:
                continue
            shelf = self.kept if box["decision"] == KEPT else self.rejected.setdefault(box["reason"], [])
            if len(shelf) < self.count:
                shelf.append({"image": image, "box": box["box"]} | box["candidates"][box["chosen"]])

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


def write_bootstrapped(records: Sequence[ImageRecord], out_dir: Path, grammar: bool) -> tuple[BootstrapStats, Examples]:
    """The dataset files of `out_dir`'s records.jsonl (OUTPUTS; file names relative to the image
    root), and the run's counts and report examples. Every image of `records` must have its record."""
    parts = out_dir / ".parts"
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir()
    stats, examples = BootstrapStats(grammar), Examples()
    images, annotations, refs = (_JsonArray(parts / f"{name}.part") for name in ("images", "annotations", "refs"))
    categories: dict[str, int] = {}
    source_ids = _unique_integer_ids(records)
    with open(parts / "candidates.jsonl", "w") as candidates, open(parts / "pairs.jsonl", "w") as pairs:
        for record in iter_records(out_dir / RECORDS):
            stats.add(record)
            examples.add(record, records[record["index"]])
            candidates.writelines(json.dumps(line) + "\n" for box in record["boxes"] for line in _flat(record, box))
            if any(box["decision"] == KEPT for box in record["boxes"]):
                _add_pairs(record, pairs, images, annotations, refs, categories, source_ids)
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
    return stats, examples


def bootstrapped_records(out_dir: Path, records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """`records` as `out_dir`'s records.jsonl bootstrapped them, in their order: every box of each
    image, a kept one with its kept description as the object's one expression (the box
    bootstrapped, never the located one), the others with none. So a finished run's pairs come
    back as typed records."""
    found: dict[int, tuple[ObjectAnnotation, ...]] = {}
    for record in iter_records(out_dir / RECORDS):
        found[record["index"]] = tuple(
            ObjectAnnotation(
                Box(*box["box"]),
                box["category"],
                ann_id=box["ann_id"],
                expressions=(box["candidates"][box["chosen"]]["expression"],) if box["decision"] == KEPT else (),
            )
            for box in record["boxes"]
        )
    return [replace(records[i], objects=objects) for i, objects in sorted(found.items())]


def write_stats(out_dir: Path, result: dict) -> None:
    """stats.json, whole or not at all."""
    write_text_whole(out_dir / STATS, json.dumps(result, indent=2) + "\n")


def _unique_integer_ids(records: Sequence[ImageRecord]) -> bool:
    """Whether every object of `records` has an integer annotation id of its own (a COCO file's):
    the RefCOCO-style export then keeps them, so its annotations join the source file's by id."""
    ids = [o.ann_id for r in records for o in r.objects]
    return all(type(i) is int for i in ids) and len(set(ids)) == len(ids)


def _add_pairs(
    record: dict,
    pairs: IO[str],
    images: _JsonArray,
    annotations: _JsonArray,
    refs: _JsonArray,
    categories: dict[str, int],
    source_ids: bool,
) -> None:
    """One image with kept pairs: its pairs.jsonl lines (the ground-truth box B stored, as Pink),
    its COCO image entry, every one of its boxes as an annotation, a RefCOCO ref per kept pair.
    Annotation ids are the source file's when `source_ids` (unique integers), else numbered from 1;
    category ids are numbered by first appearance (records carry category names only)."""
    image = {k: record[k] for k in ("image_id", "file_name", "width", "height")}
    images.add({"id": record["image_id"], "file_name": record["file_name"], "width": record["width"], "height": record["height"]})
    for box in record["boxes"]:
        ann_id = box["ann_id"] if source_ids else annotations.count + 1
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
        pair = {**image, "bbox": xywh, "sentences": [sentence], "category": box["category"], "ann_id": box["ann_id"], "iou": chosen["iou"]}
        pairs.write(json.dumps({"ref_id": ref_id, **pair}) + "\n")
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
