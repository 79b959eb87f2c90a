"""Hugging Face datasets as local parquet files: referring and detection data in, refloop's JSONL
outputs out.

Two published layouts are read (the image column is the `datasets` Image feature, a struct
{bytes, path}, or raw bytes, or a path string):
- referring, one row per referred object (lmms-eval's RefCOCO/+/g: `question_id`, `image`,
  `question`, `answer` [expressions], `segmentation`, `bbox` [x, y, w, h], `iscrowd`,
  `file_name`): rows of one image (same `file_name`, else the same image path) group into one
  record; `answer` may also be named `sentences` (as in refloop's referring JSONL, which names its
  images by `file_name` alone and so reads as JSONL, not through parquet);
- detection, one row per image (the `datasets` object-detection layout: `image`, `image_id`,
  `width`, `height`, `objects` {bbox: [[x, y, w, h]...], category: [...], id: [...]}); integer
  categories are named from the file's ClassLabel feature when it has one.

Images stored as bytes stay compressed in memory (`ImageRecord.data`): their header is checked at
load (a known format, the size the row claims, within MAX_IMAGE_PIXELS) exactly as for files, and
they are decoded when a model needs them. An image given by path resolves under the image root.

Bad rows follow the failure policy: DataError naming the file and `row N` (0-based, as
`datasets` indexes them), skipped and counted under `on_error="skip"`; a missing column or an
unreadable file is a DataError of the whole file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from refloop.boxes import OutsidePolicy
from refloop.data.fields import LoadReport, OnError, Policy, id_field, image_size_field, optional_id, text_field, xywh_box
from refloop.data.images import ImageHeaders, image_size
from refloop.data.jsonl import replaced_whole
from refloop.data.loaders import grouped_records
from refloop.data.paths import ImageRoot, shown
from refloop.data.records import ObjectAnnotation
from refloop.errors import DataError, RefloopError

_EXPRESSION_COLUMNS = ("answer", "sentences")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise RefloopError("parquet files need pyarrow: pip install pyarrow (or pip install 'refloop[hf]')") from None
    return pyarrow


def _open(path: Path):
    pa = _pyarrow()
    if not path.is_file():
        raise DataError(path, None, "file not found" if not path.exists() else "is a directory, not a file")
    try:
        return pa.parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(path, None, f"not a readable parquet file: {exc}") from None


def _rows(handle, path: Path, columns: list[str]):
    """(row index, row dict) over the file, a few hundred rows in memory at a time; a row whose
    text does not decode (not UTF-8) comes as (row index, DataError naming the column), for the
    caller's failure policy."""
    pa = _pyarrow()
    index = 0
    try:
        for batch in handle.iter_batches(batch_size=256, columns=columns):
            try:
                rows = batch.to_pylist()
            except UnicodeDecodeError:  # one row at a time, to name the bad ones
                rows = [_decoded(batch, j, path, f"row {index + j}") for j in range(batch.num_rows)]
            for row in rows:
                yield index, row
                index += 1
    except (pa.ArrowException, OSError) as exc:
        raise DataError(path, f"row {index}", f"cannot read the parquet data: {exc}") from None


def _decoded(batch, j: int, path: Path, record: str) -> dict | DataError:
    row = {}
    for name in batch.column_names:
        try:
            row[name] = batch.column(name)[j].as_py()
        except UnicodeDecodeError as exc:
            return DataError(path, record, f"field {name!r} holds text that is not UTF-8 ({exc.reason} at byte {exc.start})")
    return row


def _image(value: Any, source: Path, record: str) -> tuple[bytes | None, str | None]:
    """(encoded bytes, path) of an image cell: the `datasets` Image struct, raw bytes or a path."""
    if isinstance(value, dict):
        data, name = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, str)):
        data, name = (value, None) if isinstance(value, bytes) else (None, value)
    else:
        data = name = None
    if data is not None and not isinstance(data, bytes) or name is not None and not isinstance(name, str):
        raise DataError(source, record, f"field 'image' must hold image bytes or a path, got {shown(value)}")
    if not data and not name:
        raise DataError(source, record, f"field 'image' holds neither image bytes nor a path, got {shown(value)}")
    return data or None, name or None


def _expressions(value: Any, source: Path, record: str, column: str) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(s, str) and s.strip() for s in values):
        raise DataError(source, record, f"field {column!r} must be a non-empty list of non-empty strings, got {shown(value)}")
    return tuple(values)


def _category_names(schema) -> list[str] | None:
    """The ClassLabel names of the objects' category in the file's `datasets` features, if any."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        features = json.loads(meta)["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return None

    def find(node: Any) -> list[str] | None:
        if isinstance(node, dict):
            if node.get("_type") == "ClassLabel" and isinstance(node.get("names"), list):
                return node["names"]
            for key in ("category", "feature"):
                if key in node and (found := find(node[key])) is not None:
                    return found
        if isinstance(node, list) and node:
            return find(node[0])
        return None

    return find(features.get("objects"))


class _Images:
    """The image of each row: in memory (bytes, header checked once per image) or a file under the
    root (header checked once per file)."""

    def __init__(self, path: Path, image_root: str | Path | None) -> None:
        self.path, self.root, self.headers = path, ImageRoot(image_root if image_root is not None else path.parent), ImageHeaders()

    def locate(self, value: Any, file_name: str | None, record: str) -> tuple[Path, bytes | None, str]:
        """(path, bytes or None, file name) of a row's image."""
        data, name = _image(value, self.path, record)
        file_name = file_name or name
        if data is None:
            return self.root.resolve(name, self.path, record), None, file_name
        return self.path / (file_name or record.replace(" ", "-")), data, file_name or ""

    def size(self, where: Path, data: bytes | None, record: str) -> tuple[int, int]:
        return self.headers.size(where, self.path, record) if data is None else image_size(where, self.path, record, data)


def load_parquet(
    path: str | Path,
    image_root: str | Path | None = None,
    on_error: OnError = "fail",
    outside: OutsidePolicy = "clip",
) -> tuple[list, LoadReport]:
    """Referring or detection rows of a parquet file (layout chosen by its columns) -> one
    ImageRecord per image. Every image's header is checked (the pixels are read later)."""
    path = Path(path)
    handle = _open(path)
    columns = handle.schema_arrow.names
    report = LoadReport(source=str(path))
    policy = Policy(on_error, report)
    if "image" not in columns:
        hint = (
            "; its rows name their images by file_name alone (refloop's referring JSONL written by export-parquet?): "
            "give --data the JSONL itself"
            if "file_name" in columns
            else ""
        )
        raise DataError(path, None, f"missing column 'image' (columns: {', '.join(columns)}){hint}")
    if "objects" in columns:
        grouped = _detection_rows(handle, path, columns, image_root, policy, outside)
    elif "bbox" in columns:
        grouped = _referring_rows(handle, path, columns, image_root, policy, outside)
        from refloop.parallel import is_main_process

        if not {"file_name", "image_id"} & set(columns) and is_main_process():
            logging.getLogger(__name__).warning(
                f"{path}: the rows name no file_name or image_id, so each row is an image of its own "
                "(boxes of one picture are not grouped; add either column to group them)"
            )
    else:
        raise DataError(path, None, f"missing column 'bbox' (referring rows) or 'objects' (detection rows); columns: {', '.join(columns)}")
    records = [replace(r, data=grouped[r.image_id]["data"]) for r in grouped_records(grouped, path)]
    report.kept = len(records)
    return records, report


def _referring_rows(handle, path: Path, columns: list[str], image_root, policy: Policy, outside: OutsidePolicy) -> dict:
    expression_column = next((c for c in _EXPRESSION_COLUMNS if c in columns), None)
    if expression_column is None:
        raise DataError(path, None, f"missing column 'answer' (the referring expressions); columns: {', '.join(columns)}")
    images = _Images(path, image_root)
    optional = [c for c in ("question_id", "file_name", "image_id", "category", "width", "height") if c in columns]
    grouped: dict[Any, dict] = {}
    for i, row in _rows(handle, path, ["image", "bbox", expression_column, *optional]):
        rec = f"row {i}"
        try:
            if isinstance(row, DataError):
                raise row
            file_name = text_field(row.get("file_name"), path, rec, "file_name") or None
            where, data, file_name = images.locate(row["image"], file_name, rec)
            image_id = id_field(row["image_id"], path, rec, "image_id") if row.get("image_id") is not None else file_name or str(where)
            group = grouped.get(image_id)
            if group is not None:
                if group["data"] != data or group["path"] != where:  # one image per file_name: never boxes on another picture
                    raise DataError(
                        path,
                        rec,
                        f"image {shown(image_id)} is also the image of {group['row']}, with other "
                        f"{'bytes' if data is not None and group['data'] is not None else 'contents'}; give each image its own file_name",
                    )
                size = group["size"]
            elif row.get("width") is not None and row.get("height") is not None:
                size = image_size_field(row["width"], row["height"], path, rec)
                if images.size(where, data, rec) != size:
                    raise DataError(path, rec, f"image {where} is not {size[0]}x{size[1]} as the row says")
            else:
                size = images.size(where, data, rec)
            box = xywh_box(row["bbox"], size, path, rec, outside)
            expressions = _expressions(row[expression_column], path, rec, expression_column)
            category = text_field(row.get("category"), path, rec, "category")
            ann_id = optional_id(row.get("question_id", i), path, rec, "question_id")
        except DataError as err:
            policy.handle(err)
            continue
        if group is None:
            group = grouped[image_id] = {"path": where, "size": size, "objects": [], "file_name": file_name, "data": data, "row": rec}
        group["objects"].append(ObjectAnnotation(box=box, category=category, ann_id=ann_id, expressions=expressions))
    return grouped


def _detection_rows(handle, path: Path, columns: list[str], image_root, policy: Policy, outside: OutsidePolicy) -> dict:
    names = _category_names(handle.schema_arrow)
    images = _Images(path, image_root)
    optional = [c for c in ("image_id", "file_name", "width", "height") if c in columns]
    grouped: dict[Any, dict] = {}
    for i, row in _rows(handle, path, ["image", "objects", *optional]):
        rec = f"row {i}"
        try:
            if isinstance(row, DataError):
                raise row
            file_name = text_field(row.get("file_name"), path, rec, "file_name") or None
            where, data, file_name = images.locate(row["image"], file_name, rec)
            image_id = id_field(row["image_id"], path, rec, "image_id") if row.get("image_id") is not None else i
            if image_id in grouped:
                raise DataError(path, rec, f"image_id {shown(image_id)} is already used by an earlier row")
            size = images.size(where, data, rec)
            claimed = (row.get("width"), row.get("height"))
            if None not in claimed and image_size_field(*claimed, path, rec) != size:
                raise DataError(path, rec, f"image {where} is {size[0]}x{size[1]}, not {row['width']}x{row['height']} as the row says")
            objects = _objects(row["objects"], size, names, path, rec, outside)
        except DataError as err:
            policy.handle(err)
            continue
        grouped[image_id] = {"path": where, "size": size, "objects": objects, "file_name": file_name, "data": data}
    return grouped


def _objects(value: Any, size, names: list[str] | None, path: Path, rec: str, outside: OutsidePolicy) -> list[ObjectAnnotation]:
    """`objects` as a struct of lists ({bbox: [...], category: [...]}) or a list of structs."""
    if isinstance(value, dict):
        boxes, categories, ids = value.get("bbox"), value.get("category"), value.get("id")
        if not isinstance(boxes, list) or not isinstance(categories, list) or len(categories) != len(boxes):
            raise DataError(path, rec, f"field 'objects' must hold lists 'bbox' and 'category' of one length, got {shown(value)}")
        ids = ids if isinstance(ids, list) and len(ids) == len(boxes) else [None] * len(boxes)
        entries = list(zip(boxes, categories, ids, strict=True))
    elif isinstance(value, list) and all(isinstance(o, dict) for o in value):
        entries = [(o.get("bbox"), o.get("category"), o.get("id")) for o in value]
    else:
        raise DataError(path, rec, f"field 'objects' must be {{bbox: [...], category: [...]}}, got {shown(value)}")
    given = [ann_id is not None for _, _, ann_id in entries]
    if any(given) and not all(given):  # numbering the others by position could collide with a given id
        raise DataError(path, rec, "field 'objects': some objects have an id and some do not; give every object one, or none")
    out = []
    for j, (bbox, category, ann_id) in enumerate(entries):
        where = f"{rec}, object {j}"
        box = xywh_box(bbox, size, path, where, outside)
        if names is not None and type(category) is int:
            if not 0 <= category < len(names):
                raise DataError(path, where, f"category {category} is not among the file's {len(names)} class names")
            category = names[category]
        category = text_field(category, path, where, "category")
        ann_id = optional_id(ann_id, path, where, "id")
        # without `objects.id`, an object's position in its row names it (unique within the image, as
        # per-box outputs keyed image:object need; COCO's loader numbers id-less rows likewise)
        out.append(ObjectAnnotation(box=box, category=category, ann_id=j if ann_id is None else ann_id))
    return out


WRITTEN_BY = {b"written_by": b"refloop export-parquet"}  # the file's schema metadata


def is_exported_parquet(path: Path) -> bool:
    """Whether `path` is a parquet file `export_parquet` wrote (its schema metadata says so): what
    `refloop export-parquet --overwrite` may replace."""
    pa = _pyarrow()
    try:
        metadata = pa.parquet.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError):
        return False
    return metadata.get(b"written_by") == WRITTEN_BY[b"written_by"]


def export_parquet(jsonl_path: str | Path, parquet_path: str | Path) -> int:
    """A refloop JSONL output (samples, pairs, RC data, metrics) as one parquet file that
    `datasets.load_dataset("parquet", ...)` reads; returns the number of rows. Columns are every
    field of any row, in the order they first appear (SC-Tune's metrics.jsonl: the locator rows'
    fields come after the describer rows'), null where a row lacks one; types are inferred over
    all rows (a field null in some rows is a nullable column)."""
    from refloop.data.loaders import iter_jsonl

    pa = _pyarrow()
    rows = [row for _, row in iter_jsonl(Path(jsonl_path))]
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise DataError(jsonl_path, None, "expected one JSON object per line (and at least one line)")
    # from_pylist would take its columns from the first row alone and drop the others' fields
    columns = {}
    for key in dict.fromkeys(key for row in rows for key in row):
        try:
            columns[key] = pa.array([row.get(key) for row in rows])
        except (pa.ArrowException, OverflowError) as exc:
            problem = f"field {key!r} holds values of mixed types that parquet cannot hold in one column: {exc}"
            raise DataError(jsonl_path, None, problem) from None
    table = pa.Table.from_pydict(columns)
    out = Path(parquet_path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with replaced_whole(out) as tmp:  # the old file stays whole until the new one is
            pa.parquet.write_table(table.replace_schema_metadata(WRITTEN_BY), tmp)
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, pa.ArrowException):  # e.g. a struct with no fields ({}), which parquet cannot store
            raise DataError(jsonl_path, None, f"parquet cannot hold these rows: {exc}") from None
        raise RefloopError(f"cannot write {out}: {exc.strerror or exc}") from None
    return table.num_rows
