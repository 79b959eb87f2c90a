"""Typed records every loader produces and every method consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
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
