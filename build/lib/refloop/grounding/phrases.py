"""What to ground: noun phrases of a caption, or a category list.

SVP grounds the objects its prior caption mentions. With a closed vocabulary (the shapes world,
or a dataset's categories) extraction is exact; for free text a small determiner-led chunker
stands in for a tagger (no POS model can be downloaded here), and a category list is the robust
choice for detection datasets (COCO, Objects365, OpenImages).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from refloop.data.vocabulary import Vocabulary, shapes_vocabulary  # noqa: F401  (this module's API too)

_IRREGULAR = {
    "people": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "mice": "mouse",
    "feet": "foot",
    "teeth": "tooth",
    "geese": "goose",
    "oxen": "ox",
    "sheep": "sheep",
    "deer": "deer",
    "fish": "fish",
    "skis": "ski",
    "knives": "knife",
    "leaves": "leaf",
    "shelves": "shelf",
    "wolves": "wolf",
    "glasses": "glasses",
    "scissors": "scissors",
    "pants": "pants",
    "jeans": "jeans",
    "shorts": "shorts",
    "buses": "bus",
    "cookies": "cookie",
    "movies": "movie",
    "brownies": "brownie",
}
# Nouns ending in -ing, which the free-text chunker would otherwise take for verbs.
_ING_NOUNS = frozenset(
    "building painting ceiling clothing ring king wing string swing thing railing awning frosting icing bedding pudding "
    "wedding evening morning crossing".split()
)


def singular(word: str) -> str:
    """English plural -> singular for nouns of captions (rules plus a short irregular list)."""
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if w.endswith(("sses", "xes", "ches", "shes")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


_WORD = re.compile(r"[a-z]+(?:[-'][a-z]+)*")
# Closed-class words and common verbs: a noun phrase ends before one of these.
_STOP = frozenset(
    """
    a an the this that these those some any each every all both several many few most more no one two three four five six
    seven eight nine ten eleven twelve dozen numerous multiple various another other its his her their our your my
    and or but nor so yet with without of in on at by for from to into onto over under above below behind beside besides
    between among near next beneath inside outside around across along through against toward towards up down off out
    left right top bottom front back middle center centre side corner part edge
    is are was were be been being has have had having do does did can could will would shall should may might must
    there here it they them he she we you i which who whom whose what where when while as than then also very just only
    stands stand standing sits sit sitting lies lie lying holds hold holding shows show showing appears appear appearing
    seems seem looks look looking contains contain containing features feature featuring includes include including
    placed located positioned seen visible shown depicted parked filled covered surrounded made
    image picture photo scene view background foreground
    """.split()
)
_DETERMINERS = frozenset(
    "a an the this that these those some several many few two three four five six seven eight nine ten numerous multiple "
    "various another other its his her their our your my one each every both".split()
)


def phrases_from_caption(caption: str, vocabulary: Vocabulary | None = None, max_words: int = 3) -> list[str]:
    """Noun phrases a caption mentions, singular, in order of first mention, without repeats.

    With a `vocabulary` (e.g. `shapes_vocabulary()`): every vocabulary noun with the modifiers
    written right before it ("two red circles and a blue square" -> ["red circle", "blue square"]).
    Without: the words after a determiner or number up to the next closed-class word or verb,
    at most `max_words`, head noun singularised ("a man holding two red umbrellas" -> ["man",
    "red umbrella"]). A heuristic: for datasets with categories prefer `category_phrases`.
    """
    words = _WORD.findall(caption.lower())
    found: list[str] = []
    if vocabulary is not None:
        for i, word in enumerate(words):
            if word in vocabulary.nouns:
                start = i
                while start > 0 and words[start - 1] in vocabulary.modifiers:
                    start -= 1
                found.append(" ".join(words[start:i] + [vocabulary.nouns[word]]))
        return list(dict.fromkeys(found))
    i = 0
    while i < len(words):
        if words[i] in _DETERMINERS:
            j = i + 1
            while j < len(words) and words[j] in _DETERMINERS:
                j += 1
            k = j
            while k < len(words) and words[k] not in _STOP and not _verb_ing(words[k]):
                k += 1
            chunk = words[j:k][-max_words:]
            if chunk:
                found.append(" ".join(chunk[:-1] + [singular(chunk[-1])]))
            i = max(k, i + 1)
        else:
            i += 1
    return list(dict.fromkeys(found))


def _verb_ing(word: str) -> bool:
    base = singular(word)
    return word.endswith("ing") and base not in _ING_NOUNS


def category_phrases(categories: Sequence[str], caption: str | None = None, synonyms: dict[str, Iterable[str]] | None = None) -> list[str]:
    """A detection dataset's category names as phrases: all of them, or with a `caption` those
    the caption mentions (singular or plural, or one of the category's `synonyms`), in category
    order. Multi-word names ("traffic light") match as whole phrases."""
    names = list(dict.fromkeys(" ".join(c.split()) for c in categories if c and c.strip()))
    if caption is None:
        return names
    text = " " + " ".join(singular(w) for w in _WORD.findall(caption.lower())) + " "
    synonyms = synonyms or {}
    mentioned = []
    for name in names:
        forms = [name, *synonyms.get(name, ())]
        if any(f" {' '.join(singular(w) for w in _WORD.findall(form.lower()))} " in text for form in forms):
            mentioned.append(name)
    return mentioned
