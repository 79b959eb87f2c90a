"""Loaders of COCO-style detection JSON (COCO, Objects365) and referring-expression JSONL.

Policy (DESIGN.md): a bad record raises DataError naming file and record (`on_error="fail"`),
or is skipped and counted (`on_error="skip"`). A problem of the whole file (missing, a directory,
not UTF-8, not JSON, nested too deeply, the wrong top-level type) is a DataError either way. No
other exception escapes a loader, whatever the file holds: ids must be strings or numbers (not
lists, objects or booleans), numbers finite and within range, image sizes positive.

Text: UTF-8, with or without a byte-order mark; UTF-16 and UTF-32 with their byte-order mark.

Ids name one thing: a COCO `images` entry reusing an id is refused (under "skip" every entry
claiming that id is dropped, the later ones and the first, since the boxes of that id cannot be
placed for sure), and so is a referring line giving an `image_id` seen before with another image
file or another size.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, compress, repeat
from operator import is_, is_not, methodcaller
from pathlib import Path
from typing import Any

import numpy as np

from refloop.boxes import Box, OutsidePolicy
from refloop.data.fields import (  # noqa: F401  (LoadReport, OnError, open_text, read_text: this module's API too)
    ESCAPED,
    LoadReport,
    OnError,
    Policy,
    UniqueIds,
    id_field,
    image_side,
    image_size_field,
    is_id,
    json_type,
    open_text,
    optional_id,
    read_json,
    read_json_list,
    read_text,
    require,
    text_field,
    xywh_box,
)
from refloop.data.images import ImageHeaders, check_image
from refloop.data.paths import ImageRoot, shown
from refloop.data.records import ImageRecord, ObjectAnnotation
from refloop.errors import DataError


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
    attributes: list[dict] | None = None  # per box, when the file gives any box COCO `attributes`
    crowd: dict[int, tuple[int, ...]] = field(default_factory=dict)  # image index -> categories of its crowd annotations

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
        attributes = self.attributes
        out, start = [], 0
        for k, end in enumerate(ends):
            objects = tuple(
                ObjectAnnotation(
                    box=built[j] if j in built else Box(*xyxy[j]),
                    category=names[category[j]],
                    ann_id=ann_ids[j],
                    attributes=attributes[j] if attributes is not None else {},
                )
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
                    crowd_categories=tuple(names[c] for c in self.crowd.get(k, ())),
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
    policy = Policy(on_error, LoadReport(source=str(path)))
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
    path: Path, image_root: str | Path | None, policy: Policy, outside: OutsidePolicy, check: ImageCheck | None
) -> tuple[DetectionTable, LoadReport]:
    report = policy.report
    root = ImageRoot(image_root if image_root is not None else path.parent)
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(path, None, f"expected a JSON object at the top level, got {json_type(data)}: not a COCO-style detection file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(path, None, f"missing list {key!r}: not a COCO-style detection file")
    categories: dict[Any, str] = {}
    renamed: set = set()  # category ids given again with another name (on_error="skip")
    for i, cat in enumerate(data["categories"]):
        rec = f"categories[{i}]"
        try:
            cat_id = id_field(require(cat, "id", path, rec), path, rec, "id")
            name = text_field(require(cat, "name", path, rec), path, rec, "name")
            if categories.get(cat_id, name) != name:
                renamed.add(cat_id)
                problem = f"category id {shown(cat_id)} is already the category {shown(categories[cat_id])}, not {shown(name)}"
                raise DataError(path, rec, problem)
            categories[cat_id] = name
        except DataError as err:
            policy.handle(err)
    for cat_id in renamed:  # on_error="skip": which name its boxes have is unknown, so the category goes, and its boxes
        del categories[cat_id]
    index: dict[Any, int] = {}  # image id -> row of the image columns
    ids = UniqueIds(path, "images", "image id")
    image_ids: list = []
    columns: tuple[list, ...] = ([], [], [], [])  # file_name, path, width, height
    for i, img in enumerate(data["images"]):
        rec = f"images[{i}]"
        try:
            image_id = id_field(require(img, "id", path, rec), path, rec, "id")
            ids.claim(image_id, i)
            file_name = require(img, "file_name", path, rec)
            width = image_side(require(img, "width", path, rec), path, rec, "width")
            height = image_side(require(img, "height", path, rec), path, rec, "height")
            if width <= 0 or height <= 0:
                raise DataError(path, rec, f"image size must be positive, got {width}x{height}")
            where = f"{rec} (id {image_id})"
            file_path = root.resolve_str(file_name, path, where)
            if check is not None:
                check(file_path, (width, height), path, where)
        except DataError as err:
            policy.handle(err)
            continue
        index[image_id] = len(image_ids)
        image_ids.append(image_id)
        for column, value in zip(columns, (file_name, file_path, width, height), strict=True):
            column.append(value)
    reused = ids.reused()
    if reused:  # on_error="skip": which entry the boxes of a reused id belong to is unknown, so none keeps it
        for image_id, err in reused:
            if image_id in index:
                policy.handle(err)
        dropped = {image_id for image_id, _ in reused}
        rows_kept = [k for k, image_id in enumerate(image_ids) if image_id not in dropped]
        image_ids = [image_ids[k] for k in rows_kept]
        columns = tuple([column[k] for k in rows_kept] for column in columns)
        index = {image_id: k for k, image_id in enumerate(image_ids)}
    file_names, paths, widths, heights = columns
    names: dict[str, int] = {}
    category_index = {cat: names.setdefault(name, len(names)) for cat, name in categories.items()}

    def checked(i: int, ann: Any) -> tuple[int, int, Box, Any] | None:
        """The record-by-record checks in order: the DataError of the first problem, None for a crowd box."""
        rec = f"annotations[{i}]"
        image_id = require(ann, "image_id", path, rec)
        if ann.get("iscrowd", 0):
            return None
        if i in duplicate_of:
            first = f"annotations[{duplicate_of[i]}]"
            raise DataError(path, rec, f"annotation id {shown(ann['id'])} is already the id of {first}, a box of the same image")
        if id_field(image_id, path, rec, "image_id") not in index:
            raise DataError(path, rec, f"image_id {shown(image_id)} is not among the usable images")
        cat = id_field(require(ann, "category_id", path, rec), path, rec, "category_id")
        if cat not in categories:
            raise DataError(path, rec, f"category_id {shown(cat)} is not in 'categories'")
        k = index[image_id]
        box = xywh_box(require(ann, "bbox", path, rec), (widths[k], heights[k]), path, rec, outside)
        return k, category_index[cat], box, optional_id(ann.get("id", i), path, rec, "id")

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
    attribute_col = list(map(methodcaller("get", "attributes"), objects))
    if not any(map(is_not, attribute_col, repeat(None))):
        attribute_col = None
    del objects
    box_image, box_category = _lookup(index, image_col), _lookup(category_index, category_col)
    named = np.fromiter(map(is_not, image_col, repeat(_MISSING)), dtype=bool, count=n)
    crowd = np.fromiter(map(bool, crowd_col), dtype=bool, count=n)
    plain_bbox = np.fromiter((type(b) is list and len(b) == 4 for b in bbox_col), dtype=bool, count=n)
    fast = named & ~crowd & (box_image >= 0) & (box_category >= 0) & plain_bbox
    if not (set(map(type, id_col)) <= {int} and (not n or max(max(id_col), -min(id_col)).bit_length() <= 64)):
        # an id that is absent, or not an integer of at most 64 bits: the record-by-record checks name it
        fast &= np.fromiter((v is _MISSING or v is None or is_id(v) for v in id_col), dtype=bool, count=n)
    # An annotation id used twice for boxes of one image (outputs are keyed by image and annotation id, so
    # the two would be taken for one): the later box is refused, naming the first. Across images (files
    # merged with ids restarting) an id may repeat.
    duplicate_of: dict[int, int] = {}
    rows = enumerate(zip(image_col, crowd_col, id_col, strict=True))
    keys = {i: (m, v) for i, (m, c, v) in rows if not c and {type(m), type(v)} <= {int, str}}
    if len(set(keys.values())) < len(keys):
        seen: dict = {}
        for i, key in keys.items():
            if key in seen:
                duplicate_of[i] = seen[key]
            seen.setdefault(key, i)
        fast[list(duplicate_of)] = False
    slow = ~named | (~crowd & ~fast)
    # Crowd annotations give no box, but their categories are in the image (the CHAIR release's ground truth
    # counts them); one whose image or category is unknown is ignored, as before.
    crowd_of: dict[int, tuple[int, ...]] = {}
    for i in np.flatnonzero(crowd & (box_image >= 0) & (box_category >= 0)).tolist():
        k, c = int(box_image[i]), int(box_category[i])
        if c not in crowd_of.get(k, ()):
            crowd_of[k] = (*crowd_of.get(k, ()), c)
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
    with np.errstate(over="ignore", invalid="ignore"):
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
            built[i] = xywh_box(bbox_col[i], (widths[k], heights[k]), path, f"annotations[{i}]", outside)
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
        ann_ids = [i if a is _MISSING else a for a, i in zip(ann_ids, row_list, strict=True)]
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
        attributes=None if attribute_col is None else [_attributes(attribute_col[i]) for i in row_list],
        crowd=crowd_of,
    )
    report.kept = table.num_images
    return table, report


_ATTRIBUTE_TYPES = (str, int, float, bool)


def _attributes(value: Any) -> dict:
    """A box's COCO `attributes`: the entries naming a text, number or truth value. Other forms
    (lists of attribute ids, nested objects) are datasets' own conventions refloop does not read,
    and are left out rather than refused, as the field was before refloop read it."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, _ATTRIBUTE_TYPES)}


def _lookup(table: dict, keys: list) -> np.ndarray:
    """table[key] for each key: -1 where absent, -2 where the key is no id (a list, an object, a
    boolean: true would find the id 1); those take the record-by-record checks."""
    if set(map(type, keys)) <= {int, str}:
        found = list(map(table.get, keys, repeat(-1)))
    else:
        found = [table.get(key, -1) if is_id(key) else -2 for key in keys]
    return np.array(found, dtype=np.int64)


def load_coco(
    path: str | Path,
    image_root: str | Path | None = None,
    on_error: OnError = "fail",
    outside: OutsidePolicy = "clip",
    verify_images: bool = False,
) -> tuple[list[ImageRecord], LoadReport]:
    """COCO / Objects365 detection JSON -> one ImageRecord per image (crowd boxes are no objects;
    their categories are kept as the record's `crowd_categories`).

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
    for number, value in jsonl_lines(path):
        if isinstance(value, DataError):
            raise value
        yield number, value


def jsonl_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object, or the DataError of a bad line) for each non-empty line, so a
    reader can skip a bad line and go on. A problem of the whole file (missing, a directory, a
    UTF-16 file that stops decoding) is raised."""
    path = Path(path)
    with open_text(path) as handle:
        number = 0
        while True:
            try:
                line = handle.readline()
            except UnicodeDecodeError as exc:  # UTF-16/32 (UTF-8 is read with surrogateescape): the whole file
                raise DataError(path, None, f"not {handle.encoding.upper()} text: {exc.reason} (after line {number})") from None
            except OSError as exc:
                raise DataError(path, None, f"cannot read the file: {exc.strerror or exc} (after line {number})") from None
            if not line:
                return
            number += 1
            if not line.strip():
                continue
            if not line.isascii() and ESCAPED.search(line):
                yield number, DataError(path, f"line {number}", "not UTF-8 text (a byte that is no UTF-8)")
                continue
            try:
                yield number, json.loads(line)
            except RecursionError:
                yield number, DataError(path, f"line {number}", "not usable JSON: nested too deeply")
            except json.JSONDecodeError as exc:
                yield number, DataError(path, f"line {number}", f"not valid JSON: {exc}")
            except ValueError as exc:  # an integer beyond Python's digit limit
                yield number, DataError(path, f"line {number}", f"not usable JSON: {exc}")


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
    is opened at most once, however many lines name it. An `image_id` names one image: a line
    giving it with another image file, or another width/height, is refused (skipped under "skip").
    """
    path = Path(path)
    root = ImageRoot(image_root if image_root is not None else path.parent)
    headers = ImageHeaders()
    report = LoadReport(source=str(path))
    policy = Policy(on_error, report)
    grouped: dict[Any, dict] = {}
    for number, entry in jsonl_lines(path):
        rec = f"line {number}"
        try:
            if isinstance(entry, DataError):
                raise entry
            image_id = id_field(require(entry, "image_id", path, rec), path, rec, "image_id")
            file_name = require(entry, "file_name", path, rec)
            file_path = root.resolve(file_name, path, rec)
            group = grouped.get(image_id)
            if group is not None and group["path"] != file_path:
                raise DataError(
                    path,
                    rec,
                    f"image_id {shown(image_id)} is the image {shown(group['file_name'])} on line {group['line']}, "
                    f"but this line names {shown(file_name)}",
                )
            sentences = require(entry, "sentences", path, rec)
            if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) and s.strip() for s in sentences):
                raise DataError(path, rec, "field 'sentences' must be a non-empty list of non-empty strings")
            if "width" in entry and "height" in entry:
                size = image_size_field(entry["width"], entry["height"], path, rec)
                if group is not None and group["size"] != size:
                    raise DataError(
                        path,
                        rec,
                        f"image_id {shown(image_id)} is {group['size'][0]}x{group['size'][1]} on line {group['line']}, "
                        f"but this line says {size[0]}x{size[1]}",
                    )
                if verify_images:
                    headers.check(file_path, size, path, rec)
            elif group is not None:
                size = group["size"]  # the size an earlier line gave (or its header): the one the boxes go with
            else:
                size = headers.size(file_path, path, rec)
            box = xywh_box(require(entry, "bbox", path, rec), size, path, rec, outside)
            category = text_field(entry.get("category", ""), path, rec, "category")
            ann_id = optional_id(entry.get("ref_id", number), path, rec, "ref_id")
            if group is None:
                group = grouped[image_id] = {"path": file_path, "size": size, "objects": [], "file_name": file_name, "line": number}
            group["objects"].append(ObjectAnnotation(box=box, category=category, ann_id=ann_id, expressions=tuple(sentences)))
        except DataError as err:
            policy.handle(err)
    records = grouped_records(grouped, path)
    report.kept = len(records)
    return records, report


def _caption_fields(entry: Any, id_key: tuple[str, str], caption_key: tuple[str, str], path: Path, rec: str) -> None:
    """A captions file's entry holds the fields asked for; a missing one is named with the entry's
    own fields and the option that names another (LLaVA's answers: question_id, text)."""
    if not isinstance(entry, dict):
        raise DataError(path, rec, f"expected an object with an image id and a caption, got {json_type(entry)}")
    for key, option in (id_key, caption_key):
        if key not in entry:
            fields = ", ".join(map(repr, list(entry)[:8])) or "none"
            raise DataError(path, rec, f"missing field {key!r} (its fields: {fields}; {option} names the field to read)")


def _begins_with_object(path: Path) -> bool:
    """Whether a text file's first non-blank character opens a JSON object (its start alone read;
    a file that does not decode is left to the JSON reader, which names where)."""
    with open_text(path) as handle:
        try:
            while chunk := handle.read(4096):
                if stripped := chunk.lstrip():
                    return stripped.startswith("{")
        except (UnicodeDecodeError, OSError):
            return False
    return False


def load_caption_predictions(
    path: str | Path, image_id_key: str = "image_id", caption_key: str = "caption", on_error: OnError = "fail"
) -> tuple[list[dict], LoadReport]:
    """Captions to score, one an image: JSON Lines (`refloop caption`'s captions.jsonl, the JSONL
    the CHAIR forks of OPERA and others read) or a JSON array of objects (the original chair.py's
    caption file), each with an image id and a caption under the given keys. Returns them in file
    order as {image_id, caption, image} (`image`: the path the line names, if any, else None)."""
    path = Path(path)
    report = LoadReport(source=str(path))
    policy = Policy(on_error, report)
    # a .json file is a JSON array (chair.py's), unless it begins with an object: JSON Lines saved as .json
    if path.suffix.lower() == ".json" and not _begins_with_object(path):
        entries = list(enumerate(read_json_list(path, "caption objects"), 1))
        where = "entry"
    else:
        entries = list(jsonl_lines(path))
        where = "line"
    out: list[dict] = []
    seen: dict[str, int] = {}  # ids compared as text: 7 and "7" are one image
    reused: set[str] = set()
    for number, entry in entries:
        rec = f"{where} {number}"
        try:
            if isinstance(entry, DataError):
                raise entry
            _caption_fields(entry, (image_id_key, "--image-id-key"), (caption_key, "--caption-key"), path, rec)
            image_id = id_field(entry[image_id_key], path, rec, image_id_key)
            if str(image_id) in seen:
                reused.add(str(image_id))
                first = seen[str(image_id)]
                raise DataError(path, rec, f"image {shown(image_id)} already has a caption ({where} {first}): one caption an image")
            if entry[caption_key] is None:  # no caption is not an empty one (which hallucinates nothing)
                raise DataError(path, rec, f"field {caption_key!r} is null")
            caption = text_field(entry[caption_key], path, rec, caption_key)
            image = entry.get("image")
            seen[str(image_id)] = number
            out.append({"image_id": image_id, "caption": caption, "image": image if isinstance(image, str) else None})
        except DataError as err:
            policy.handle(err)
    if reused:  # under skip: which of an image's captions the file means is unknown, so none of them is scored
        for kept in [p for p in out if str(p["image_id"]) in reused]:
            report.skip(DataError(path, f"{where} {seen[str(kept['image_id'])]}", f"image {shown(kept['image_id'])} has another caption"))
        out = [p for p in out if str(p["image_id"]) not in reused]
    report.kept = len(out)
    return out, report


def load_pope_questions(
    path: str | Path, image_root: str | Path | None = None, on_error: OnError = "fail"
) -> tuple[list[ImageRecord], list[dict], LoadReport]:
    """A POPE question file as the POPE release ships them (`output/coco/coco_pope_{random,
    popular,adversarial}.json`, the sets published tables are scored on): JSON Lines of
    question_id, image (a file name under `image_root`), text, label (yes / no). Returns one record
    per image (first-seen order, size read from its header) and the questions in file order as
    {id, image_id, image, question, label}; a question's image id is its file name."""
    path = Path(path)
    root = ImageRoot(image_root if image_root is not None else path.parent)
    headers = ImageHeaders()
    report = LoadReport(source=str(path))
    policy = Policy(on_error, report)
    images: dict[str, dict] = {}
    questions: list[dict] = []
    seen: dict[Any, int] = {}
    for number, entry in jsonl_lines(path):
        rec = f"line {number}"
        try:
            if isinstance(entry, DataError):
                raise entry
            question_id = optional_id(require(entry, "question_id", path, rec), path, rec, "question_id")
            if question_id in seen:
                raise DataError(path, rec, f"question_id {shown(question_id)} is also the question on line {seen[question_id]}")
            name = text_field(require(entry, "image", path, rec), path, rec, "image")
            text = text_field(require(entry, "text", path, rec), path, rec, "text")
            label = text_field(require(entry, "label", path, rec), path, rec, "label").strip().lower()
            if not text.strip():
                raise DataError(path, rec, "field 'text' is empty")
            if label not in ("yes", "no"):
                raise DataError(path, rec, f"field 'label' must be yes or no, not {shown(entry['label'])}")
            if name not in images:
                file_path = root.resolve(name, path, rec)
                images[name] = {"path": file_path, "size": headers.size(file_path, path, rec), "objects": [], "file_name": name}
            seen[question_id] = number
            questions.append({"id": question_id, "image_id": name, "image": str(images[name]["path"]), "question": text, "label": label})
        except DataError as err:
            policy.handle(err)
    records = grouped_records(images, path)
    report.kept = len(questions)
    return records, questions, report
