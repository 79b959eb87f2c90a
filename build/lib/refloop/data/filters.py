"""Training data from detection boxes alone.

SC-Tune appendix 9: keep images where some category occurs more than once; form (image,
category, boxes) triplets; drop a triplet if one of its boxes overlaps another box of the image
at IoU > 0.5; drop a triplet holding a box under 2% of the image area.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from refloop.boxes import Box
from refloop.data.jsonl import write_records
from refloop.data.loaders import DetectionTable, OnError, iter_jsonl, read_coco_table
from refloop.data.records import ImageRecord
from refloop.errors import DataError, RefloopError


@dataclass(frozen=True)
class Triplet:
    image_id: str | int
    file_name: str
    category: str
    boxes: tuple[Box, ...]
    width: int
    height: int

    def to_json(self) -> dict:
        return {
            "image_id": self.image_id,
            "category": self.category,
            "boxes": [b.as_list() for b in self.boxes],
            "file_name": self.file_name,
            "width": self.width,
            "height": self.height,
        }


@dataclass
class FilterCounts:
    images_in: int = 0
    images_excluded: int = 0
    images_without_repeats: int = 0
    triplets_considered: int = 0
    dropped_overlap: int = 0
    dropped_small: int = 0
    triplets_kept: int = 0
    boxes_kept: int = 0
    images_kept: set = field(default_factory=set)

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "images_kept"}
        out["images_kept"] = len(self.images_kept)
        return out


_PAIR_BUDGET = 1 << 20  # box pairs compared at once (a few arrays of this many float64)


def sctune_triplets(
    data: DetectionTable | Sequence[ImageRecord],
    max_overlap_iou: float = 0.5,
    min_area_fraction: float = 0.02,
    exclude_image_ids: set | None = None,
) -> tuple[list[Triplet], FilterCounts]:
    """Appendix-9 triplets of a detection table (`read_coco_table`, no Python object per box) or
    of ImageRecords, in image order, categories by first box, boxes in annotation order."""
    if isinstance(data, DetectionTable):
        image_ids, file_names = data.image_ids, data.file_names
        widths, heights = data.widths, data.heights
        box_image, box_category, xyxy, names, box_at = data.box_image, data.box_category, data.xyxy, data.categories, data.box
    else:
        records = list(data)
        image_ids = [r.image_id for r in records]
        file_names = [r.file_name or str(r.path) for r in records]
        widths, heights = np.array([r.width for r in records]), np.array([r.height for r in records])
        all_boxes = [o.box for r in records for o in r.objects]
        box_image = np.repeat(np.arange(len(records)), [len(r.objects) for r in records])
        index: dict[str, int] = {}
        box_category = np.array([index.setdefault(o.category, len(index)) for r in records for o in r.objects], dtype=np.int64)
        xyxy = np.array([b.as_list() for b in all_boxes], dtype=np.float64).reshape(-1, 4)
        names, box_at = list(index), all_boxes.__getitem__
    exclude = exclude_image_ids or set()
    excluded = np.zeros(len(image_ids), dtype=bool)
    if exclude:
        excluded[[k for k, i in enumerate(image_ids) if i in exclude or str(i) in exclude]] = True
    counts = FilterCounts(images_in=len(image_ids), images_excluded=int(excluded.sum()))

    # boxes of the images in play, image by image, in annotation order within an image
    order = np.argsort(box_image, kind="stable")
    rows = order[~excluded[box_image[order]]]
    image, x1, y1, x2, y2 = box_image[rows], *(np.ascontiguousarray(xyxy[rows, c]) for c in range(4))
    # (image, category) groups; a category is matched by name, as the records name it
    groups, first, group_of, sizes = np.unique(
        image * max(len(names), 1) + box_category[rows], return_index=True, return_inverse=True, return_counts=True
    )
    repeated = sizes > 1
    counts.triplets_considered = int(repeated.sum())
    counts.images_without_repeats = int((~excluded).sum() - len(np.unique(image[first[repeated]])))

    overlaps = _overlaps_another(image, x1, y1, x2, y2, np.flatnonzero(repeated[group_of]), max_overlap_iou)
    area = np.maximum(x2 - x1, 0.0) * np.maximum(y2 - y1, 0.0)
    small = area < min_area_fraction * (widths * heights)[image]
    any_overlap = np.bincount(group_of, weights=overlaps, minlength=len(groups)) > 0
    any_small = np.bincount(group_of, weights=small, minlength=len(groups)) > 0
    counts.dropped_overlap = int((repeated & any_overlap).sum())
    counts.dropped_small = int((repeated & ~any_overlap & any_small).sum())

    kept = np.flatnonzero(repeated & ~any_overlap & ~any_small)
    kept = kept[np.argsort(first[kept])]  # image order, then each category at its first box
    members = np.argsort(group_of, kind="stable")
    starts = np.cumsum(sizes) - sizes
    out: list[Triplet] = []
    width_of, height_of = widths.tolist(), heights.tolist()
    for g in kept.tolist():
        k = int(image[first[g]])
        boxes = tuple(box_at(j) for j in rows[members[starts[g] : starts[g] + sizes[g]]].tolist())
        out.append(Triplet(image_ids[k], file_names[k], names[box_category[rows[first[g]]]], boxes, width_of[k], height_of[k]))
        counts.triplets_kept += 1
        counts.boxes_kept += len(boxes)
        counts.images_kept.add(image_ids[k])
    return out, counts


def _overlaps_another(
    image: np.ndarray, x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray, which: np.ndarray, threshold: float
) -> np.ndarray:
    """For the boxes at `which`: does one overlap another box of its image at IoU > threshold?

    Boxes are grouped by image (`image` sorted). Each asked box is compared with every box of its
    image, in chunks of about _PAIR_BUDGET pairs, with the arithmetic of `iou_matrix` (same floats).
    """
    out = np.zeros(len(image), dtype=bool)
    if not len(which):
        return out
    start = np.searchsorted(image, image[which], "left")
    count = np.searchsorted(image, image[which], "right") - start
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    ends = np.cumsum(count)
    lo = 0
    while lo < len(which):
        hi = max(int(np.searchsorted(ends, ends[lo] - count[lo] + _PAIR_BUDGET, "right")), lo + 1)
        n = count[lo:hi]
        offsets = np.cumsum(n) - n
        left = np.repeat(which[lo:hi], n)
        right = np.repeat(start[lo:hi] - offsets, n) + np.arange(int(n.sum()))
        inter = np.clip(np.minimum(x2[left], x2[right]) - np.maximum(x1[left], x1[right]), 0, None) * np.clip(
            np.minimum(y2[left], y2[right]) - np.maximum(y1[left], y1[right]), 0, None
        )
        union = area[left] + area[right] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, inter / union, 0.0)
        iou[left == right] = 0.0
        out[which[lo:hi]] = np.maximum.reduceat(iou, offsets) > threshold
        lo = hi
    return out


def held_out_ids(path: Path | None) -> set:
    """The image_id fields of a JSONL (e.g. a consistency samples.jsonl): images kept out of training."""
    held_out = set()
    for number, row in iter_jsonl(path) if path else ():
        image_id = row.get("image_id") if isinstance(row, dict) else None
        if not isinstance(image_id, (str, int)) or isinstance(image_id, bool):
            raise DataError(path, f"line {number}", f"expected an object with a string or integer image_id, got {row!r:.80}")
        held_out.add(image_id)
    return held_out


TRIPLET_FIELDS = frozenset(f.name for f in fields(Triplet))  # the keys of Triplet.to_json


def is_triplets_file(path: Path) -> bool:
    """Whether `path` holds nothing but triplets, one a line, as `write_triplets` writes them (an
    empty file, a filter that kept nothing, included): what `refloop filter --overwrite` may replace.
    Reads the whole file, stopping at the first line that is not a triplet."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if not isinstance(row, dict) or set(row) != TRIPLET_FIELDS:
                    return False
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def write_triplets(
    detections: Path,
    out: Path,
    images: Path | None = None,
    exclude: Path | None = None,
    max_overlap_iou: float = 0.5,
    min_area_fraction: float = 0.02,
    on_error: OnError = "fail",
) -> tuple[FilterCounts, int]:
    """`refloop filter`: the appendix-9 triplets of a COCO-style file written to `out` as JSONL
    (replaced whole: the old file stays until the new one is), with the counts and the number of
    bad records skipped. Annotations only: image paths must stay under the image root, but no image
    file is read (or needed)."""
    table, report = read_coco_table(detections, images, on_error=on_error)
    triplets, counts = sctune_triplets(table, max_overlap_iou, min_area_fraction, held_out_ids(exclude))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_records(out, (t.to_json() for t in triplets))
    except OSError as exc:
        raise RefloopError(f"cannot write {out}: {exc.strerror or exc}") from None
    return counts, report.skipped
