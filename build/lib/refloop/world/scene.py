"""Procedural scenes of coloured shapes, deterministic by (domain, seed, index)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from refloop.boxes import Box

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
IMAGE_SIZE = 112
# Objects' centres fall in distinct cells of this grid, so "the object at cell k" is well defined.
GRID = 7


@dataclass(frozen=True, slots=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    box: Box
    rgb: tuple[int, int, int]

    @property
    def attributes(self) -> dict[str, str]:
        return {"size": self.size, "colour": self.colour, "shape": self.shape}


@dataclass(frozen=True)
class DomainStyle:
    """How a domain looks; all domains share the vocabulary."""

    name: str
    description: str
    objects: tuple[int, int]  # inclusive range of objects per scene
    small_side: tuple[int, int]
    large_side: tuple[int, int]
    background: str  # "plain" | "clutter" | "texture"
    shade_jitter: int  # max per-channel offset of an object's colour
    outline: bool
    duplicate_prob: float  # chance that a new object copies an existing object's shape
    held_out: tuple[tuple[str, str], ...] = field(default=())  # (colour, shape) never drawn


@dataclass(frozen=True)
class Scene:
    domain: str
    index: int
    seed: int
    objects: tuple[ShapeObject, ...]
    width: int = IMAGE_SIZE
    height: int = IMAGE_SIZE

    @property
    def image_id(self) -> str:
        return f"{self.domain}-{self.seed}-{self.index:06d}"


def scene_rng(domain: str, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(domain.encode()), seed, index])


BASE_RGB = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (40, 78, 215),
    "yellow": (235, 200, 25),
}


def _centre_cell(box: Box, width: int, height: int) -> tuple[int, int]:
    cx, cy = box.center
    return (min(int(cx * GRID / width), GRID - 1), min(int(cy * GRID / height), GRID - 1))


def sample_scene(style: DomainStyle, seed: int, index: int, max_objects: int | None = None) -> Scene:
    """Place objects without overlap, each centre in its own grid cell.

    Duplicates of shape (and often colour) are drawn on purpose so that expressions must
    disambiguate, as in RefCOCO and in SC-Tune's training-data filter.
    """
    rng = scene_rng(style.name, seed, index)
    lo, hi = style.objects
    if max_objects is not None:
        hi = max(lo, min(hi, max_objects))
        lo = min(lo, hi)
    count = int(rng.integers(lo, hi + 1))
    objects: list[ShapeObject] = []
    cells: set[tuple[int, int]] = set()
    allowed = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in style.held_out]
    attempts = 0
    while len(objects) < count and attempts < 400:
        attempts += 1
        if objects and rng.random() < style.duplicate_prob:
            src = objects[int(rng.integers(len(objects)))]
            shape = src.shape
            colour = src.colour if rng.random() < 0.5 else COLOURS[int(rng.integers(len(COLOURS)))]
        else:
            colour, shape = allowed[int(rng.integers(len(allowed)))]
        if (colour, shape) in style.held_out:
            continue
        size = SIZES[int(rng.integers(2))]
        side_lo, side_hi = style.small_side if size == "small" else style.large_side
        side = int(rng.integers(side_lo, side_hi + 1))
        x1 = int(rng.integers(1, IMAGE_SIZE - side - 1))
        y1 = int(rng.integers(1, IMAGE_SIZE - side - 1))
        box = Box(x1, y1, x1 + side, y1 + side)
        cell = _centre_cell(box, IMAGE_SIZE, IMAGE_SIZE)
        grown = Box(box.x1 - 3, box.y1 - 3, box.x2 + 3, box.y2 + 3)
        if cell in cells or any(grown.iou(o.box) > 0 for o in objects):
            continue
        base = BASE_RGB[colour]
        jitter = rng.integers(-style.shade_jitter, style.shade_jitter + 1, size=3) if style.shade_jitter else (0, 0, 0)
        rgb = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(base, jitter, strict=True))
        objects.append(ShapeObject(shape, colour, size, box, rgb))  # type: ignore[arg-type]
        cells.add(cell)
    return Scene(domain=style.name, index=index, seed=seed, objects=tuple(objects))
