"""The shapes world's domains: one in-domain style (RefCOCO's role) and two out-of-domain styles.

The OOD styles play the parts of Objects365 (crowded, small objects, clutter) and OpenImages
(textured backgrounds, shifted shades, outlines, colour/shape pairs never seen in-domain).
"""

from __future__ import annotations

from refloop.world.scene import DomainStyle

IN_DOMAIN = "in-domain"

_STYLES = (
    DomainStyle(
        name=IN_DOMAIN,
        description="plain light background, 3-5 objects, as the tiny model was trained on",
        objects=(3, 5),
        small_side=(14, 18),
        large_side=(24, 30),
        background="plain",
        shade_jitter=0,
        outline=False,
        duplicate_prob=0.6,
        held_out=(("yellow", "triangle"), ("green", "circle")),
    ),
    DomainStyle(
        name="crowded",
        description="Objects365-like: 6-9 smaller objects among clutter strokes",
        objects=(6, 9),
        small_side=(11, 14),
        large_side=(18, 23),
        background="clutter",
        shade_jitter=25,
        outline=False,
        duplicate_prob=0.6,
    ),
    DomainStyle(
        name="wild",
        description="OpenImages-like: textured backgrounds, outlined objects, shifted shades, unseen pairs",
        objects=(3, 6),
        small_side=(12, 18),
        large_side=(22, 34),
        background="texture",
        shade_jitter=45,
        outline=True,
        duplicate_prob=0.6,
    ),
)

STYLES: dict[str, DomainStyle] = {s.name: s for s in _STYLES}
DOMAINS: tuple[str, ...] = tuple(STYLES)


def get_style(name: str) -> DomainStyle:
    try:
        return STYLES[name]
    except KeyError:
        raise KeyError(f"unknown shapes-world domain {name!r}; known: {', '.join(DOMAINS)}") from None
