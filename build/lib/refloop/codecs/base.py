"""What every coordinate codec does: box -> model text, model text -> boxes (never raising)."""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator

from refloop.boxes import Box

ImageSize = tuple[int, int]  # (width, height) of the original image
Corners = tuple[float, float, float, float]  # x1, y1, x2, y2 as the model wrote them, in original-image pixels


class Codec(ABC):
    """Converts boxes in original-image pixels to a model family's coordinate text and back."""

    name: str
    # Largest round-trip error of one coordinate as a fraction of the image side.
    step: float

    @abstractmethod
    def encode(self, box: Box, image_size: ImageSize) -> str: ...

    @abstractmethod
    def corners(self, text: str, image_size: ImageSize) -> Iterator[Corners]:
        """Each box written in `text`, unchecked: corners may be inverted, non-finite or outside
        the image. Must not raise on any text (read numbers with `number`)."""

    def parse(self, text: str | None, image_size: ImageSize) -> list[Box]:
        """Every box found in `text`, in original-image pixels; [] when nothing parses.

        The rule for model-written boxes (`Box.from_model_output`) is applied here, once for
        every codec: clipped to the image; non-finite, inverted or empty boxes dropped (unparseable).
        """
        if not isinstance(text, str):
            return []
        boxes = (Box.from_model_output(*c, image_size) for c in self.corners(text, image_size))
        return [box for box in boxes if box is not None]

    def parse_first(self, text: str, image_size: ImageSize) -> Box | None:
        boxes = self.parse(text, image_size)
        return boxes[0] if boxes else None


def quantize(value: float, size: float, bins: int, top: int | None = None) -> int:
    """Map a pixel coordinate to an integer in [0, top] where `bins` units span the side."""
    top = bins if top is None else top
    return int(min(max(round(value / size * bins), 0), top))


def quantize_box(box: Box, image_size: ImageSize, scale: int) -> tuple[int, int, int, int]:
    """x1, y1, x2, y2 as integers on a 0..scale grid of each side."""
    w, h = image_size
    return quantize(box.x1, w, scale), quantize(box.y1, h, scale), quantize(box.x2, w, scale), quantize(box.y2, h, scale)


def number(text: str) -> float:
    """A number the model wrote, read as a float: too many digits give infinity, which the box
    rule refuses (int() would raise past 4300 digits, and a huge int overflows float division)."""
    try:
        return float(text)
    except (ValueError, OverflowError):
        return math.nan


class IntegerPairsCodec(Codec):
    """'(x1,y1),(x2,y2)' integers on a 0..scale grid, wrapped in family-specific markers."""

    pattern = re.compile(r"\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*,?\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)")

    def __init__(self, name: str, prefix: str, suffix: str, scale: int = 1000) -> None:
        self.name, self.prefix, self.suffix, self.scale = name, prefix, suffix, scale
        self.step = 0.5 / scale

    def encode(self, box: Box, image_size: ImageSize) -> str:
        x1, y1, x2, y2 = quantize_box(box, image_size, self.scale)
        return f"{self.prefix}({x1},{y1}),({x2},{y2}){self.suffix}"

    def corners(self, text: str, image_size: ImageSize) -> Iterator[Corners]:
        w, h = image_size
        for m in self.pattern.finditer(text):
            x1, y1, x2, y2 = (number(g) for g in m.groups())
            yield x1 / self.scale * w, y1 / self.scale * h, x2 / self.scale * w, y2 / self.scale * h
