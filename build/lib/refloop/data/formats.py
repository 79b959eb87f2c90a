"""Loaders of more real dataset formats, producing the same ImageRecord as `loaders.py`:
OpenImages box CSVs, RefCOCO / RefCOCO+ / RefCOCOg (JSON exports, or the original pickles through
a reader that refuses anything but plain containers), and Visual Genome JSON (objects and regions as
ImageRecords; relationships as `Relation` triplets by image).

The failure policy of `loaders.py` holds here too: a bad row or record is a DataError naming the
file and the row (skipped and counted under `on_error="skip"`), a bad file a DataError, and no other
exception escapes. Ids are strings or numbers; an id given twice in `images` (RefCOCO instances,
Visual Genome image_data) or `annotations` / `categories` (RefCOCO instances) is refused, and under
"skip" every entry with that id is dropped. RefCOCO `sentences` and Visual Genome `names` must be
lists (a string would be read letter by letter).
"""

from __future__ import annotations

import csv
import io
import pickle
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refloop.boxes import Box, InvalidBoxError, OutsidePolicy, validate_box
from refloop.data.fields import (
    ESCAPED,
    LoadReport,
    OnError,
    Policy,
    UniqueIds,
    id_field,
    image_size_field,
    is_id,
    json_type,
    open_binary,
    open_text,
    optional_id,
    read_json,
    read_json_list,
    read_text,
    require,
    text_field,
    xywh_box,
)
from refloop.data.images import image_size
from refloop.data.loaders import grouped_records
from refloop.data.paths import ImageRoot, shown
from refloop.data.records import ImageRecord, ObjectAnnotation
from refloop.errors import DataError


def _csv_rows(reader: Any, path: Path, policy: Policy) -> Iterator[list | dict | DataError]:
    """The rows of a csv reader (or DictReader); a row csv cannot parse (a field beyond csv's size
    limit, ...) is yielded as its DataError, so the caller counts it as a row and goes on. A file
    that stops decoding (UTF-16/32) is a DataError of the whole file."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # the line csv read last (a DictReader's own count is not updated by a failed row)
            yield DataError(path, f"line {getattr(reader, 'reader', reader).line_num}", f"not valid CSV: {exc}")
            continue
        except UnicodeDecodeError as exc:
            raise DataError(path, None, f"cannot decode the file: {exc.reason} (after line {reader.line_num})") from None
        except OSError as exc:
            raise DataError(path, None, f"cannot read the file: {exc.strerror or exc} (after line {reader.line_num})") from None
        yield row


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
    boxes_csv, names_csv = Path(boxes_csv), Path(class_descriptions_csv)
    report = LoadReport(source=str(boxes_csv))
    policy = Policy(on_error, report)
    names: dict[str, str] = {}
    names_reader = csv.reader(io.StringIO(read_text(names_csv)))
    for r in _csv_rows(names_reader, names_csv, policy):
        if isinstance(r, DataError):
            policy.handle(r)
        elif len(r) >= 2 and r[0] != "LabelName":
            names[r[0]] = r[1]
    root = ImageRoot(image_root)
    groups: dict[str, dict] = {}
    with open_text(boxes_csv, newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            fieldnames = reader.fieldnames
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(boxes_csv, None, f"cannot read the header row: {exc}") from None
        missing = set(_OPENIMAGES_COLUMNS) - set(fieldnames or [])
        if missing:
            raise DataError(boxes_csv, None, f"missing columns {sorted(missing)}: not an OpenImages boxes CSV")
        for number, row in enumerate(_csv_rows(reader, boxes_csv, policy), start=2):
            rec = f"line {number}"
            try:
                if isinstance(row, DataError):  # named by its row number, as every row is
                    raise DataError(boxes_csv, rec, row.problem)
                if any(row[k] is None for k in _OPENIMAGES_COLUMNS):
                    raise DataError(boxes_csv, rec, "the row has fewer fields than the header")
                image_id, label = row["ImageID"], row["LabelName"]
                if not (image_id.isascii() and label.isascii()) and ESCAPED.search(image_id + label):
                    raise DataError(boxes_csv, rec, "not UTF-8 text (a byte that is no UTF-8 in ImageID or LabelName)")
                if label not in names:
                    raise DataError(boxes_csv, rec, f"label {shown(label)} is not in {names_csv.name}")
                if image_id not in groups:
                    file_name = f"{image_id}{extension}"
                    path = root.resolve(file_name, boxes_csv, rec)
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


_OPENIMAGES_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax")


# ---- RefCOCO family -------------------------------------------------------------------------------
class _PlainUnpickler(pickle.Unpickler):
    """Unpickles only built-in containers and scalars: any class or function reference (the way a
    malicious pickle runs code) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: refloop reads only plain data from pickles")


def read_refs(path: str | Path) -> list:
    """RefCOCO `refs(...)` annotations from a JSON export or the original pickle (restricted)."""
    path = Path(path)
    if path.suffix == ".json":
        data = read_json(path)
    else:
        with open_binary(path) as f:
            try:
                raw = f.read()
            except OSError as exc:
                raise DataError(path, None, f"cannot read the file: {exc.strerror or exc}") from None
        try:  # from memory: a length field claiming gigabytes cannot make a file read allocate them
            data = _PlainUnpickler(io.BytesIO(raw)).load()
        except Exception as exc:  # a refused reference, or a malformed pickle (EOFError, KeyError, ValueError, ...)
            raise DataError(path, None, f"cannot read refs pickle safely: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, list):
        raise DataError(path, None, f"expected a list of refs, got {json_type(data)}")
    return data


def _entries_by_id(data: dict, key: str, path: Path, policy: Policy) -> dict:
    """{id: entry} of one list of a COCO instances file; an entry without a usable id, or reusing
    one, is a DataError (under "skip", every entry of a reused id is dropped)."""
    entries = data.get(key, [])
    if not isinstance(entries, list):
        raise DataError(path, None, f"{key!r} must be a list, got {json_type(entries)}")
    out: dict = {}
    ids = UniqueIds(path, key)
    for i, entry in enumerate(entries):
        rec = f"{key}[{i}]"
        try:
            entry_id = id_field(require(entry, "id", path, rec), path, rec, "id")
            ids.claim(entry_id, i)
            out[entry_id] = entry
        except DataError as err:
            policy.handle(err)
    for entry_id, err in ids.reused():
        del out[entry_id]
        policy.handle(err)
    return out


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
    instances, refs_path = Path(instances_json), Path(refs_path)
    data = read_json(instances)
    if not isinstance(data, dict):
        raise DataError(instances, None, f"expected a JSON object at the top level, got {json_type(data)}: not a COCO instances file")
    report = LoadReport(source=str(refs_path))
    policy = Policy(on_error, report)
    images = _entries_by_id(data, "images", instances, policy)
    anns = _entries_by_id(data, "annotations", instances, policy)
    cats: dict[Any, str] = {}
    for cat_id, cat in _entries_by_id(data, "categories", instances, policy).items():
        try:
            cats[cat_id] = text_field(cat.get("name", ""), instances, f"category {cat_id}", "name")
        except DataError as err:
            policy.handle(err)
    root = ImageRoot(image_root)
    refs = read_refs(refs_path)
    groups: dict[Any, dict] = {}
    for i, ref in enumerate(refs):
        rec = f"refs[{i}]"
        try:
            if split is not None:
                ref_split = require(ref, "split", refs_path, rec)
                if type(ref_split) is not str:
                    raise DataError(refs_path, rec, f"field 'split' must be a string, got {shown(ref_split)}")
                if ref_split != split:
                    continue
            ann_id = id_field(require(ref, "ann_id", refs_path, rec), refs_path, rec, "ann_id")
            if ann_id not in anns:
                raise DataError(refs_path, rec, f"ann_id {shown(ann_id)} is not in {instances.name}")
            ann = anns[ann_id]
            image_id = ann.get("image_id")
            if not is_id(image_id) or image_id not in images:
                raise DataError(refs_path, rec, f"image_id {shown(image_id)} is not in {instances.name}")
            raw = require(ref, "sentences", refs_path, rec)
            if not isinstance(raw, (list, tuple)):
                raise DataError(refs_path, rec, f"field 'sentences' must be a list of sentences, got {json_type(raw)}")
            sentences = [s.get("sent") or s.get("raw") if isinstance(s, dict) else s for s in raw]
            sentences = [s for s in sentences if isinstance(s, str) and s.strip()]
            if not sentences:
                raise DataError(refs_path, rec, "no sentences")
            if image_id not in groups:
                img, where = images[image_id], f"image {image_id}"
                file_name = require(img, "file_name", instances, where)
                size = image_size_field(img.get("width"), img.get("height"), instances, where)
                groups[image_id] = {"path": root.resolve(file_name, instances, where), "size": size, "objects": [], "file_name": file_name}
            box = xywh_box(
                require(ann, "bbox", instances, f"annotation {ann_id}"),
                groups[image_id]["size"],
                instances,
                f"annotation {ann_id}",
                outside,
            )
            category_id = optional_id(ref.get("category_id", ann.get("category_id")), refs_path, rec, "category_id")
            category = cats.get(category_id, "")
            ref_id = optional_id(ref.get("ref_id", ann_id), refs_path, rec, "ref_id")
            groups[image_id]["objects"].append(ObjectAnnotation(box, category, ann_id=ref_id, expressions=tuple(sentences)))
        except DataError as err:
            policy.handle(err)
    records = grouped_records(groups, refs_path)
    report.kept = len(records)
    return records, report


# ---- Visual Genome --------------------------------------------------------------------------------
def _per_image_lists(source: Path, key: str, known, known_where: str, policy: Policy) -> Iterator[tuple[int, Any, list]]:
    """(entry index, image_id, entry[key]) of a Visual Genome per-image file (objects.json,
    relationships.json): each entry names a known image and holds a list under `key`; a bad entry
    goes to the failure policy."""
    for i, entry in enumerate(read_json_list(source, f"images with {key}")):
        try:
            image_id = id_field(require(entry, "image_id", source, f"[{i}]"), source, f"[{i}]", "image_id")
            if image_id not in known:
                raise DataError(source, f"[{i}]", f"image_id {shown(image_id)} is not {known_where}")
            items = require(entry, key, source, f"[{i}]")
            if not isinstance(items, list):
                raise DataError(source, f"[{i}]", f"field '{key}' must be a list, got {json_type(items)}")
        except DataError as err:
            policy.handle(err)
            continue
        yield i, image_id, items


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
    meta_path = Path(image_data_json)
    report = LoadReport(source=str(meta_path))
    policy = Policy(on_error, report)
    meta: dict[Any, tuple[int, int]] = {}
    ids = UniqueIds(meta_path, "images", "image id")
    for i, img in enumerate(read_json_list(meta_path, "images")):
        rec = f"images[{i}]"
        try:
            key = "image_id" if isinstance(img, dict) and "image_id" in img else "id"
            image_id = id_field(require(img, key, meta_path, rec), meta_path, rec, key)
            ids.claim(image_id, i)
            meta[image_id] = image_size_field(img.get("width"), img.get("height"), meta_path, rec)
        except DataError as err:
            policy.handle(err)
    for image_id, err in ids.reused():  # on_error="skip": a reused id has no size for sure
        if meta.pop(image_id, None) is not None:
            policy.handle(err)
    objects: dict[Any, list[ObjectAnnotation]] = defaultdict(list)
    if objects_json is not None:
        source = Path(objects_json)
        for i, image_id, entry_objects in _per_image_lists(source, "objects", meta, f"in {meta_path.name}", policy):
            for j, obj in enumerate(entry_objects):
                rec = f"[{i}].objects[{j}]"
                try:
                    xywh = [require(obj, k, source, rec) for k in ("x", "y", "w", "h")]
                    names = obj.get("names") or ([obj["name"]] if "name" in obj else [])
                    if not isinstance(names, list):
                        raise DataError(source, rec, f"field 'names' must be a list of names, got {json_type(names)}")
                    box = xywh_box(xywh, meta[image_id], source, rec, outside)
                    category = text_field(names[0], source, rec, "names") if names else ""
                    objects[image_id].append(
                        ObjectAnnotation(box, category, ann_id=optional_id(obj.get("object_id"), source, rec, "object_id"))
                    )
                except DataError as err:
                    policy.handle(err)
    if region_descriptions_json is not None:
        source = Path(region_descriptions_json)
        for i, entry in enumerate(read_json_list(source, "images with regions")):
            try:
                if not isinstance(entry, dict):
                    raise DataError(source, f"[{i}]", f"expected an object, got {json_type(entry)}")
                regions = entry.get("regions", [])
                if not isinstance(regions, list):
                    raise DataError(source, f"[{i}]", f"field 'regions' must be a list, got {json_type(regions)}")
            except DataError as err:
                policy.handle(err)
                continue
            for j, region in enumerate(regions):
                rec = f"[{i}].regions[{j}]"
                try:
                    image_id = id_field(require(region, "image_id", source, rec), source, rec, "image_id")
                    if image_id not in meta:
                        raise DataError(source, rec, f"image_id {shown(image_id)} is not in {meta_path.name}")
                    xywh = [require(region, k, source, rec) for k in ("x", "y", "width", "height")]
                    phrase = text_field(require(region, "phrase", source, rec), source, rec, "phrase").strip()
                    if not phrase:
                        raise DataError(source, rec, "empty phrase")
                    box = xywh_box(xywh, meta[image_id], source, rec, outside)
                    region_id = optional_id(region.get("region_id"), source, rec, "region_id")
                    objects[image_id].append(ObjectAnnotation(box, "", ann_id=region_id, expressions=(phrase,)))
                except DataError as err:
                    policy.handle(err)
    root = ImageRoot(image_root)
    groups = {}
    for image_id, objs in objects.items():
        try:
            file_name = f"{image_id}.jpg"
            groups[image_id] = {
                "path": root.resolve(file_name, meta_path, f"image {image_id}"),
                "size": meta[image_id],
                "objects": objs,
                "file_name": file_name,
            }
        except DataError as err:
            policy.handle(err)
    records = grouped_records(groups, meta_path)
    report.kept = len(records)
    return records, report


@dataclass(frozen=True)
class Relation:
    """One 'subject predicate object' triplet of an image (man - wearing - hat), the annotation of
    Pink's relation reasoning tasks. Both ends carry their own box and name, as VG writes them."""

    subject: ObjectAnnotation
    predicate: str
    object: ObjectAnnotation


def _relation_end(entry: Any, size: tuple[int, int], source: Path, rec: str, outside: OutsidePolicy) -> ObjectAnnotation:
    """A relationship's subject or object: x, y, w, h and `names` (VG 1.4) or `name` (VG 1.2)."""
    xywh = [require(entry, k, source, rec) for k in ("x", "y", "w", "h")]
    names = entry.get("names") or ([entry["name"]] if "name" in entry else [])
    if not isinstance(names, list):
        raise DataError(source, rec, f"field 'names' must be a list of names, got {json_type(names)}")
    category = text_field(names[0], source, rec, "names") if names else ""
    ann_id = optional_id(entry.get("object_id"), source, rec, "object_id")
    return ObjectAnnotation(xywh_box(xywh, size, source, rec, outside), category, ann_id=ann_id)


def load_visual_genome_relationships(
    relationships_json: str | Path,
    image_sizes: Mapping[Any, tuple[int, int]],
    on_error: OnError = "fail",
    outside: OutsidePolicy = "clip",
) -> tuple[dict[Any, list[Relation]], LoadReport]:
    """Visual Genome relationships.json -> {image_id: [Relation, ...]}. `image_sizes` holds the
    (width, height) of each image the triplets may name, e.g. `{r.image_id: r.size for r in records}`
    of `load_visual_genome`; a triplet of another image is a DataError. Predicates are lower-cased
    with spaces collapsed (VG writes both 'ON' and 'on')."""
    source = Path(relationships_json)
    report = LoadReport(source=str(source))
    policy = Policy(on_error, report)
    relations: dict[Any, list[Relation]] = defaultdict(list)
    for i, image_id, triplets in _per_image_lists(source, "relationships", image_sizes, "among the loaded images", policy):
        for j, triplet in enumerate(triplets):
            rec = f"[{i}].relationships[{j}]"
            try:
                predicate = " ".join(text_field(require(triplet, "predicate", source, rec), source, rec, "predicate").lower().split())
                if not predicate:
                    raise DataError(source, rec, "empty predicate")
                size = image_sizes[image_id]
                subject = _relation_end(require(triplet, "subject", source, rec), size, source, f"{rec}.subject", outside)
                object_ = _relation_end(require(triplet, "object", source, rec), size, source, f"{rec}.object", outside)
                relations[image_id].append(Relation(subject, predicate, object_))
            except DataError as err:
                policy.handle(err)
    report.kept = sum(len(v) for v in relations.values())
    return dict(relations), report
