"""Referring expressions, captions and existence questions for shapes-world scenes.

An expression names attributes first and adds one spatial word only when attributes cannot
single out the target, mirroring how RefCOCO annotators disambiguate.
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations

import numpy as np

from refloop.world.scene import COLOURS, SHAPES, Scene, ShapeObject

ATTRIBUTE_ORDER = ("size", "colour", "shape")
SPATIAL_WORDS = ("left", "right", "top", "bottom")
NUMBER_WORDS = ("zero", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# A target is "the left X" only when it is clearly left of every other X.
SPATIAL_MARGIN = 6.0


def _matches(obj: ShapeObject, attrs: dict[str, str]) -> bool:
    return all(obj.attributes[k] == v for k, v in attrs.items())


def _spatial_word(target: ShapeObject, group: list[ShapeObject]) -> str | None:
    others = [o for o in group if o is not target]
    if not others:
        return None
    tx, ty = target.box.center
    for word in SPATIAL_WORDS:
        if word == "left" and all(o.box.center[0] - tx >= SPATIAL_MARGIN for o in others):
            return word
        if word == "right" and all(tx - o.box.center[0] >= SPATIAL_MARGIN for o in others):
            return word
        if word == "top" and all(o.box.center[1] - ty >= SPATIAL_MARGIN for o in others):
            return word
        if word == "bottom" and all(ty - o.box.center[1] >= SPATIAL_MARGIN for o in others):
            return word
    return None


def _phrase(attrs: dict[str, str], spatial: str | None) -> str:
    words = ["the"]
    if spatial:
        words.append(spatial)
    words += [attrs[k] for k in ATTRIBUTE_ORDER if k in attrs]
    if "shape" not in attrs:
        words.append("object")
    return " ".join(words)


def referring_expressions(scene: Scene, target: ShapeObject) -> list[str]:
    """All unique expressions for `target`, canonical first.

    Canonical = all three attributes, plus a spatial word when another object shares them.
    The rest are shorter unique variants (attribute subsets with or without a spatial word).
    Returns [] when no expression singles the target out.
    """
    found: list[str] = []
    subsets = [
        dict((k, target.attributes[k]) for k in keys) for n in (3, 1, 2) for keys in combinations(ATTRIBUTE_ORDER, n) if "shape" in keys
    ]
    for attrs in subsets:
        group = [o for o in scene.objects if _matches(o, attrs)]
        if len(group) == 1:
            found.append(_phrase(attrs, None))
        else:
            word = _spatial_word(target, group)
            if word:
                found.append(_phrase(attrs, word))
    return list(dict.fromkeys(found))


def canonical_expression(scene: Scene, target: ShapeObject) -> str | None:
    found = referring_expressions(scene, target)
    return found[0] if found else None


def _plural(shape: str) -> str:
    return shape + "s"


def caption(scene: Scene) -> str:
    """Counts by colour and shape in a fixed order: 'two red circles , a blue square and ...'."""
    counts = Counter((o.colour, o.shape) for o in scene.objects)
    parts = []
    for shape in SHAPES:
        for colour in COLOURS:
            n = counts.get((colour, shape), 0)
            if n:
                noun = shape if n == 1 else _plural(shape)
                parts.append(f"{NUMBER_WORDS[n]} {colour} {noun}")
    if not parts:
        return "nothing"
    if len(parts) == 1:
        return parts[0]
    return " , ".join(parts[:-1]) + " and " + parts[-1]


def existence_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """A yes/no question about a colour/shape pair, balanced between present and absent pairs."""
    present = sorted({(o.colour, o.shape) for o in scene.objects})
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    if absent and (not present or rng.random() < 0.5):
        colour, shape = absent[int(rng.integers(len(absent)))]
        answer = "no"
    else:
        colour, shape = present[int(rng.integers(len(present)))]
        answer = "yes"
    return f"is there a {colour} {shape} ?", answer


def vocabulary() -> list[str]:
    """Every word the grammar can produce."""
    words = {"the", "object", "and", ",", "?", "is", "there", "a", "yes", "no", "nothing"}
    words |= set(COLOURS) | set(SHAPES) | {_plural(s) for s in SHAPES}
    words |= {"small", "large"} | set(SPATIAL_WORDS) | set(NUMBER_WORDS)
    return sorted(words)
