"""Image augmentation for training: shapes-world images made hard to read (busy backgrounds,
shifted shades, colour jitter, low contrast, blur, noise, occluders), as real photos often are."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from refloop.world.render import colour_field, draw_shape


def busy_background(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """A busy background of this module's own (not a domain style's): stripes, colour blocks,
    a noisy gradient or strokes, in random colours."""
    kind = int(rng.integers(4))
    if kind == 0:  # stripes at a random angle
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 20)
        phase = (np.cos(angle) * xx + np.sin(angle) * yy) / period
        a, b = rng.integers(40, 220, size=3), rng.integers(40, 220, size=3)
        t = (np.sin(2 * np.pi * phase) > 0)[..., None]
        arr = np.where(t, a, b).astype(np.int16)
    elif kind == 1:  # colour blocks
        n = int(rng.integers(3, 9))
        arr = np.asarray(Image.fromarray(rng.integers(40, 220, size=(n, n, 3)).astype(np.uint8)).resize((w, h), Image.NEAREST))
        arr = arr.astype(np.int16)
    elif kind == 2:  # two-colour gradient plus pixel noise
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        a, b = rng.integers(40, 220, size=3), rng.integers(40, 220, size=3)
        ramp = a[None] * (1 - t[:, None]) + b[None] * t[:, None]
        arr = np.broadcast_to(ramp[None] if ramp.shape[0] == w else ramp[:, None], (h, w, 3)).astype(np.int16)
        arr = arr + rng.integers(-25, 26, size=(h, w, 3), dtype=np.int16)
    else:  # strokes and rings in random colours over a random flat colour
        img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(60, 230, size=3)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(8, 25))):
            x, y = (int(v) for v in rng.integers(0, [w, h]))
            dx, dy = (int(v) for v in rng.integers(-25, 26, size=2))
            colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
            if rng.random() < 0.7:
                draw.line([(x, y), (x + dx, y + dy)], fill=colour, width=int(rng.integers(1, 4)))
            else:
                draw.ellipse([min(x, x + dx), min(y, y + dy), max(x, x + dx), max(y, y + dy)], outline=colour, width=2)
        return img
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def degrade_image(scene, image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """`image` of `scene` made hard to read, so the caption needs the grounding: each with its own
    probability, the objects redrawn with shifted shades (and sometimes an edge) over a random busy
    background of this module's own, then colour jitter, low contrast, blur, pixel noise and
    occluding patches. At least one step always applies."""
    while True:
        steps = rng.random(6) < np.array([0.5, 0.4, 0.4, 0.35, 0.5, 0.3])
        if steps.any():
            break
    redraw, jitter, contrast, blur, noise, occlude = steps
    if redraw:
        img = busy_background(image.width, image.height, rng)
        draw = ImageDraw.Draw(img)
        edge_on = rng.random() < 0.4
        shade = int(rng.integers(10, 61))
        for obj in scene.objects:
            rgb = tuple(int(np.clip(v + d, 0, 255)) for v, d in zip(obj.rgb, rng.integers(-shade, shade + 1, size=3), strict=True))
            edge = tuple(int(v) for v in rng.integers(0, 256, size=3)) if edge_on else None
            draw_shape(draw, obj, rgb, edge, int(rng.integers(1, 3)) if edge_on else 0)
        image = img
    if jitter:  # per-channel gain and offset
        arr = np.asarray(image).astype(np.float32)
        arr = arr * rng.uniform(0.7, 1.3, size=3) + rng.uniform(-40, 40, size=3)
        image = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if contrast:
        image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.25, 0.6)))
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.8, 2.0))))
    if noise:
        arr = np.asarray(image).astype(np.float32) + rng.normal(0, rng.uniform(10, 40), size=(image.height, image.width, 3))
        image = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if occlude:
        image = image.copy()
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            side = int(rng.integers(8, 24))
            x, y = (int(v) for v in rng.integers(0, [image.width - side, image.height - side]))
            draw.rectangle([x, y, x + side, y + side], fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    return image


def colour_cast(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """`image` with colours that mislead: a strong colour cast (the hue turned by 60-300 degrees,
    as under coloured light or a wrong white balance) or, one time in four, no colour at all
    (a monochrome photo). Shapes, positions and brightness stay readable; the colour words of a
    caption then have to come from somewhere other than the pixels (a grounding's labels)."""
    if rng.random() < 0.25:
        return image.convert("L").convert("RGB")
    hsv = np.asarray(image.convert("HSV")).copy()
    turn = int(round(rng.uniform(60, 300) / 360 * 256))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + turn) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def outline_texture(scene, rng: np.random.Generator) -> Image.Image:
    """`scene` redrawn as many photos look: over a smooth random colour field with pixel noise, its
    objects in their own colours with a dark edge. (This is close to how the `wild` domain is drawn,
    on other scenes; a recipe that uses it makes `wild` a less unseen style.)"""
    img = colour_field(scene.width, scene.height, rng, cells=int(rng.integers(3, 8)), levels=(60, 200), noise=20)
    draw = ImageDraw.Draw(img)
    grey = int(rng.integers(0, 70))
    for obj in scene.objects:
        draw_shape(draw, obj, obj.rgb, (grey, grey, grey), int(rng.integers(1, 3)))
    return img
