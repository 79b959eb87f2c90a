"""Loaders of more real dataset formats, producing the same ImageRecord as `loaders.py`:
OpenImages box CSVs, RefCOCO / RefCOCO+ / RefCOCOg (JSON exports, or the original pickles through
a reader that refuses anything but plain containers), and Visual Genome JSON."""

from __future__ import annotations

import csv
import io
import pickle
from collections import defaultdict
from pathlib import Path
from typing import Any

from refloop.boxes import Box, InvalidBoxError, OutsidePolicy, validate_box
from refloop.data.loaders import (
    LoadReport,
    OnError,
    _number,
    _Policy,
    _read_json,
    _require,
    _xywh_box,
    grouped_records,
    image_size,
)
from refloop.data.paths import resolve_image_path
from refloop.data.records import ImageRecord, ObjectAnnotation
from refloop.errors import DataError


# ---- OpenImages ---------------------------------------------------------------------------------
def load_openimages(
    boxes_csv: str | Path,
    class_descriptions_csv: str | Path,
    image_root: str | Path,
    on_error: OnError = "fail",
    outside: OutsidePolicy = "clip",
    extension: str = ".jpg",
) -> tuple[list[ImageRecord], LoadReport]:
    """OpenImages V4-V7 box annotations: ImageID, LabelName, XMin, XMax, YMin, YMax (normalised),
    IsGroupOf...; class names from the class-descriptions CSV (with or without a header row).
    Image sizes come from the image files ({ImageID}{extension} under `image_root`)."""
    boxes_csv, names_csv, root = Path(boxes_csv), Path(class_descriptions_csv), Path(image_root)
    report = LoadReport(source=str(boxes_csv))
    policy = _Policy(on_error, report)
    try:
        rows = list(csv.reader(io.StringIO(names_csv.read_text())))
    except FileNotFoundError:
        raise DataError(names_csv, None, "file not found") from None
    names = {r[0]: r[1] for r in rows if len(r) >= 2 and r[0] != "LabelName"}
    try:
        handle = open(boxes_csv, newline="")
    except FileNotFoundError:
        raise DataError(boxes_csv, None, "file not found") from None
    groups: dict[str, dict] = {}
    with handle:
        reader = csv.DictReader(handle)
        missing = {"ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(boxes_csv, None, f"missing columns {sorted(missing)}: not an OpenImages boxes CSV")
        for number, row in enumerate(reader, start=2):
            rec = f"line {number}"
            try:
                image_id = row["ImageID"]
                if row["LabelName"] not in names:
                    raise DataError(boxes_csv, rec, f"label {row['LabelName']!r} is not in {names_csv.name}")
                if image_id not in groups:
                    file_name = f"{image_id}{extension}"
                    path = resolve_image_path(root, file_name, boxes_csv, rec)
                    groups[image_id] = {"path": path, "size": image_size(path, boxes_csv, rec), "objects": [], "file_name": file_name}
                w, h = groups[image_id]["size"]
                try:
                    x1, x2, y1, y2 = (float(row[k]) for k in ("XMin", "XMax", "YMin", "YMax"))
                except ValueError:
                    raise DataError(boxes_csv, rec, "XMin/XMax/YMin/YMax must be numbers") from None
                try:
                    box = validate_box(Box(x1 * w, y1 * h, x2 * w, y2 * h), (w, h), outside=outside)
                except InvalidBoxError as exc:
                    raise DataError(boxes_csv, rec, f"invalid box: {exc}") from None
                groups[image_id]["objects"].append(ObjectAnnotation(box, names[row["LabelName"]], ann_id=number))
            except DataError as err:
                policy.handle(err)
    records = grouped_records(groups, boxes_csv)
    report.kept = len(records)
    return records, report


# ---- RefCOCO family -------------------------------------------------------------------------------
class _PlainUnpickler(pickle.Unpickler):
    """Unpickles only built-in containers and scalars: any class or function reference (the way a
    malicious pickle runs code) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: refloop reads only plain data from pickles")


def read_refs(path: Path) -> list[dict]:
    """RefCOCO `refs(...)` annotations from a JSON export or the original pickle (restricted)."""
    if path.suffix == ".json":
        data = _read_json(path)
    else:
        try:
            with open(path, "rb") as f:
                data = _PlainUnpickler(f).load()
        except FileNotFoundError:
            raise DataError(path, None, "file not found") from None
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise DataError(path, None, f"cannot read refs pickle safely: {exc}") from None
    if not isinstance(data, list):
        raise DataError(path, None, "expected a list of refs")
    return data


def load_refcoco(
    instances_json: str | Path,
    refs_path: str | Path,
    image_root: str | Path,
    split: str | None = None,
    on_error: OnError = "fail",
    outside: OutsidePolicy = "clip",
) -> tuple[list[ImageRecord], LoadReport]:
    """RefCOCO / RefCOCO+ / RefCOCOg: COCO `instances.json` (boxes) + refs (sentences per ann_id).
    `split` keeps one of train/val/test/testA/testB."""
    instances, refs_path, root = Path(instances_json), Path(refs_path), Path(image_root)
    data = _read_json(instances)
    report = LoadReport(source=str(refs_path))
    policy = _Policy(on_error, report)
    images = {img["id"]: img for img in data.get("images", []) if isinstance(img, dict) and "id" in img}
    anns = {a["id"]: a for a in data.get("annotations", []) if isinstance(a, dict) and "id" in a}
    cats = {c["id"]: c.get("name", "") for c in data.get("categories", []) if isinstance(c, dict) and "id" in c}
    groups: dict[Any, dict] = {}
    for i, ref in enumerate(read_refs(refs_path)):
        rec = f"refs[{i}]"
        try:
            if split is not None and _require(ref, "split", refs_path, rec) != split:
                continue
            ann_id = _require(ref, "ann_id", refs_path, rec)
            if ann_id not in anns:
                raise DataError(refs_path, rec, f"ann_id {ann_id!r} is not in {instances.name}")
            ann = anns[ann_id]
            image_id = ann.get("image_id")
            if image_id not in images:
                raise DataError(refs_path, rec, f"image_id {image_id!r} is not in {instances.name}")
            sentences = [s.get("sent") or s.get("raw") if isinstance(s, dict) else s for s in _require(ref, "sentences", refs_path, rec)]
            sentences = [s for s in sentences if isinstance(s, str) and s.strip()]
            if not sentences:
                raise DataError(refs_path, rec, "no sentences")
            if image_id not in groups:
                img = images[image_id]
                file_name = _require(img, "file_name", instances, f"image {image_id}")
                size = (
                    int(_number(img.get("width"), instances, f"image {image_id}", "width")),
                    int(_number(img.get("height"), instances, f"image {image_id}", "height")),
                )
                groups[image_id] = {
                    "path": resolve_image_path(root, file_name, instances, f"image {image_id}"),
                    "size": size,
                    "objects": [],
                    "file_name": file_name,
                }
            box = _xywh_box(
                _require(ann, "bbox", instances, f"annotation {ann_id}"),
                groups[image_id]["size"],
                instances,
                f"annotation {ann_id}",
                outside,
            )
            category = cats.get(ref.get("category_id", ann.get("category_id")), "")
            groups[image_id]["objects"].append(
                ObjectAnnotation(box, category, ann_id=ref.get("ref_id", ann_id), expressions=tuple(sentences))
            )
        except DataError as err:
            policy.handle(err)
    records = grouped_records(groups, refs_path)
    report.kept = len(records)
    return records, report


# ---- Visual Genome --------------------------------------------------------------------------------
def load_visual_genome(
    image_data_json: str | Path,
    image_root: str | Path,
    objects_json: str | Path | None = None,
    region_descriptions_json: str | Path | None = None,
    on_error: OnError = "fail",
    outside: OutsidePolicy = "clip",
) -> tuple[list[ImageRecord], LoadReport]:
    """Visual Genome: image_data.json (sizes) plus objects.json (boxes with names) and/or
    region_descriptions.json (boxes with phrases, kept as referring expressions). Images are
    `{image_id}.jpg` under `image_root` (VG_100K and VG_100K_2 merged)."""
    meta_path, root = Path(image_data_json), Path(image_root)
    report = LoadReport(source=str(meta_path))
    policy = _Policy(on_error, report)
    meta = {}
    for i, img in enumerate(_read_json(meta_path)):
        try:
            image_id = _require(img, "image_id" if "image_id" in img else "id", meta_path, f"images[{i}]")
            size = (
                int(_number(img.get("width"), meta_path, f"images[{i}]", "width")),
                int(_number(img.get("height"), meta_path, f"images[{i}]", "height")),
            )
            meta[image_id] = size
        except DataError as err:
            policy.handle(err)
    objects: dict[Any, list[ObjectAnnotation]] = defaultdict(list)
    if objects_json is not None:
        source = Path(objects_json)
        for i, entry in enumerate(_read_json(source)):
            try:
                image_id = _require(entry, "image_id", source, f"[{i}]")
                if image_id not in meta:
                    raise DataError(source, f"[{i}]", f"image_id {image_id!r} is not in {meta_path.name}")
                for j, obj in enumerate(_require(entry, "objects", source, f"[{i}]")):
                    rec = f"[{i}].objects[{j}]"
                    xywh = [_require(obj, k, source, rec) for k in ("x", "y", "w", "h")]
                    names = obj.get("names") or ([obj["name"]] if "name" in obj else [])
                    objects[image_id].append(
                        ObjectAnnotation(
                            _xywh_box(xywh, meta[image_id], source, rec, outside),
                            str(names[0]) if names else "",
                            ann_id=obj.get("object_id"),
                        )
                    )
            except DataError as err:
                policy.handle(err)
    if region_descriptions_json is not None:
        source = Path(region_descriptions_json)
        for i, entry in enumerate(_read_json(source)):
            for j, region in enumerate(entry.get("regions", []) if isinstance(entry, dict) else []):
                rec = f"[{i}].regions[{j}]"
                try:
                    image_id = _require(region, "image_id", source, rec)
                    if image_id not in meta:
                        raise DataError(source, rec, f"image_id {image_id!r} is not in {meta_path.name}")
                    xywh = [_require(region, k, source, rec) for k in ("x", "y", "width", "height")]
                    phrase = str(_require(region, "phrase", source, rec)).strip()
                    if not phrase:
                        raise DataError(source, rec, "empty phrase")
                    box = _xywh_box(xywh, meta[image_id], source, rec, outside)
                    objects[image_id].append(ObjectAnnotation(box, "", ann_id=region.get("region_id"), expressions=(phrase,)))
                except DataError as err:
                    policy.handle(err)
    groups = {}
    for image_id, objs in objects.items():
        try:
            file_name = f"{image_id}.jpg"
            groups[image_id] = {
                "path": resolve_image_path(root, file_name, meta_path, f"image {image_id}"),
                "size": meta[image_id],
                "objects": objs,
                "file_name": file_name,
            }
        except DataError as err:
            policy.handle(err)
    records = grouped_records(groups, meta_path)
    report.kept = len(records)
    return records, report
