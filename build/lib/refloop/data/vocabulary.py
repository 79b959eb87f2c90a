"""A dataset's closed vocabulary, carried with its records: the nouns a caption may name, the
attribute words kept in front of them, and the phrases a detector of the dataset knows. Methods
read it from the data (`Detections.vocabulary`) instead of knowing which world the data came from."""

from __future__ import annotations

from dataclasses import dataclass

from refloop.world.grammar import vocabulary as shapes_words
from refloop.world.scene import COLOURS, SHAPES


@dataclass(frozen=True)
class Vocabulary:
    """A closed vocabulary: `nouns` maps every written form of a noun to its singular,
    `modifiers` are the attribute words kept in front of it ("red" in "red circle") and
    `categories` the phrases a detector of this vocabulary is asked for (in a fixed order)."""

    nouns: dict[str, str]
    modifiers: frozenset[str]
    categories: tuple[str, ...] = ()


def shapes_vocabulary() -> Vocabulary:
    """The shapes world's nouns (shapes, singular and plural, as its grammar writes them) and
    colours: captions yield "colour shape" phrases, and its categories are every colour-shape pair."""
    words = set(shapes_words())
    nouns = {w: w for w in SHAPES if w in words}
    nouns |= {w: w[:-1] for w in words if w.endswith("s") and w[:-1] in SHAPES}
    categories = tuple(f"{colour} {shape}" for shape in SHAPES for colour in COLOURS)
    return Vocabulary(nouns=nouns, modifiers=frozenset(w for w in COLOURS if w in words), categories=categories)
