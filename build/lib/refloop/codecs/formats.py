"""The coordinate text of each supported model family, as their model cards document it."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator

from refloop.boxes import Box
from refloop.codecs.base import Codec, Corners, ImageSize, IntegerPairsCodec, number, quantize_box

_NUMBER = r"-?\d+(?:\.\d+)?"
_BBOX_2D = re.compile(
    r"\"bbox_2d\"\s*:\s*\[\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*\]"
)


def qwen_vl() -> Codec:
    """Qwen-VL: <box>(x1,y1),(x2,y2)</box> on 0..1000."""
    return IntegerPairsCodec("qwen-vl", "<box>", "</box>")


def qwen2_vl() -> Codec:
    """Qwen2-VL: <|box_start|>(x1,y1),(x2,y2)<|box_end|> on 0..1000."""
    return IntegerPairsCodec("qwen2-vl", "<|box_start|>", "<|box_end|>")


class InternVLCodec(IntegerPairsCodec):
    """InternVL: '<box>[[x1, y1, x2, y2]]</box>' on 0..1000 (the markers are optional when parsing)."""

    pattern = re.compile(r"\[\[\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*\]")

    def __init__(self) -> None:
        super().__init__("internvl", "<box>", "</box>")

    def encode(self, box: Box, image_size: ImageSize) -> str:
        x1, y1, x2, y2 = quantize_box(box, image_size, self.scale)
        return f"{self.prefix}[[{x1}, {y1}, {x2}, {y2}]]{self.suffix}"


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """The input size Qwen2/2.5-VL's processor resizes an image to (multiples of `factor`, pixel budget)."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class JsonBBoxCodec(Codec):
    """JSON objects with "bbox_2d": [x1, y1, x2, y2].

    Qwen3-VL uses 0..1000 relative coordinates; Qwen2.5-VL uses absolute pixels of the image
    *after* its processor's resize, so boxes are rescaled between that size and the original.
    """

    def __init__(
        self,
        name: str,
        relative_scale: int | None,
        factor: int = 28,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        label: str = "object",
    ) -> None:
        self.name, self.relative_scale, self.label = name, relative_scale, label
        self.factor, self.min_pixels, self.max_pixels = factor, min_pixels, max_pixels
        self.step = 0.5 / relative_scale if relative_scale else 0.5 / 28 / 4  # pixels of a >=112 px input

    def _frame(self, image_size: ImageSize) -> tuple[float, float]:
        """Width and height of the coordinate frame the model speaks in."""
        if self.relative_scale:
            return float(self.relative_scale), float(self.relative_scale)
        w, h = image_size
        rh, rw = smart_resize(h, w, self.factor, self.min_pixels, self.max_pixels)
        return float(rw), float(rh)

    def coordinates(self, box: Box, image_size: ImageSize) -> list[int]:
        """The four integers the model writes for `box`."""
        w, h = image_size
        fw, fh = self._frame(image_size)
        return [round(box.x1 / w * fw), round(box.y1 / h * fh), round(box.x2 / w * fw), round(box.y2 / h * fh)]

    def encode(self, box: Box, image_size: ImageSize, label: str | None = None) -> str:
        return json.dumps([{"bbox_2d": self.coordinates(box, image_size), "label": label or self.label}])

    def corners(self, text: str, image_size: ImageSize) -> Iterator[Corners]:
        w, h = image_size
        fw, fh = self._frame(image_size)
        for m in _BBOX_2D.finditer(text):
            x1, y1, x2, y2 = (number(g) for g in m.groups())
            yield x1 / fw * w, y1 / fh * h, x2 / fw * w, y2 / fh * h


class LocTokenCodec(Codec):
    """One token per coordinate: Florence-2 '<loc_N>' (x first, 1000 bins) and PaliGemma
    '<locNNNN>' (y first, 1024 bins)."""

    def __init__(self, name: str, template: str, pattern: str, bins: int, y_first: bool) -> None:
        self.name, self.template, self.bins, self.y_first = name, template, bins, y_first
        self.pattern = re.compile(pattern)
        self.step = 1.0 / bins

    def _to_bin(self, v: float, size: float) -> int:
        return int(min(max(math.floor(v / size * self.bins), 0), self.bins - 1))

    def encode(self, box: Box, image_size: ImageSize) -> str:
        w, h = image_size
        x1, y1, x2, y2 = self._to_bin(box.x1, w), self._to_bin(box.y1, h), self._to_bin(box.x2, w), self._to_bin(box.y2, h)
        order = (y1, x1, y2, x2) if self.y_first else (x1, y1, x2, y2)
        return "".join(self.template.format(v) for v in order)

    def corners(self, text: str, image_size: ImageSize) -> Iterator[Corners]:
        w, h = image_size
        values = [number(v) for v in self.pattern.findall(text)]
        for i in range(0, len(values) - 3, 4):
            a, b, c, d = values[i : i + 4]
            y1, x1, y2, x2 = (a, b, c, d) if self.y_first else (b, a, d, c)
            # Bin centres: the inverse of floor-quantisation within half a bin.
            yield (x1 + 0.5) / self.bins * w, (y1 + 0.5) / self.bins * h, (x2 + 0.5) / self.bins * w, (y2 + 0.5) / self.bins * h


def florence2() -> Codec:
    return LocTokenCodec("florence-2", "<loc_{}>", r"<loc_(\d+)>", bins=1000, y_first=False)


def paligemma() -> Codec:
    return LocTokenCodec("paligemma", "<loc{:04d}>", r"<loc(\d{4})>", bins=1024, y_first=True)


class Kosmos2Codec(Codec):
    """Kosmos-2: the box as the 32x32 patches holding its top-left and bottom-right corners,
    '<object><patch_index_UL><patch_index_LR></object>'."""

    name = "kosmos-2"
    side = 32
    pattern = re.compile(r"<patch_index_(\d{4})>\s*<patch_index_(\d{4})>")

    def __init__(self) -> None:
        self.step = 1.0 / self.side

    def encode(self, box: Box, image_size: ImageSize) -> str:
        w, h = image_size
        n = self.side
        ul_x = min(max(math.floor(box.x1 / w * n), 0), n - 1)
        ul_y = min(max(math.floor(box.y1 / h * n), 0), n - 1)
        lr_x = min(max(math.ceil(box.x2 / w * n) - 1, 0), n - 1)
        lr_y = min(max(math.ceil(box.y2 / h * n) - 1, 0), n - 1)
        return f"<object><patch_index_{ul_y * n + ul_x:04d}><patch_index_{lr_y * n + lr_x:04d}></object>"

    def corners(self, text: str, image_size: ImageSize) -> Iterator[Corners]:
        w, h = image_size
        n = self.side
        for m in self.pattern.finditer(text):
            ul, lr = int(m.group(1)), int(m.group(2))  # four digits each
            if ul >= n * n or lr >= n * n:
                continue
            # Corners at the outer edges of the two patches, as Kosmos-2's post-processing does (a
            # lower-right patch above or left of the upper-left one gives an inverted box).
            left, top, right, bottom = ul % n, ul // n, lr % n, lr // n
            yield left / n * w, top / n * h, (right + 1) / n * w, (bottom + 1) / n * h


class MiniGPTv2Codec(Codec):
    """MiniGPT-v2: '{<x1><y1><x2><y2>}' integers on 0..100. Whitespace between tokens is accepted
    (word-level tokenizers such as refloop-tiny's decode with spaces)."""

    name = "minigpt-v2"
    scale = 100
    pattern = re.compile(r"\{\s*<(\d+)>\s*<(\d+)>\s*<(\d+)>\s*<(\d+)>\s*\}")
    step = 0.5 / 100

    def encode(self, box: Box, image_size: ImageSize) -> str:
        return "{" + "".join(f"<{v}>" for v in quantize_box(box, image_size, self.scale)) + "}"

    def corners(self, text: str, image_size: ImageSize) -> Iterator[Corners]:
        w, h = image_size
        for m in self.pattern.finditer(text):
            x1, y1, x2, y2 = (number(g) for g in m.groups())
            yield x1 / self.scale * w, y1 / self.scale * h, x2 / self.scale * w, y2 / self.scale * h


class NormalisedXYXY(Codec):
    """'[x1, y1, x2, y2]' as fractions of the image width and height, `decimals` places, values
    joined by `separator`; `normalised_only`: a list with a value outside 0-1 is no box of this
    codec (it is some other number list)."""

    name = "normalised-xyxy"
    pattern = re.compile(r"\[\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*\]")

    def __init__(self, decimals: int = 2, separator: str = ", ", normalised_only: bool = False) -> None:
        self.decimals, self.separator, self.normalised_only = decimals, separator, normalised_only
        self.step = 0.5 * 10.0**-decimals

    def encode(self, box: Box, image_size: ImageSize) -> str:
        w, h = image_size
        values = [min(max(v, 0.0), 1.0) for v in (box.x1 / w, box.y1 / h, box.x2 / w, box.y2 / h)]
        return "[" + self.separator.join(f"{v:.{self.decimals}f}" for v in values) + "]"

    def corners(self, text: str, image_size: ImageSize) -> Iterator[Corners]:
        w, h = image_size
        for m in self.pattern.finditer(text):
            x1, y1, x2, y2 = (number(g) for g in m.groups())
            if self.normalised_only and not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
                continue
            yield x1 * w, y1 * h, x2 * w, y2 * h


class PinkCodec(NormalisedXYXY):
    """Pink: '[0.xxx,0.xxx,0.xxx,0.xxx]' normalised xyxy with three decimals; a list with a value
    outside 0-1 is not a Pink box."""

    name = "pink"

    def __init__(self) -> None:
        super().__init__(decimals=3, separator=",", normalised_only=True)
