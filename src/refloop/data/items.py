"""Box items (`BoxItem`) from any data a recipe names: detection boxes alone (SC-Tune appendix 9
triplets, Pink's detection boxes) or referring pairs (a box and its expression)."""

from __future__ import annotations

import math
from pathlib import Path

from refloop.boxes import Box
from refloop.data.filters import sctune_triplets
from refloop.data.images import ImageHeaders
from refloop.data.loaders import iter_jsonl, load_coco
from refloop.data.paths import resolve_image_path
from refloop.data.records import BoxItem
from refloop.data.sources import cache_dir, load_data
from refloop.errors import DataError, RefloopError
from refloop.world import DOMAINS, TRAIN_SEED
from refloop.world.export import COCO_FILE, export_split


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _items_from_triplets(rows: list[tuple[int, dict]], root: Path, source: str) -> list[BoxItem]:
    """Every box of every triplet; each image is checked once (header: present, readable, and of
    the size the triplet names), so a missing image stops the run before training starts."""
    items, headers = [], ImageHeaders()
    for number, row in rows:
        record = f"line {number}"
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(row.get("boxes"), list):
            raise DataError(
                source,
                record,
                "a triplet is an object with a string file_name and a list of boxes (a .jsonl train_data is read as "
                "`refloop filter`'s triplets; detections go in as COCO .json, referring pairs as L_sup's supervised_data)",
            )
        if not all(isinstance(b, list) and len(b) == 4 and all(_finite(v) for v in b) for b in row["boxes"]):
            raise DataError(source, record, "every box is [x1, y1, x2, y2] in finite pixel numbers")
        path = resolve_image_path(root, row["file_name"], source, record)
        if "width" in row and "height" in row:
            headers.check(path, (row["width"], row["height"]), source, record)
        else:
            headers.size(path, source, record)
        items += [BoxItem(str(path), Box(*b), category=str(row.get("category", ""))) for b in row["boxes"]]
    return items


def detection_items(
    data: str,
    images: str | None = None,
    train_images: int = 2000,
    max_overlap_iou: float = 0.5,
    min_area_fraction: float = 0.02,
    degrade_prob: float = 0.0,
) -> tuple[list[BoxItem], dict]:
    """Training boxes from detection boxes alone, through SC-Tune's appendix-9 filter unless `data`
    is already a triplets JSONL. A shapes-world domain is exported with the training seed, each
    image degraded with probability `degrade_prob` (an augmentation; `export_split`)."""
    if data in DOMAINS:
        name = f"{data}-seed{TRAIN_SEED}-n{train_images}" + (f"-degrade{degrade_prob:g}" if degrade_prob > 0 else "")
        directory = export_split(data, cache_dir() / "world" / name, train_images, TRAIN_SEED, degrade_prob)
        data, root = str(directory / COCO_FILE), directory
    else:
        if degrade_prob > 0:
            raise RefloopError(f"train data {data!r}: only shapes-world scenes are drawn degraded (a file's images are used as they are)")
        root = Path(images) if images else Path(data).parent
    if data.endswith(".jsonl"):
        rows = list(iter_jsonl(Path(data)))
        return _items_from_triplets(rows, root, data), {"triplets": len(rows)}
    if not data.endswith(".json"):
        raise RefloopError(f"train data {data!r} is neither a domain ({', '.join(DOMAINS)}) nor a .json / .jsonl file")
    records, _ = load_coco(data, root)
    triplets, counts = sctune_triplets(records, max_overlap_iou, min_area_fraction)
    rows = [(i + 1, t.to_json()) for i, t in enumerate(triplets)]
    return _items_from_triplets(rows, root, data), counts.as_dict()


def referring_items(data: str, images: str | None = None) -> list[BoxItem]:
    """(box, expression) pairs: every object of referring data with its first expression. A
    shapes-world domain is read from its training scenes."""
    records, _ = load_data(data, seed=TRAIN_SEED) if data in DOMAINS else load_data(data, images)
    return [
        BoxItem(str(r.path), o.box, category=o.category, expression=o.expressions[0], item_id=f"{r.image_id}:{o.ann_id}")
        for r in records
        for o in r.objects
        if o.expressions
    ]
