"""Loaders of COCO-style detection JSON (COCO, Objects365) and referring-expression JSONL.

Policy (DESIGN.md): a bad record raises DataError naming file and record (`on_error="fail"`),
or is skipped and counted (`on_error="skip"`). Images are checked when `verify_images` is set:
present, decodable, and of the size the annotation claims.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from refloop.boxes import Box, InvalidBoxError, OutsidePolicy, validate_box
from refloop.data.paths import resolve_image_path
from refloop.data.records import ImageRecord, ObjectAnnotation
from refloop.errors import DataError

OnError = Literal["fail", "skip"]


@dataclass
class LoadReport:
    """What a loader kept and skipped, with the reason of each skip."""

    source: str
    kept: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)

    def skip(self, error: DataError) -> None:
        self.skipped += 1
        self.reasons[error.problem.split(":")[0]] += 1


class _Policy:
    def __init__(self, on_error: OnError, report: LoadReport) -> None:
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        self.on_error, self.report = on_error, report

    def handle(self, error: DataError) -> None:
        if self.on_error == "fail":
            raise error
        self.report.skip(error)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(path, None, f"not valid JSON: {exc}") from None


def _number(value: Any, source: object, record: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(source, record, f"field {name!r} must be a finite number, got {value!r}")
    return float(value)


def _xywh_box(bbox: Any, size: tuple[int, int], source: object, record: object, outside: OutsidePolicy) -> Box:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise DataError(source, record, f"bbox must be [x, y, width, height], got {bbox!r}")
    x, y, w, h = (_number(v, source, record, "bbox") for v in bbox)
    try:
        return validate_box(Box.from_xywh(x, y, w, h), size, outside=outside)
    except InvalidBoxError as exc:
        raise DataError(source, record, f"invalid bbox: {exc}") from None


def _require(entry: dict, key: str, source: object, record: object) -> Any:
    if not isinstance(entry, dict):
        raise DataError(source, record, f"expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise DataError(source, record, f"missing field {key!r}")
    return entry[key]


def image_size(path: Path, source: object, record: object) -> tuple[int, int]:
    """(width, height) read from the image header; missing or unreadable files name the record."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise DataError(source, record, f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(source, record, f"cannot read image {path}: {exc}") from None


def grouped_records(groups: dict, source: Path) -> list[ImageRecord]:
    """ImageRecords from {image_id: {"path", "size", "objects", "file_name"}}."""
    return [
        ImageRecord(
            image_id=k,
            path=v["path"],
            width=v["size"][0],
            height=v["size"][1],
            objects=tuple(v["objects"]),
            source=str(source),
            file_name=v["file_name"],
        )
        for k, v in groups.items()
    ]


def _check_image(path: Path, size: tuple[int, int], source: object, record: object) -> None:
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            actual = img.size
    except FileNotFoundError:
        raise DataError(source, record, f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(source, record, f"cannot read image {path}: {exc}") from None
    if actual != size:
        raise DataError(source, record, f"image {path} is {actual[0]}x{actual[1]} but the annotation says {size[0]}x{size[1]}")


def load_coco(
    path: str | Path,
    image_root: str | Path | None = None,
    on_error: OnError = "fail",
    outside: OutsidePolicy = "clip",
    verify_images: bool = True,
) -> tuple[list[ImageRecord], LoadReport]:
    """COCO / Objects365 detection JSON -> one ImageRecord per image (crowd boxes ignored)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    data = _read_json(path)
    report = LoadReport(source=str(path))
    policy = _Policy(on_error, report)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(path, None, f"missing list {key!r}: not a COCO-style detection file")
    categories: dict[Any, str] = {}
    for i, cat in enumerate(data["categories"]):
        try:
            categories[_require(cat, "id", path, f"categories[{i}]")] = str(_require(cat, "name", path, f"categories[{i}]"))
        except DataError as err:
            policy.handle(err)
    images: dict[Any, dict] = {}
    for i, img in enumerate(data["images"]):
        rec = f"images[{i}]"
        try:
            image_id = _require(img, "id", path, rec)
            file_name = _require(img, "file_name", path, rec)
            width = int(_number(_require(img, "width", path, rec), path, rec, "width"))
            height = int(_number(_require(img, "height", path, rec), path, rec, "height"))
            if width <= 0 or height <= 0:
                raise DataError(path, rec, f"image size must be positive, got {width}x{height}")
            file_path = resolve_image_path(root, file_name, path, f"{rec} (id {image_id})")
            if verify_images:
                _check_image(file_path, (width, height), path, f"{rec} (id {image_id})")
            images[image_id] = {"path": file_path, "size": (width, height), "objects": [], "file_name": file_name}
        except DataError as err:
            policy.handle(err)
    for i, ann in enumerate(data["annotations"]):
        rec = f"annotations[{i}]"
        try:
            image_id = _require(ann, "image_id", path, rec)
            if ann.get("iscrowd", 0):
                continue
            if image_id not in images:
                raise DataError(path, rec, f"image_id {image_id!r} is not among the usable images")
            cat = _require(ann, "category_id", path, rec)
            if cat not in categories:
                raise DataError(path, rec, f"category_id {cat!r} is not in 'categories'")
            box = _xywh_box(_require(ann, "bbox", path, rec), images[image_id]["size"], path, rec, outside)
            images[image_id]["objects"].append(ObjectAnnotation(box=box, category=categories[cat], ann_id=ann.get("id", i)))
        except DataError as err:
            policy.handle(err)
    records = grouped_records(images, path)
    report.kept = len(records)
    return records, report


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-empty line; a bad line is a DataError."""
    try:
        handle = open(path)
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, f"line {number}", f"not valid JSON: {exc}") from None


def load_referring(
    path: str | Path,
    image_root: str | Path | None = None,
    on_error: OnError = "fail",
    outside: OutsidePolicy = "clip",
    verify_images: bool = True,
) -> tuple[list[ImageRecord], LoadReport]:
    """Referring-expression JSONL (refloop's RefCOCO-style export), grouped by image.

    One line per referred object: file_name, image_id, bbox [x, y, w, h], sentences [str, ...],
    optional category, ref_id, width, height (read from the image when absent).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    report = LoadReport(source=str(path))
    policy = _Policy(on_error, report)
    grouped: dict[Any, dict] = {}
    lines = iter_jsonl(path)
    while True:
        try:
            item = next(lines)
        except StopIteration:
            break
        except DataError as err:
            policy.handle(err)
            continue
        number, entry = item
        rec = f"line {number}"
        try:
            image_id = _require(entry, "image_id", path, rec)
            file_name = _require(entry, "file_name", path, rec)
            file_path = resolve_image_path(root, file_name, path, rec)
            sentences = _require(entry, "sentences", path, rec)
            if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) and s.strip() for s in sentences):
                raise DataError(path, rec, "field 'sentences' must be a non-empty list of non-empty strings")
            if "width" in entry and "height" in entry:
                size = (int(_number(entry["width"], path, rec, "width")), int(_number(entry["height"], path, rec, "height")))
                if verify_images:
                    _check_image(file_path, size, path, rec)
            else:
                size = image_size(file_path, path, rec)
            box = _xywh_box(_require(entry, "bbox", path, rec), size, path, rec, outside)
            group = grouped.setdefault(image_id, {"path": file_path, "size": size, "objects": [], "file_name": file_name})
            group["objects"].append(
                ObjectAnnotation(
                    box=box, category=str(entry.get("category", "")), ann_id=entry.get("ref_id", number), expressions=tuple(sentences)
                )
            )
        except DataError as err:
            policy.handle(err)
    records = grouped_records(grouped, path)
    report.kept = len(records)
    return records, report
