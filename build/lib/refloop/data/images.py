"""Image files, read only when a command needs pixels.

`check_image` opens a file once and reads only its header (PIL's open is lazy): present, a known
format, of the size the annotation claims, not too large. The pixels are decoded later, once, by
`read_rgb` when a model needs them; a truncated or corrupt body is then a DataError naming the file
and record. Any failure of the image decoder on a file (PIL parses untrusted bytes) is a DataError.

Orientation: images are read as displayed, with their EXIF orientation applied (what
`PIL.ImageOps.exif_transpose` does). Annotation sizes and boxes refer to that displayed image: a
photo stored 4000x3000 with orientation 6 (rotated 90 degrees) is a 3000x4000 image for refloop,
in `check_image`, `image_size` and `read_rgb` alike. The orientation is read from the header only
(EXIF and XMP found before the pixel data), so checking a size never decodes pixels.

High bit depth: 16-bit grayscale (modes I;16, I;16L, I;16B, I;16N, and I, which holds 16-bit
samples in practice) is scaled to 8 bits (v * 255 / 65535, rounded; mode I clipped to 0..65535
first) instead of being clipped at 255 (which read a 16-bit PNG as all white). 16-bit colour PNGs
PIL already reduces to 8 bits.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

from refloop.errors import DataError

MAX_IMAGE_PIXELS: int | None = Image.MAX_IMAGE_PIXELS
"""Largest image (width x height, from its header) refloop reads; a larger one is a DataError
(skipped and counted under `on_error="skip"`) before any pixel is decoded. Default: PIL's
`Image.MAX_IMAGE_PIXELS` (89,478,485 pixels, about 9459 x 9459); None: no limit. Set it before
loading, e.g. `refloop.data.images.MAX_IMAGE_PIXELS = 200_000_000`. PIL's own decompression-bomb
check (an error at twice PIL's limit) still applies and is reported the same way: to read images
beyond it, raise `PIL.Image.MAX_IMAGE_PIXELS` too."""

_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees
_TRANSPOSE = {  # EXIF orientation -> the transposition that displays the image (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@contextmanager
def _opened(path: str | Path, source: object, record: object, data: bytes | None = None) -> Iterator[Image.Image]:
    """The image opened lazily (header read), its size within MAX_IMAGE_PIXELS; every failure a
    DataError naming the record. `data`: the encoded file held in memory (parquet datasets), then
    `path` only names it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as img:
                _check_pixels(path, img.size, source, record)
                yield img
    except DataError:
        raise
    except FileNotFoundError:
        folder = Path(path).parent
        root = "the image root (--images, or a recipe's images)"
        hint = "" if folder.is_dir() else f" (its folder {folder} does not exist either: is {root} right?)"
        raise DataError(source, record, f"image file not found: {path}{hint}") from None
    except Image.DecompressionBombError as exc:
        raise DataError(source, record, f"image {path} is too large: {exc}") from None
    except Exception as exc:  # the decoder's failures on a bad file: OSError, SyntaxError, ValueError, struct.error, ...
        raise DataError(source, record, f"cannot read image {path}: {exc}") from None


def _check_pixels(path: str | Path, size: tuple[int, int], source: object, record: object) -> None:
    limit = MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise DataError(
            source,
            record,
            f"image {path} is too large: {size[0]}x{size[1]} = {size[0] * size[1]} pixels, "
            f"more than refloop.data.images.MAX_IMAGE_PIXELS ({limit})",
        )


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1-8) from the header alone: the base `getexif` never decodes pixels (PNG's
    own would). An unreadable EXIF block counts as no orientation, as image viewers do."""
    try:
        value = Image.Image.getexif(img).get(ExifTags.Base.Orientation, 1)
    except Exception:
        return 1
    return value if type(value) is int and 1 <= value <= 8 else 1


def _displayed_size(img: Image.Image) -> tuple[int, int]:
    width, height = img.size
    return (height, width) if _orientation(img) in _SWAPS_SIDES else (width, height)


def image_size(path: str | Path, source: object, record: object, data: bytes | None = None) -> tuple[int, int]:
    """(width, height) of the image as displayed (EXIF orientation applied), read from the header;
    a missing, unreadable or too large file is a DataError naming the record. `data`: the encoded
    file in memory, with the same checks."""
    with _opened(path, source, record, data) as img:
        return _displayed_size(img)


def check_image(path: str | Path, size: tuple[int, int], source: object, record: object) -> None:
    """One open, header only: the file exists, is an image, and is `size` (width, height) as displayed."""
    _same_size(path, image_size(path, source, record), size, source, record)


def _same_size(path: str | Path, actual: tuple[int, int], size: tuple[int, int], source: object, record: object) -> None:
    if actual != tuple(size):
        raise DataError(source, record, f"image {path} is {actual[0]}x{actual[1]} but the annotation says {size[0]}x{size[1]}")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB pixels of a decoded image; 16-bit grayscale scaled to 8 bits rather than clipped."""
    if img.mode in _HIGH_DEPTH:
        samples = np.asarray(img)
        if img.mode == "I":
            samples = np.clip(samples, 0, 65535)
        scaled = (samples.astype(np.uint32) * 255 + 32767) // 65535
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def read_rgb(path: str | Path, source: object, record: object, data: bytes | None = None) -> Image.Image:
    """The decoded RGB pixels as displayed (EXIF orientation applied, 16-bit scaled to 8); a
    missing, truncated, corrupt or too large file is a DataError naming the record. `data`: the
    encoded file in memory, decoded the same way."""
    with _opened(path, source, record, data) as img:
        orientation = _orientation(img)
        rgb = to_rgb(img)
    method = _TRANSPOSE.get(orientation)
    return rgb if method is None else rgb.transpose(method)


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
