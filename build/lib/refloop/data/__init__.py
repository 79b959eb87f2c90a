"""Typed records, loaders of real dataset formats, and resumable JSONL."""

from refloop.data.jsonl import JsonlWriter, read_records
from refloop.data.loaders import LoadReport, OnError, load_coco, load_referring
from refloop.data.paths import resolve_image_path
from refloop.data.records import ImageRecord, ObjectAnnotation

__all__ = [
    "ImageRecord",
    "JsonlWriter",
    "LoadReport",
    "ObjectAnnotation",
    "OnError",
    "load_coco",
    "load_referring",
    "read_records",
    "resolve_image_path",
]
