"""Typed records every loader produces and every method consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from refloop.boxes import Box
from refloop.errors import DataError


@dataclass(frozen=True)
class ObjectAnnotation:
    box: Box
    category: str
    ann_id: str | int | None = None
    expressions: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageRecord:
    """One image and its annotated objects. `source` names the file the record came from."""

    image_id: str | int
    path: Path
    width: int
    height: int
    objects: tuple[ObjectAnnotation, ...] = ()
    source: str = ""
    file_name: str = ""  # as written in the annotation file, relative to the image root
    image: Image.Image | None = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    def load_image(self) -> Image.Image:
        """The RGB image; a missing or unreadable file is a DataError naming the record."""
        if self.image is not None:
            return self.image
        try:
            with Image.open(self.path) as img:
                return img.convert("RGB")
        except FileNotFoundError:
            raise DataError(self.source or self.path, self.image_id, f"image file not found: {self.path}") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise DataError(self.source or self.path, self.image_id, f"cannot read image {self.path}: {exc}") from None


@dataclass(frozen=True)
class BoxItem:
    """One box on one image, the unit of the describe-then-locate cycle (no text needed).

    `image` holds pixels already in memory (generated scenes, tests); otherwise the image is read
    from `image_path` through a small shared cache, since training draws the same images often.
    """

    image_path: str
    box: Box
    image: Image.Image | None = field(default=None, compare=False, repr=False)
    category: str = ""
    expression: str | None = None
    item_id: str = ""

    def load_image(self) -> Image.Image:
        return self.image if self.image is not None else _cached_rgb(self.image_path)


@lru_cache(maxsize=8192)
def _cached_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


@dataclass(frozen=True)
class InstructionExample:
    """One supervised example: an image, the full prompt the model reads, the answer it should write
    (Pink's referential-comprehension data, SVP's selected captions, SC-Tune's L_sup pairs)."""

    image_path: str
    prompt: str
    answer: str
    image: Image.Image | None = field(default=None, compare=False, repr=False)
    example_id: str = ""

    def load_image(self) -> Image.Image:
        return self.image if self.image is not None else _cached_rgb(self.image_path)
