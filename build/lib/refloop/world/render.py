"""Draw a scene with PIL. Backgrounds carry the domain shift; shapes keep the vocabulary."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from refloop.world.domains import get_style
from refloop.world.scene import Scene, ShapeObject, scene_rng


def colour_field(
    w: int, h: int, rng: np.random.Generator, cells: int = 5, levels: tuple[int, int] = (70, 190), noise: int = 18
) -> Image.Image:
    """A smooth random colour field with pixel noise: `cells` x `cells` colours (channel values in
    [levels[0], levels[1])) blended over the image, plus noise of up to +-`noise` per pixel (the
    `wild` style's textured background with the defaults)."""
    coarse = rng.integers(*levels, size=(cells, cells, 3)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-noise, noise + 1, size=(h, w, 3), dtype=np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _background(scene: Scene, kind: str, rng: np.random.Generator) -> Image.Image:
    w, h = scene.width, scene.height
    if kind == "plain":
        base = np.full((h, w, 3), 236, dtype=np.int16)
        base += rng.integers(-4, 5, size=(h, w, 1), dtype=np.int16)
        return Image.fromarray(base.clip(0, 255).astype(np.uint8))
    if kind == "texture":
        return colour_field(w, h, rng)
    if kind == "clutter":
        base = np.full((h, w, 3), 222, dtype=np.int16) + rng.integers(-8, 9, size=(h, w, 1), dtype=np.int16)
        img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(10, 18))):
            x, y = rng.integers(0, w), rng.integers(0, h)
            dx, dy = rng.integers(-14, 15, size=2)
            grey = int(rng.integers(90, 170))
            draw.line([(int(x), int(y)), (int(x + dx), int(y + dy))], fill=(grey, grey, grey), width=1)
        return img
    raise ValueError(f"unknown background kind {kind!r}")


def draw_shape(draw: ImageDraw.ImageDraw, obj: ShapeObject, fill, edge, width: int) -> None:
    """`obj`'s shape inside its box: the one drawing of a shape (rendering and augmentation)."""
    b = obj.box
    xy = [b.x1, b.y1, b.x2 - 1, b.y2 - 1]
    if obj.shape == "circle":
        draw.ellipse(xy, fill=fill, outline=edge, width=width)
    elif obj.shape == "square":
        draw.rectangle(xy, fill=fill, outline=edge, width=width)
    elif obj.shape == "triangle":
        pts = [((b.x1 + b.x2 - 1) / 2, b.y1), (b.x2 - 1, b.y2 - 1), (b.x1, b.y2 - 1)]
        draw.polygon(pts, fill=fill, outline=edge, width=width)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, outline: bool) -> None:
    draw_shape(draw, obj, obj.rgb, (30, 30, 30) if outline else None, 2 if outline else 0)


def render(scene: Scene, background: str | None = None, outline: bool | None = None) -> Image.Image:
    """The scene's image in its domain's style; `background` ('plain', 'texture', 'clutter') and
    `outline` override the style's, to look at one factor of a style at a time."""
    style = get_style(scene.domain)
    rng = scene_rng(scene.domain + "/render", scene.seed, scene.index)
    img = _background(scene, style.background if background is None else background, rng)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_object(draw, obj, style.outline if outline is None else outline)
    return img
