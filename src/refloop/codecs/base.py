"""What every coordinate codec does: box -> model text, model text -> boxes (never raising)."""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod

from refloop.boxes import Box

ImageSize = tuple[int, int]  # (width, height) of the original image


class Codec(ABC):
    """Converts boxes in original-image pixels to a model family's coordinate text and back."""

    name: str
    # Largest round-trip error of one coordinate as a fraction of the image side.
    step: float

    @abstractmethod
    def encode(self, box: Box, image_size: ImageSize) -> str: ...

    @abstractmethod
    def parse(self, text: str, image_size: ImageSize) -> list[Box]:
        """Every box found in `text`, in original-image pixels; [] when nothing parses."""

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


def finite_box(values: list[float], image_size: ImageSize) -> Box | None:
    """A box from parsed numbers, clipped to the image, or None when they make no sense."""
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        return None
    w, h = image_size
    box = Box(*values).clip(w, h)
    return box


class IntegerPairsCodec(Codec):
    """'(x1,y1),(x2,y2)' integers on a 0..scale grid, wrapped in family-specific markers."""

    pattern = re.compile(r"\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*,?\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)")

    def __init__(self, name: str, prefix: str, suffix: str, scale: int = 1000) -> None:
        self.name, self.prefix, self.suffix, self.scale = name, prefix, suffix, scale
        self.step = 0.5 / scale

    def encode(self, box: Box, image_size: ImageSize) -> str:
        x1, y1, x2, y2 = quantize_box(box, image_size, self.scale)
        return f"{self.prefix}({x1},{y1}),({x2},{y2}){self.suffix}"

    def parse(self, text: str, image_size: ImageSize) -> list[Box]:
        w, h = image_size
        out = []
        for m in self.pattern.finditer(text or ""):
            x1, y1, x2, y2 = (int(g) for g in m.groups())
            box = finite_box([x1 / self.scale * w, y1 / self.scale * h, x2 / self.scale * w, y2 / self.scale * h], image_size)
            if box is not None:
                out.append(box)
        return out
