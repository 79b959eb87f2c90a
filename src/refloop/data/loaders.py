"""Loaders of COCO-style detection JSON (COCO, Objects365) and referring-expression JSONL.

Policy (DESIGN.md): a bad record raises DataError naming file and record (`on_error="fail"`),
or is skipped and counted (`on_error="skip"`).

Annotation-only by default: image paths are resolved under the image root (escaping it is an
error) but the files are neither opened nor required. Commands that will read pixels set
`verify_images`: each image is opened once, reading only its header - present, an image, of the
size the annotation claims; pixels are decoded later, once, where a corrupt body is a DataError
naming file and record (`refloop.data.images`).
"""

from __future__ import annotations

import gc
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, compress, repeat
from operator import is_, is_not, methodcaller
from pathlib import Path
from typing import Any, Literal

import numpy as np

from refloop.boxes import Box, InvalidBoxError, OutsidePolicy, validate_box
from refloop.data.images import ImageHeaders, check_image, image_size  # noqa: F401 (image_size: formats.py)
from refloop.data.paths import ImageRoot
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


@dataclass
class DetectionTable:
    """A COCO-style detection file as columns: images in file order, boxes in annotation order,
    validated and clipped exactly as `load_coco` does, with no Python object per box. What
    annotation-only work (the appendix-9 filter) needs at Objects365 scale."""

    source: str
    image_ids: list
    file_names: list[str]  # as written, relative to the image root
    paths: list[str]  # resolved under the image root; the files need not exist
    widths: np.ndarray  # int64 per image
    heights: np.ndarray
    categories: list[str]  # category names; box_category indexes this list
    box_image: np.ndarray  # int64 per box: index into the image columns
    box_category: np.ndarray  # int64 per box
    xyxy: np.ndarray  # float64 (boxes, 4), pixels
    ann_ids: list | np.ndarray
    built: dict[int, Box] = field(default_factory=dict)  # boxes validate_box built (the clipped ones), kept as built

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_boxes(self) -> int:
        return len(self.box_image)

    def box(self, j: int) -> Box:
        built = self.built.get(j)
        return built if built is not None else Box(*self.xyxy[j].tolist())

    def records(self) -> list[ImageRecord]:
        """One ImageRecord per image, objects in annotation order (what `load_coco` returns)."""
        order = np.argsort(self.box_image, kind="stable").tolist()
        ends = np.cumsum(np.bincount(self.box_image, minlength=self.num_images)).tolist()
        xyxy, category, ann_ids = self.xyxy.tolist(), self.box_category.tolist(), _as_list(self.ann_ids)
        widths, heights, built, names = self.widths.tolist(), self.heights.tolist(), self.built, self.categories
        out, start = [], 0
        for k, end in enumerate(ends):
            objects = tuple(
                ObjectAnnotation(box=built[j] if j in built else Box(*xyxy[j]), category=names[category[j]], ann_id=ann_ids[j])
                for j in order[start:end]
            )
            start = end
            out.append(
                ImageRecord(
                    image_id=self.image_ids[k],
                    path=Path(self.paths[k]),
                    width=widths[k],
                    height=heights[k],
                    objects=objects,
                    source=self.source,
                    file_name=self.file_names[k],
                )
            )
        return out


def _as_list(values: list | np.ndarray) -> list:
    return values.tolist() if isinstance(values, np.ndarray) else values


ImageCheck = Callable[[str, tuple[int, int], object, object], None]
_NUMBER_TYPES = {int, float}
_MISSING = object()  # a field absent from a JSON object


def read_coco_table(
    path: str | Path,
    image_root: str | Path | None = None,
    on_error: OnError = "fail",
    outside: OutsidePolicy = "clip",
    verify_images: bool = False,
) -> tuple[DetectionTable, LoadReport]:
    """COCO / Objects365 detection JSON -> DetectionTable (crowd boxes ignored).

    Image paths are resolved under the image root (escaping it is an error) without opening or
    needing the files; `verify_images` also opens each image once, reading its header (`check_image`).
    """
    policy = _Policy(on_error, LoadReport(source=str(path)))
    with _gc_paused():
        return _read_coco(Path(path), image_root, policy, outside, check_image if verify_images else None)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while millions of acyclic objects are built (JSON records,
    boxes): each collection would walk all of them; at Objects365 scale that doubles the load time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_coco(
    path: Path, image_root: str | Path | None, policy: _Policy, outside: OutsidePolicy, check: ImageCheck | None
) -> tuple[DetectionTable, LoadReport]:
    report = policy.report
    root = ImageRoot(image_root if image_root is not None else path.parent)
    data = _read_json(path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(path, None, f"missing list {key!r}: not a COCO-style detection file")
    categories: dict[Any, str] = {}
    for i, cat in enumerate(data["categories"]):
        try:
            categories[_require(cat, "id", path, f"categories[{i}]")] = str(_require(cat, "name", path, f"categories[{i}]"))
        except DataError as err:
            policy.handle(err)
    index: dict[Any, int] = {}  # image id -> row of the image columns (a repeated id keeps its first row, takes the last values)
    image_ids: list = []
    columns: tuple[list, ...] = ([], [], [], [])  # file_name, path, width, height
    for i, img in enumerate(data["images"]):
        rec = f"images[{i}]"
        try:
            image_id = _require(img, "id", path, rec)
            file_name = _require(img, "file_name", path, rec)
            width = int(_number(_require(img, "width", path, rec), path, rec, "width"))
            height = int(_number(_require(img, "height", path, rec), path, rec, "height"))
            if width <= 0 or height <= 0:
                raise DataError(path, rec, f"image size must be positive, got {width}x{height}")
            where = f"{rec} (id {image_id})"
            file_path = root.resolve_str(file_name, path, where)
            if check is not None:
                check(file_path, (width, height), path, where)
        except DataError as err:
            policy.handle(err)
            continue
        row = index.setdefault(image_id, len(image_ids))
        values = (file_name, file_path, width, height)
        if row == len(image_ids):
            image_ids.append(image_id)
            for column, value in zip(columns, values):
                column.append(value)
        else:
            for column, value in zip(columns, values):
                column[row] = value
    file_names, paths, widths, heights = columns
    names: dict[str, int] = {}
    category_index = {cat: names.setdefault(name, len(names)) for cat, name in categories.items()}

    def checked(i: int, ann: Any) -> tuple[int, int, Box, Any] | None:
        """The record-by-record checks in order: the DataError of the first problem, None for a crowd box."""
        rec = f"annotations[{i}]"
        image_id = _require(ann, "image_id", path, rec)
        if ann.get("iscrowd", 0):
            return None
        if image_id not in index:
            raise DataError(path, rec, f"image_id {image_id!r} is not among the usable images")
        cat = _require(ann, "category_id", path, rec)
        if cat not in categories:
            raise DataError(path, rec, f"category_id {cat!r} is not in 'categories'")
        k = index[image_id]
        box = _xywh_box(_require(ann, "bbox", path, rec), (widths[k], heights[k]), path, rec, outside)
        return k, category_index[cat], box, ann.get("id", i)

    # Columns straight from the JSON objects, by C-level maps rather than a Python loop per box.
    # An annotation that is not plainly well-formed takes the record-by-record checks (`checked`).
    anns = data["annotations"]
    del data
    n = len(anns)
    objects = anns if set(map(type, anns)) <= {dict} else [a if type(a) is dict else {} for a in anns]
    image_col, crowd_col, category_col, bbox_col, id_col = (
        list(map(methodcaller("get", key, default), objects))
        for key, default in (("image_id", _MISSING), ("iscrowd", 0), ("category_id", _MISSING), ("bbox", _MISSING), ("id", _MISSING))
    )
    del objects
    box_image, box_category = _lookup(index, image_col), _lookup(category_index, category_col)
    named = np.fromiter(map(is_not, image_col, repeat(_MISSING)), dtype=bool, count=n)
    crowd = np.fromiter(map(bool, crowd_col), dtype=bool, count=n)
    plain_bbox = np.fromiter((type(b) is list and len(b) == 4 for b in bbox_col), dtype=bool, count=n)
    fast = named & ~crowd & (box_image >= 0) & (box_category >= 0) & plain_bbox
    slow = ~named | (~crowd & ~fast)
    del image_col, crowd_col, category_col

    # Vectorised box checks. A box that is not plainly valid and inside its image (not numbers,
    # not finite, empty, outside: clipped or rejected) goes through validate_box as before.
    flat = list(chain.from_iterable(compress(bbox_col, fast.tolist())))
    if not set(map(type, flat)) <= _NUMBER_TYPES:
        flat = [v if type(v) in _NUMBER_TYPES else math.nan for v in flat]
    values = np.full((n, 4), np.nan)
    try:
        values[fast] = np.array(flat, dtype=np.float64).reshape(-1, 4)
    except OverflowError:  # an integer beyond the float range: the record-by-record checks name it
        values[fast] = np.array([v if abs(v) < 1e308 else math.nan for v in flat], dtype=np.float64).reshape(-1, 4)
    del flat
    x, y, w, h = values.T
    x2, y2 = x + w, y + h
    image_row = np.where(box_image >= 0, box_image, len(widths))
    width_of, height_of = np.array([*widths, 0], dtype=np.int64)[image_row], np.array([*heights, 0], dtype=np.int64)[image_row]
    with np.errstate(invalid="ignore", over="ignore"):
        keep = fast & np.isfinite(values).all(axis=1) & np.isfinite(x2) & np.isfinite(y2) & (x2 > x) & (y2 > y)
        keep &= (x >= 0) & (y >= 0) & (x2 <= width_of) & (y2 <= height_of)
    xyxy = np.stack([x, y, x2, y2], axis=1)
    del values, x, y, w, h, x2, y2, width_of, height_of
    built: dict[int, Box] = {}
    errors: list[tuple[int, DataError]] = []
    for i in np.flatnonzero(fast & ~keep).tolist():
        k = int(box_image[i])
        try:
            built[i] = _xywh_box(bbox_col[i], (widths[k], heights[k]), path, f"annotations[{i}]", outside)
        except DataError as err:
            errors.append((i, err))
    for i in np.flatnonzero(slow).tolist():
        try:
            result = checked(i, anns[i])
        except DataError as err:
            errors.append((i, err))
            continue
        if result is not None:
            box_image[i], box_category[i], built[i], id_col[i] = result
    del anns, bbox_col
    for _, err in sorted(errors, key=lambda e: e[0]):
        policy.handle(err)
    for i, box in built.items():
        xyxy[i] = box.as_list()
        keep[i] = True
    rows = np.flatnonzero(keep)
    position = np.cumsum(keep) - 1
    row_list = rows.tolist()
    ann_ids: list | np.ndarray = list(map(id_col.__getitem__, row_list))
    if any(map(is_, ann_ids, repeat(_MISSING))):
        ann_ids = [i if a is _MISSING else a for a, i in zip(ann_ids, row_list)]
    if set(map(type, ann_ids)) <= {int}:
        try:
            ann_ids = np.array(ann_ids, dtype=np.int64)  # 8 bytes an id instead of a Python int
        except OverflowError:
            pass
    table = DetectionTable(
        source=str(path),
        image_ids=image_ids,
        file_names=file_names,
        paths=paths,
        widths=np.array(widths, dtype=np.int64),
        heights=np.array(heights, dtype=np.int64),
        categories=list(names),
        box_image=box_image[rows],
        box_category=box_category[rows],
        xyxy=xyxy[rows],
        ann_ids=ann_ids,
        built={int(position[i]): box for i, box in built.items()},
    )
    report.kept = table.num_images
    return table, report


def _lookup(table: dict, keys: list) -> np.ndarray:
    """table[key] for each key: -1 where absent, -2 where the key cannot be a dict key."""
    try:
        found = list(map(table.get, keys, repeat(-1)))
    except TypeError:
        found = [_get(table, key) for key in keys]
    return np.array(found, dtype=np.int64)


def _get(table: dict, key: Any) -> int:
    try:
        return table.get(key, -1)
    except TypeError:
        return -2


def load_coco(
    path: str | Path,
    image_root: str | Path | None = None,
    on_error: OnError = "fail",
    outside: OutsidePolicy = "clip",
    verify_images: bool = False,
) -> tuple[list[ImageRecord], LoadReport]:
    """COCO / Objects365 detection JSON -> one ImageRecord per image (crowd boxes ignored).

    Annotation-only by default: image files are never opened (nor need to exist), though their
    paths must stay under the image root. Commands that will read pixels pass
    `verify_images=True`: each image is opened once and its header checked against the annotation.
    """
    table, report = read_coco_table(path, image_root, on_error, outside, verify_images)
    with _gc_paused():
        records = table.records()
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
    verify_images: bool = False,
) -> tuple[list[ImageRecord], LoadReport]:
    """Referring-expression JSONL (refloop's RefCOCO-style export), grouped by image.

    One line per referred object: file_name, image_id, bbox [x, y, w, h], sentences [str, ...],
    optional category, ref_id, width, height (read from the image header when absent).
    `verify_images` checks each image file against the size its lines claim. Either way an image
    is opened at most once, however many lines name it.
    """
    path = Path(path)
    root = ImageRoot(image_root if image_root is not None else path.parent)
    headers = ImageHeaders()
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
            file_path = root.resolve(file_name, path, rec)
            sentences = _require(entry, "sentences", path, rec)
            if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) and s.strip() for s in sentences):
                raise DataError(path, rec, "field 'sentences' must be a non-empty list of non-empty strings")
            if "width" in entry and "height" in entry:
                size = (int(_number(entry["width"], path, rec, "width")), int(_number(entry["height"], path, rec, "height")))
                if verify_images:
                    headers.check(file_path, size, path, rec)
            else:
                size = headers.size(file_path, path, rec)
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
