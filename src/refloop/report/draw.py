"""Pictures people look at: images with the target and the re-located box, caption underneath."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from refloop.boxes import Box
from refloop.errors import DataError

TARGET_COLOUR = (0, 200, 80)
PREDICTED_COLOUR = (230, 30, 200)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _outline(draw: ImageDraw.ImageDraw, box: Box, scale: float, side: int, colour: tuple[int, int, int], width: int) -> None:
    """Draw `box` scaled to the panel. Boxes read from older outputs may be inverted, huge or
    not finite: corners are ordered and kept just outside the panel, a non-finite box is skipped."""
    try:
        values = [float(v) for v in box.as_list()]
    except (TypeError, ValueError, OverflowError):
        return
    if not all(math.isfinite(v) for v in values):
        return
    x1, y1, x2, y2 = (min(max(v * scale, -width), side + width) for v in values)
    draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=colour, width=width)


def panel(image: Image.Image, target: Box, predicted: Box | None, lines: list[str], side: int = 256) -> Image.Image:
    """The image scaled to `side`, target box (green) and located box (magenta), text below."""
    w, h = image.size
    scale = side / max(w, h)
    shown = image.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST)
    font = _font(13)
    wrapped = [seg for line in lines for seg in (textwrap.wrap(line, width=38) or [""])]
    text_h = 16 * len(wrapped) + 8
    canvas = Image.new("RGB", (side, side + text_h), (255, 255, 255))
    canvas.paste(shown, (0, 0))
    draw = ImageDraw.Draw(canvas)
    _outline(draw, target, scale, side, TARGET_COLOUR, width=3)
    if predicted is not None:
        _outline(draw, predicted, scale, side, PREDICTED_COLOUR, width=2)
    for i, line in enumerate(wrapped):
        draw.text((4, side + 4 + 16 * i), line, fill=(20, 20, 20), font=font)
    return canvas


def grid(panels: list[Image.Image], columns: int = 4, title: str | None = None) -> Image.Image:
    if not panels:
        return Image.new("RGB", (10, 10), (255, 255, 255))
    pw = max(p.width for p in panels)
    ph = max(p.height for p in panels)
    rows = (len(panels) + columns - 1) // columns
    top = 26 if title else 0
    out = Image.new("RGB", (columns * (pw + 6), rows * (ph + 6) + top), (255, 255, 255))
    if title:
        ImageDraw.Draw(out).text((6, 5), title, fill=(0, 0, 0), font=_font(16))
    for i, p in enumerate(panels):
        out.paste(p, ((i % columns) * (pw + 6), top + (i // columns) * (ph + 6)))
    return out


def save_png(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def row_image(row: dict, images: Mapping[str, Callable[[], Image.Image]] | None = None) -> Image.Image | None:
    """The image of a sample row (its "image" field): loaded by `images` where the pixels are not a
    file of that name (a parquet dataset's are held in memory), else read from the file; None when
    it cannot be read any more (moved or deleted since the run), so a report leaves it out."""
    load = (images or {}).get(row["image"])
    try:
        if load is not None:
            return load()
        with Image.open(row["image"]) as img:
            return img.convert("RGB")
    except (OSError, DataError):  # DataError: a record's loader naming the file it cannot read
        return None


def row_panels(
    rows: list[dict],
    count: int,
    lines: Callable[[dict], list[str]],
    images: Mapping[str, Callable[[], Image.Image]] | None = None,
) -> list[Image.Image]:
    """Panels of the first `count` rows whose image can be read: each row's "box" (green), its
    "predicted_box" if any (magenta), `lines(row)` below. `images` loads a row's image by its
    "image" field where the pixels are not a file of that name (a parquet dataset's images are held
    in memory); a file that is gone since the run is left out rather than ending the report."""
    panels = []
    for r in rows:
        if len(panels) == count:
            break
        image = row_image(r, images)
        if image is None:
            continue
        predicted = Box(*r["predicted_box"]) if r.get("predicted_box") else None
        panels.append(panel(image, Box(*r["box"]), predicted, lines(r)))
    return panels
