"""Image files, read only when a command needs pixels.

`check_image` opens a file once and reads only its header (PIL's open is lazy): present, a known
format, of the size the annotation claims. The pixels are decoded later, once, by `read_rgb` when
a model needs them; a truncated or corrupt body is then a DataError naming the file and record.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from refloop.errors import DataError

_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError)


def image_size(path: str | Path, source: object, record: object) -> tuple[int, int]:
    """(width, height) read from the image header; missing or unreadable files name the record."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise DataError(source, record, f"image file not found: {path}") from None
    except _UNREADABLE as exc:
        raise DataError(source, record, f"cannot read image {path}: {exc}") from None


def check_image(path: str | Path, size: tuple[int, int], source: object, record: object) -> None:
    """One open, header only: the file exists, is an image, and is `size` (width, height)."""
    _same_size(path, image_size(path, source, record), size, source, record)


def _same_size(path: str | Path, actual: tuple[int, int], size: tuple[int, int], source: object, record: object) -> None:
    if actual != tuple(size):
        raise DataError(source, record, f"image {path} is {actual[0]}x{actual[1]} but the annotation says {size[0]}x{size[1]}")


def read_rgb(path: str | Path, source: object, record: object) -> Image.Image:
    """The decoded RGB pixels; a missing, truncated or corrupt file is a DataError naming the record."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(source, record, f"image file not found: {path}") from None
    except _UNREADABLE as exc:
        raise DataError(source, record, f"cannot read image {path}: {exc}") from None


class ImageHeaders:
    """Header sizes read during one load, so a file named by many records is opened once."""

    def __init__(self) -> None:
        self._sizes: dict[str, tuple[int, int]] = {}

    def size(self, path: str | Path, source: object, record: object) -> tuple[int, int]:
        key = str(path)
        size = self._sizes.get(key)
        if size is None:
            size = self._sizes[key] = image_size(path, source, record)
        return size

    def check(self, path: str | Path, size: tuple[int, int], source: object, record: object) -> None:
        _same_size(path, self.size(path, source, record), size, source, record)
