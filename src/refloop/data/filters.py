"""Training data from detection boxes alone.

SC-Tune appendix 9: keep images where some category occurs more than once; form (image,
category, boxes) triplets; drop a triplet if one of its boxes overlaps another box of the image
at IoU > 0.5; drop a triplet holding a box under 2% of the image area.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from refloop.boxes import Box, iou_matrix
from refloop.data.records import ImageRecord


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


def sctune_triplets(
    records: list[ImageRecord],
    max_overlap_iou: float = 0.5,
    min_area_fraction: float = 0.02,
    exclude_image_ids: set | None = None,
) -> tuple[list[Triplet], FilterCounts]:
    counts = FilterCounts()
    out: list[Triplet] = []
    exclude = exclude_image_ids or set()
    for rec in records:
        counts.images_in += 1
        if rec.image_id in exclude or str(rec.image_id) in exclude:
            counts.images_excluded += 1
            continue
        by_cat: dict[str, list[int]] = defaultdict(list)
        for i, obj in enumerate(rec.objects):
            by_cat[obj.category].append(i)
        repeated = {c: idx for c, idx in by_cat.items() if len(idx) > 1}
        if not repeated:
            counts.images_without_repeats += 1
            continue
        boxes = [o.box for o in rec.objects]
        ious = iou_matrix(boxes, boxes)
        np.fill_diagonal(ious, 0.0)
        image_area = rec.width * rec.height
        for category, idx in repeated.items():
            counts.triplets_considered += 1
            if any(ious[i].max(initial=0.0) > max_overlap_iou for i in idx):
                counts.dropped_overlap += 1
                continue
            if any(boxes[i].area < min_area_fraction * image_area for i in idx):
                counts.dropped_small += 1
                continue
            out.append(Triplet(rec.image_id, rec.file_name or str(rec.path), category, tuple(boxes[i] for i in idx), rec.width, rec.height))
            counts.triplets_kept += 1
            counts.boxes_kept += len(idx)
            counts.images_kept.add(rec.image_id)
    return out, counts
