"""Typed records every loader produces and every method consumes."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from refloop.boxes import Box
from refloop.data.images import read_rgb


@dataclass(frozen=True)
class ObjectAnnotation:
    """One annotated object. `attributes` are what the annotation file says of it beyond its
    category (COCO `attributes`; a shapes-world export: colour and size), so what a method or
    metric needs to know of an object travels with it."""

    box: Box
    category: str
    ann_id: str | int | None = None
    expressions: tuple[str, ...] = ()
    attributes: dict[str, str | int | float | bool] = field(default_factory=dict, hash=False)


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
    data: bytes | None = field(default=None, compare=False, repr=False)  # the encoded image file in memory (parquet datasets)
    # categories of the image's crowd annotations (COCO `iscrowd`): no box of `objects`, but present in the image,
    # as the CHAIR release's ground truth counts them
    crowd_categories: tuple[str, ...] = ()

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    def load_image(self) -> Image.Image:
        """The RGB image (decoded from `data` when the file is held in memory: decoded on each
        call, so a dataset's images stay compressed); a missing or unreadable file is a DataError
        naming the record."""
        if self.image is not None:
            return self.image
        return read_rgb(self.path, self.source or self.path, self.image_id, self.data)


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


class _RGBCache:
    """Decoded images by path, least recently used dropped first once they hold `max_bytes`
    (training draws the same images again and again; a count bound would not bound memory)."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._images: OrderedDict[str, Image.Image] = OrderedDict()

    def __call__(self, path: str) -> Image.Image:
        image = self._images.get(path)
        if image is not None:
            self._images.move_to_end(path)
            return image
        image = read_rgb(path, path, None)  # a missing or corrupt file is a DataError naming it
        self._images[path] = image
        self.bytes += image.width * image.height * 3
        while self.bytes > self.max_bytes and len(self._images) > 1:
            _, old = self._images.popitem(last=False)
            self.bytes -= old.width * old.height * 3
        return image


_cached_rgb = _RGBCache()


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
