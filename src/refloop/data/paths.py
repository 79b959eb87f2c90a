"""Image paths from annotation files, resolved under an image root and never outside it."""

from __future__ import annotations

from pathlib import Path

from refloop.errors import DataError


def resolve_image_path(root: Path, file_name: str, source: object, record: object) -> Path:
    if not isinstance(file_name, str) or not file_name:
        raise DataError(source, record, f"image path must be a non-empty string, got {file_name!r}")
    root = root.resolve()
    candidate = Path(file_name)
    if candidate.is_absolute():
        raise DataError(source, record, f"image path {file_name!r} is absolute; paths must be relative to the image root")
    resolved = (root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise DataError(source, record, f"image path {file_name!r} escapes the image root {root}")
    return resolved
