"""Axis-aligned boxes in pixel xyxy coordinates, IoU and NMS.

Every component of refloop speaks this one box type; codecs convert to and from model text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

OutsidePolicy = Literal["clip", "reject"]


class InvalidBoxError(ValueError):
    """A box that cannot describe a region of the image."""


@dataclass(frozen=True, slots=True)
class Box:
    """A box in absolute pixels, (x1, y1) top-left and (x2, y2) bottom-right, exclusive of nothing."""

    x1: float
    y1: float
    x2: float
    y2: float

    @classmethod
    def from_xywh(cls, x: float, y: float, w: float, h: float) -> Box:
        return cls(x, y, x + w, y + h)

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2)

    def as_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]

    def as_xywh(self) -> list[float]:
        return [self.x1, self.y1, self.width, self.height]

    def scale(self, sx: float, sy: float) -> Box:
        return Box(self.x1 * sx, self.y1 * sy, self.x2 * sx, self.y2 * sy)

    def clip(self, width: float, height: float) -> Box:
        return Box(
            min(max(self.x1, 0.0), width),
            min(max(self.y1, 0.0), height),
            min(max(self.x2, 0.0), width),
            min(max(self.y2, 0.0), height),
        )

    def iou(self, other: Box) -> float:
        return float(iou_matrix([self], [other])[0, 0])

    @classmethod
    def from_model_output(cls, x1: float, y1: float, x2: float, y2: float, image_size: tuple[int, int]) -> Box | None:
        """The one rule for a box a model wrote (every codec's `parse` applies it), in pixels of
        an image of `image_size` (width, height):

        - a coordinate that is not a finite number (NaN, infinity, too large for a float) makes
          the answer unparseable: None, which callers count as a parse failure with IoU 0;
        - inverted corners (x2 < x1 or y2 < y1) are unparseable too: the answer breaks the
          family's own box format. This is the IoU-0 outcome of the authors' evaluators, it gives a
          policy under RL no credit for malformed boxes, and it keeps refloop's committed numbers;
        - the box is clipped to the image;
        - a box with no area left (zero width or height) is unparseable: None.

        A well-formed box comes back exactly as `Box(x1, y1, x2, y2).clip(*image_size)`.
        """
        width, height = image_size
        try:
            x1, y1, x2, y2 = (float(v) for v in (x1, y1, x2, y2))
            finite = all(math.isfinite(v) for v in (x1, y1, x2, y2, float(width), float(height)))
        except (TypeError, ValueError, OverflowError):
            return None
        if not finite or width <= 0 or height <= 0:
            return None
        if x2 < x1 or y2 < y1:
            return None
        box = cls(x1, y1, x2, y2).clip(width, height)
        if box.x2 <= box.x1 or box.y2 <= box.y1:
            return None
        return box


def validate_box(box: Box, image_size: tuple[int, int] | None = None, outside: OutsidePolicy = "reject") -> Box:
    """Return a usable box or raise InvalidBoxError saying why.

    `outside` decides what happens to a box that leaves the image: "clip" it to the image, or
    "reject" it. A box that is empty after clipping is always rejected.
    """
    values = box.as_list()
    if not all(math.isfinite(v) for v in values):
        raise InvalidBoxError(f"box {values} has a non-finite coordinate")
    if box.x2 <= box.x1 or box.y2 <= box.y1:
        raise InvalidBoxError(f"box {values} has x2 <= x1 or y2 <= y1 (zero or negative area)")
    if image_size is not None:
        width, height = image_size
        inside = box.x1 >= 0 and box.y1 >= 0 and box.x2 <= width and box.y2 <= height
        if not inside:
            if outside == "reject":
                raise InvalidBoxError(f"box {values} lies outside the {width}x{height} image")
            box = box.clip(width, height)
            if box.x2 <= box.x1 or box.y2 <= box.y1:
                raise InvalidBoxError(f"box {values} has no area inside the {width}x{height} image")
    return box


def _as_array(boxes: Sequence[Box] | np.ndarray) -> np.ndarray:
    if isinstance(boxes, np.ndarray):
        return boxes.reshape(-1, 4).astype(np.float64)
    return np.array([b.as_list() for b in boxes], dtype=np.float64).reshape(-1, 4)


def iou_matrix(a: Sequence[Box] | np.ndarray, b: Sequence[Box] | np.ndarray) -> np.ndarray:
    """Pairwise IoU, shape (len(a), len(b)). Degenerate boxes have IoU 0 with everything."""
    aa, bb = _as_array(a), _as_array(b)
    ix1 = np.maximum(aa[:, None, 0], bb[None, :, 0])
    iy1 = np.maximum(aa[:, None, 1], bb[None, :, 1])
    ix2 = np.minimum(aa[:, None, 2], bb[None, :, 2])
    iy2 = np.minimum(aa[:, None, 3], bb[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = np.clip(aa[:, 2] - aa[:, 0], 0, None) * np.clip(aa[:, 3] - aa[:, 1], 0, None)
    area_b = np.clip(bb[:, 2] - bb[:, 0], 0, None) * np.clip(bb[:, 3] - bb[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(union > 0, inter / union, 0.0)
    return out


def paired_iou(a: Sequence[Box | None], b: Sequence[Box | None]) -> np.ndarray:
    """IoU of a[i] with b[i]; a missing box (None) gives 0."""
    if len(a) != len(b):
        raise ValueError(f"paired_iou needs equal lengths, got {len(a)} and {len(b)}")
    out = np.zeros(len(a))
    keep = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x is not None and y is not None]
    if keep:
        aa = _as_array([a[i] for i in keep])  # type: ignore[misc]
        bb = _as_array([b[i] for i in keep])  # type: ignore[misc]
        full = iou_matrix(aa, bb)
        out[keep] = full[np.arange(len(keep)), np.arange(len(keep))]
    return out


def nms(boxes: Sequence[Box], scores: Iterable[float], iou_threshold: float = 0.5) -> list[int]:
    """Greedy non-maximum suppression; returns kept indices by decreasing score."""
    score_arr = np.asarray(list(scores), dtype=np.float64)
    if len(boxes) != len(score_arr):
        raise ValueError("nms needs one score per box")
    order = list(np.argsort(-score_arr, kind="stable"))
    ious = iou_matrix(boxes, boxes)
    kept: list[int] = []
    while order:
        best = order.pop(0)
        kept.append(int(best))
        order = [i for i in order if ious[best, i] <= iou_threshold]
    return kept
