"""How objects are named in text: refloop's synonym tables (the shapes world, COCO's 80 categories).

A caption's objects are read with a synonym table: every surface phrase of every object, with its
plural, matched on whole words, longest phrase first (so "hot dog" is not a dog and "teddy bear"
not a bear). The original CHAIR release reads words its own way: `refloop.evaluation.chair_words`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from refloop.errors import RefloopError
from refloop.world import COLOURS, SHAPES

_IRREGULAR_PLURALS = {
    "person": "people",
    "child": "children",
    "mouse": "mice",
    "knife": "knives",
    "calf": "calves",
    "goose": "geese",
    "ox": "oxen",
    "sheep": "sheep",
    "cattle": "cattle",
    "scissors": "scissors",
    "skis": "skis",
    "broccoli": "broccoli",
}


def plural(phrase: str) -> str:
    """English plural of a phrase's last word: the few irregular nouns of our tables, -man -> -men,
    -s/-x/-z/-ch/-sh -> -es, consonant + y -> -ies, otherwise -s."""
    head, _, word = phrase.rpartition(" ")
    if word in _IRREGULAR_PLURALS:
        word = _IRREGULAR_PLURALS[word]
    elif word.endswith("man") and word not in ("human", "shaman"):
        word = word[:-3] + "men"
    elif word.endswith(("s", "x", "z", "ch", "sh")):
        word += "es"
    elif len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        word = word[:-1] + "ies"
    else:
        word += "s"
    return f"{head} {word}" if head else word


_POSSESSIVE = re.compile(r"'s\b")
_NON_WORD = re.compile(r"[^a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-case words: possessive 's dropped, hyphens and punctuation as spaces ("hot-dog" = "hot dog")."""
    return _NON_WORD.sub(" ", _POSSESSIVE.sub("", text.lower())).split()


@dataclass(frozen=True)
class SynonymTable:
    """How one dataset's objects are named in text.

    `phrases` maps a surface phrase (lower-case words joined by single spaces) to its object's
    canonical name, or to None for a phrase that must not be read as an object although it
    contains one ("table tennis", "bus stop"). `question` is the POPE question, with `{object}`
    and `{a}` (the article) to fill.
    """

    name: str
    objects: tuple[str, ...]
    phrases: Mapping[str, str | None]
    question: str
    longest: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "longest", max((len(p.split()) for p in self.phrases), default=1))

    @classmethod
    def build(
        cls,
        name: str,
        synonyms: Mapping[str, Sequence[str]],
        question: str,
        exact: Mapping[str, Sequence[str]] | None = None,
        blocked: Sequence[str] = (),
    ) -> SynonymTable:
        """`synonyms`: canonical name -> singular surface forms (the name itself is always one;
        plurals are added). `exact`: forms taken as written, without a plural; an object listed
        there is not read by its bare name ("orange" is mostly a colour, the fruit "oranges").
        `blocked`: phrases that name no object."""
        phrases: dict[str, str | None] = {}

        def add(phrase: str, obj: str | None) -> None:
            key = " ".join(words(phrase))
            if phrases.get(key, obj) != obj:
                raise ValueError(f"table {name}: {key!r} names both {phrases[key]!r} and {obj!r}")
            phrases[key] = obj

        for obj, forms in synonyms.items():
            for form in (obj, *forms) if obj not in (exact or {}) else forms:
                add(form, obj)
                add(plural(" ".join(words(form))), obj)
        for obj, forms in (exact or {}).items():
            for form in forms:
                add(form, obj)
        for phrase in blocked:  # wins over a generated plural ("glasses" is rarely wine glasses)
            phrases[" ".join(words(phrase))] = None
        return cls(name=name, objects=tuple(synonyms), phrases=phrases, question=question)

    def matches(self, text: str) -> list[tuple[str, str]]:
        """(surface phrase, canonical object) for each mention, in reading order: at each word the
        longest known phrase wins and its words are consumed."""
        tokens = words(text)
        found, i = [], 0
        while i < len(tokens):
            for n in range(min(self.longest, len(tokens) - i), 0, -1):
                phrase = " ".join(tokens[i : i + n])
                if phrase in self.phrases:
                    obj = self.phrases[phrase]
                    if obj is not None:
                        found.append((phrase, obj))
                    i += n
                    break
            else:
                i += 1
        return found

    def canonical(self, category: str) -> str | None:
        """The table's name for an annotation category (by name, else by its one mention); None
        when the category is not in the table."""
        key = " ".join(words(category))
        if key in self.objects:
            return key
        found = {obj for _, obj in self.matches(category)}
        return found.pop() if len(found) == 1 else None

    def question_for(self, obj: str) -> str:
        return self.question.format(object=obj, a="an" if obj[:1] in "aeiou" else "a")


def shapes_table() -> SynonymTable:
    """The shapes world: an object is a colour and a shape ("red circle"), as the grammar writes
    it; a bare shape or colour names no object. The question is the grammar's existence question,
    the wording refloop-tiny was trained on."""
    shape_words = {"circle": ("circle", "disc", "disk"), "square": ("square",), "triangle": ("triangle",)}
    synonyms = {f"{c} {s}": [f"{c} {w}" for w in shape_words[s]] for s in SHAPES for c in COLOURS}
    return SynonymTable.build("shapes", synonyms, question="is there {a} {object} ?")


# COCO's 80 detection categories (their names are the canonical names) and our surface forms.
_COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": (
        "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "teenager", "adult", "guy", "lady",
        "gentleman", "human", "player", "tennis player", "skier", "surfer", "skateboarder", "snowboarder",
        "rider", "cyclist", "biker", "pedestrian", "spectator", "batter", "catcher", "umpire", "chef", "cook",
        "policeman", "officer", "soldier", "worker", "student", "mother", "father", "son", "daughter",
    ),
    "bicycle": ("bike", "bmx bike", "mountain bike"),
    "car": ("automobile", "sedan", "taxi", "cab", "suv", "jeep", "van", "minivan"),
    "motorcycle": ("motorbike", "motor bike", "scooter", "moped", "dirt bike"),
    "airplane": ("plane", "aeroplane", "airliner", "jet", "jetliner", "aircraft"),
    "bus": ("double decker", "double decker bus"),
    "train": ("locomotive", "tram", "train car"),
    "truck": ("lorry", "pickup", "pickup truck", "truck bed"),
    "boat": ("ship", "canoe", "kayak", "sailboat", "yacht", "ferry", "raft", "rowboat", "speedboat"),
    "traffic light": ("traffic signal", "stoplight", "stop light"),
    "fire hydrant": ("hydrant",),
    "stop sign": (),
    "parking meter": (),
    "bench": ("park bench",),
    "bird": ("pigeon", "seagull", "gull", "duck", "goose", "swan", "parrot", "owl", "eagle", "hawk", "crow", "sparrow"),
    "cat": ("kitten", "kitty"),
    "dog": ("puppy", "pup", "doggy"),
    "horse": ("pony", "foal", "stallion", "mare"),
    "sheep": ("lamb",),
    "cow": ("cattle", "calf", "bull", "ox"),
    "elephant": (),
    "bear": ("grizzly", "polar bear"),
    "zebra": (),
    "giraffe": (),
    "backpack": ("back pack", "rucksack", "knapsack"),
    "umbrella": ("parasol",),
    "handbag": ("hand bag", "purse"),
    "tie": ("necktie", "bow tie"),
    "suitcase": ("suit case", "luggage", "baggage"),
    "frisbee": ("flying disc",),
    "skis": ("ski",),
    "snowboard": (),
    "sports ball": ("ball", "soccer ball", "tennis ball", "football", "basketball", "volleyball"),
    "kite": (),
    "baseball bat": ("bat",),
    "baseball glove": ("baseball mitt", "mitt", "glove"),
    "skateboard": ("skate board",),
    "surfboard": ("surf board",),
    "tennis racket": ("racket", "racquet", "tennis racquet"),
    "bottle": (),
    "wine glass": ("wineglass", "glass"),
    "cup": ("mug", "coffee cup", "teacup"),
    "fork": (),
    "knife": (),
    "spoon": (),
    "bowl": (),
    "banana": (),
    "apple": (),
    "sandwich": ("burger", "hamburger"),
    "orange": ("tangerine", "mandarin", "clementine", "orange slice"),
    "broccoli": (),
    "carrot": (),
    "hot dog": ("hotdog",),
    "pizza": (),
    "donut": ("doughnut",),
    "cake": ("cupcake",),
    "chair": ("stool", "armchair", "recliner", "high chair", "highchair"),
    "couch": ("sofa", "loveseat", "love seat"),
    "potted plant": ("plant", "houseplant", "house plant", "flowerpot", "flower pot"),
    "bed": (),
    "dining table": ("table", "dinner table", "kitchen table", "coffee table", "picnic table", "desk"),
    "toilet": ("toilet seat", "toilet bowl", "commode"),
    "tv": ("television", "tv set", "monitor", "flat screen", "flatscreen"),
    "laptop": ("laptop computer", "notebook computer"),
    "mouse": ("computer mouse",),
    "remote": ("remote control", "controller", "game controller"),
    "keyboard": (),
    "cell phone": ("phone", "cellphone", "mobile phone", "smartphone", "smart phone", "telephone"),
    "microwave": ("microwave oven",),
    "oven": ("stove",),
    "toaster": ("toaster oven",),
    "sink": (),
    "refrigerator": ("fridge", "freezer"),
    "book": (),
    "clock": ("alarm clock", "clock tower"),
    "vase": (),
    "scissors": ("scissor",),
    "teddy bear": ("teddy", "teddybear", "stuffed animal", "stuffed bear"),
    "hair drier": ("hair dryer", "hairdryer", "blow dryer", "blow drier"),
    "toothbrush": ("tooth brush",),
}  # fmt: skip
# "orange" alone is mostly a colour ("an orange cat"): the fruit is read only in the plural and
# the forms above; "holding an orange" goes unread, a missed mention rather than a false one.
_COCO_EXACT = {"orange": ("oranges",)}
# Phrases holding an object's name without showing the object.
_COCO_BLOCKED = (
    "glasses", "eyeglasses", "eye glasses", "sunglasses", "sun glasses", "table tennis", "bus stop", "bus station",
    "train station", "train track", "train tracks", "toilet paper", "chair lift", "flower bed", "river bed",
    "baseball game", "baseball field", "baseball cap", "baseball uniform",
    "baby animal", "baby animals", "adult animal", "adult animals", "baby cub", "baby cubs",
)  # fmt: skip
# "baby" and "adult" name a person, but not before an animal: "a baby elephant" is an elephant.
_COCO_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")


def dataset_table(categories: Iterable[str]) -> SynonymTable:
    """A dataset's own categories (Objects365, OpenImages, your labels), each named by its category
    name and its plural, no synonyms; POPE's question. Beyond CHAIR and POPE, which read COCO's 80:
    no published number is read this way, so scores are comparable only among runs on this table."""
    names = sorted({" ".join(words(c)) for c in categories} - {""})
    if not names:
        raise RefloopError("the data names no category to read captions and questions with")
    # a name whose plural is another category ("glass" beside "glasses") is read as written, no plural
    exact = {name: (name,) for name in names if plural(name) in names}
    try:
        return SynonymTable.build("dataset", {name: () for name in names}, question="Is there {a} {object} in the image?", exact=exact)
    except ValueError as exc:  # two names whose forms collide otherwise
        raise RefloopError(f"the data's categories cannot be read apart in text: {exc}") from None


def coco_table() -> SynonymTable:
    """COCO's 80 categories, each named by its category name or a synonym of ours, POPE's question."""
    synonyms = {
        obj: (*forms, *(f"{age} {form}" for form in (obj, *forms) if obj in _COCO_ANIMALS for age in ("baby", "adult")))
        for obj, forms in _COCO_SYNONYMS.items()
    }
    return SynonymTable.build("coco", synonyms, question="Is there {a} {object} in the image?", exact=_COCO_EXACT, blocked=_COCO_BLOCKED)
