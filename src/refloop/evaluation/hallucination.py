"""Object hallucination and recall of captions (CHAIR, object recall) and POPE's yes/no probing,
the metrics SVP reports in Sec. 4 (Tables 1-3, Figs. 4 and 11).

A caption's objects are read with a synonym table: every surface phrase of every object, with its
plural, matched on whole words, longest phrase first (so "hot dog" is not a dog and "teddy bear"
not a bear). Per caption an object counts once, however often it is named; negation is not read
("no dog" mentions a dog), as in CHAIR.

- CHAIR_i = hallucinated objects / mentioned objects, summed over captions;
- CHAIR_s = captions mentioning at least one absent object / captions;
- object recall = ground-truth objects mentioned / ground-truth objects, summed over images.

POPE asks "is there a <object>?" about present objects (answer yes) and as many absent ones
(answer no) per image; absent objects are drawn uniformly (random), taken from the dataset's most
frequent objects (popular), or from those that co-occur most with the image's objects
(adversarial). An answer is read by `parse_yes_no`; one with neither word counts as "no" and is
reported as unparsed.

Every function returns per-sample rows beside its totals, and the commands write them as JSONL,
so each number can be recomputed from the files.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

from refloop.data.jsonl import JsonlWriter, read_records
from refloop.data.loaders import LoadReport, OnError, read_text
from refloop.data.pixels import pending_batches
from refloop.data.records import ImageRecord
from refloop.errors import DataError, RefloopError
from refloop.evaluation.captions import caption_metrics
from refloop.models.base import VLM, GenerateOptions
from refloop.runs import model_fingerprint, run_directory
from refloop.world import COLOURS, DOMAINS, EVAL_SEED, SHAPES, caption, get_style, sample_scene

# ---- synonym tables ---------------------------------------------------------------------------

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
    "baseball player", "baseball game", "baseball field", "baseball cap", "baseball uniform",
)  # fmt: skip


def coco_table() -> SynonymTable:
    """COCO's 80 categories, each named by its category name or a synonym of ours, POPE's question."""
    return SynonymTable.build(
        "coco", _COCO_SYNONYMS, question="Is there {a} {object} in the image?", exact=_COCO_EXACT, blocked=_COCO_BLOCKED
    )


# ---- CHAIR and object recall ----------------------------------------------------------------


def object_mentions(text: str, table: SynonymTable) -> set[str]:
    """The canonical objects a caption names."""
    return {obj for _, obj in table.matches(text)}


def caption_objects(text: str, gt_objects: AbstractSet[str], table: SynonymTable) -> dict:
    """One caption's row: what it names (with the phrases read), which of those are absent
    (hallucinated), which ground-truth objects it names (recalled) and which it misses."""
    found = table.matches(text)
    mentioned = {obj for _, obj in found}
    gt = set(gt_objects)
    return {
        "caption": text,
        "phrases": [phrase for phrase, _ in found],
        "mentioned": sorted(mentioned),
        "hallucinated": sorted(mentioned - gt),
        "recalled": sorted(mentioned & gt),
        "missed": sorted(gt - mentioned),
        "gt_objects": sorted(gt),
    }


def _rows(captions: Sequence[str], gt_objects: Sequence[AbstractSet[str]], table: SynonymTable) -> list[dict]:
    if len(captions) != len(gt_objects):
        raise ValueError(f"{len(captions)} captions for {len(gt_objects)} ground-truth object sets")
    return [caption_objects(c, g, table) for c, g in zip(captions, gt_objects)]


def chair_from_rows(rows: Sequence[dict]) -> dict:
    """CHAIR_i and CHAIR_s from `caption_objects` rows (0.0 when nothing is mentioned)."""
    mentions = sum(len(r["mentioned"]) for r in rows)
    hallucinated = sum(len(r["hallucinated"]) for r in rows)
    hallucinating = sum(bool(r["hallucinated"]) for r in rows)
    return {
        "chair_i": hallucinated / mentions if mentions else 0.0,
        "chair_s": hallucinating / len(rows) if rows else 0.0,
        "mentions": mentions,
        "hallucinated_mentions": hallucinated,
        "captions": len(rows),
        "hallucinating_captions": hallucinating,
    }


def recall_from_rows(rows: Sequence[dict]) -> dict:
    """Object recall from `caption_objects` rows, over all ground-truth objects (0.0 when there are none)."""
    gt = sum(len(r["gt_objects"]) for r in rows)
    recalled = sum(len(r["recalled"]) for r in rows)
    return {"object_recall": recalled / gt if gt else 0.0, "recalled_objects": recalled, "gt_objects": gt}


def chair(captions: Sequence[str], gt_objects: Sequence[AbstractSet[str]], table: SynonymTable) -> dict:
    """CHAIR_i, CHAIR_s and their counts, with per-caption rows under "samples"."""
    rows = _rows(captions, gt_objects, table)
    return chair_from_rows(rows) | {"samples": rows}


def object_recall(captions: Sequence[str], gt_objects: Sequence[AbstractSet[str]], table: SynonymTable) -> dict:
    """Ground-truth objects named / ground-truth objects, with per-caption rows under "samples"."""
    rows = _rows(captions, gt_objects, table)
    return recall_from_rows(rows) | {"samples": rows}


# ---- POPE ---------------------------------------------------------------------------------------

STRATEGIES = ("random", "popular", "adversarial")
_YES_NO = re.compile(r"[a-z]+")


def parse_yes_no(text: str | None) -> str | None:
    """The first word of an answer that is "yes" or "no" (case-insensitive, whole words: "Yes, a
    dog." -> yes, "There is no dog." -> no, "Not sure" -> None). None: the answer says neither."""
    for word in _YES_NO.findall((text or "").lower()):
        if word in ("yes", "no"):
            return word
    return None


def _image_rng(seed: int, image_id: object, strategy: str) -> np.random.Generator:
    """One generator per image, so an image's questions do not depend on the other images."""
    return np.random.default_rng([seed, zlib.crc32(f"{strategy}:{image_id}".encode())])


def build_pope_questions(
    records: Sequence[ImageRecord],
    gt_objects: Sequence[AbstractSet[str]],
    strategy: str = "random",
    per_image: int = 3,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    table: SynonymTable | None = None,
) -> list[dict]:
    """Yes/no questions, balanced per image: n present objects (label "yes") and n absent ones
    (label "no"), n = min(per_image, present, absent); an image without objects gets none.

    Absent objects come from `categories` (default: every object of `gt_objects`):
    random: uniformly; popular: the objects in most images of the dataset; adversarial: the
    objects in most images together with the image's objects (summed over them). Ties go to the
    more frequent object, then the name. Present objects are drawn uniformly. Same seed, same
    questions; `table` adds the question text.
    """
    if strategy not in STRATEGIES:
        raise RefloopError(f"unknown POPE strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if per_image < 1:
        raise RefloopError(f"POPE asks at least one question per image, not {per_image}")
    if len(records) != len(gt_objects):
        raise ValueError(f"{len(records)} records for {len(gt_objects)} ground-truth object sets")
    universe = sorted(set(categories) if categories is not None else set().union(*gt_objects))
    frequency = Counter(obj for gt in gt_objects for obj in gt)
    together: Counter = Counter()
    for gt in gt_objects:
        for a, b in combinations(sorted(gt), 2):
            together[a, b] += 1
            together[b, a] += 1
    questions = []
    for rec, gt in zip(records, gt_objects):
        present = sorted(gt)
        absent = [c for c in universe if c not in gt]
        n = min(per_image, len(present), len(absent))
        if n == 0:
            continue
        rng = _image_rng(seed, rec.image_id, strategy)
        yes = [present[i] for i in sorted(rng.choice(len(present), n, replace=False))]
        if strategy == "random":
            no = [absent[i] for i in sorted(rng.choice(len(absent), n, replace=False))]
        elif strategy == "popular":
            no = sorted(absent, key=lambda c: (-frequency[c], c))[:n]
        else:
            no = sorted(absent, key=lambda c: (-sum(together[p, c] for p in present), -frequency[c], c))[:n]
        for k, (obj, label) in enumerate([(o, "yes") for o in yes] + [(o, "no") for o in no]):
            row = {"id": f"{rec.image_id}:{k}", "image_id": rec.image_id, "image": str(rec.path), "object": obj, "label": label}
            if table is not None:
                row["question"] = table.question_for(obj)
            questions.append(row)
    return questions


def pope_metrics(predictions: Sequence[str | None], labels: Sequence[str]) -> dict:
    """Accuracy, precision, recall and F1 with "yes" as the positive class, and the share of yes
    answers. A prediction is an answer text (or None) read by `parse_yes_no`; an answer that says
    neither counts as "no" and is counted under `unparsed`. Per-question rows under "samples"."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    bad = sorted({label for label in labels if label not in ("yes", "no")})
    if bad:
        raise ValueError(f"labels must be 'yes' or 'no', got {bad}")
    rows = []
    for answer, label in zip(predictions, labels):
        parsed = parse_yes_no(answer)
        rows.append({"answer": answer, "parsed": parsed, "prediction": parsed or "no", "label": label})
    tp = sum(r["prediction"] == "yes" and r["label"] == "yes" for r in rows)
    fp = sum(r["prediction"] == "yes" and r["label"] == "no" for r in rows)
    tn = sum(r["prediction"] == "no" and r["label"] == "no" for r in rows)
    fn = sum(r["prediction"] == "no" and r["label"] == "yes" for r in rows)
    num = len(rows)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / num if num else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / num if num else 0.0,
        "unparsed": sum(r["parsed"] is None for r in rows),
        "num": num,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "samples": rows,
    }


# ---- data: images, their ground-truth objects and reference captions ----------------------------


@dataclass(frozen=True)
class ObjectData:
    """Images with their ground-truth objects (names of `table`) and reference captions, aligned."""

    records: list[ImageRecord]
    objects: list[frozenset[str]]
    references: list[list[str]]
    table: SynonymTable
    unmapped_categories: dict[str, int]  # annotation categories the table has no name for: boxes per category
    report: LoadReport


def load_object_data(
    data: str,
    images: str | Path | None = None,
    captions: str | Path | None = None,
    on_error: OnError = "fail",
    num_images: int = 500,
) -> ObjectData:
    """Images and ground truth for caption and POPE evaluation.

    A shapes-world domain: its evaluation split (`num_images` scenes, seed EVAL_SEED) is exported
    and read back through the COCO loader (every image, every box); each image's objects
    (colour + shape) and reference caption (the grammar's) come from its scene, regenerated from
    (domain, seed, image id), the very scene the export drew. A COCO-style .json or referring
    .jsonl: its first `num_images` images, objects = categories named in COCO's table, reference
    captions from `captions` (a COCO captions JSON) when given.
    """
    from refloop.data.sources import load_data, world_split_dir
    from refloop.world.export import COCO_FILE

    if data in DOMAINS:
        if captions is not None:
            raise RefloopError("--captions is for dataset files: a shapes-world domain's references are its grammar captions")
        split = world_split_dir(data, num_images)
        records, report = load_data(str(split / COCO_FILE), on_error=on_error)
        style = get_style(data)
        objects, references = [], []
        for rec in records:
            scene = sample_scene(style, EVAL_SEED, int(rec.image_id))
            if sorted(o.shape for o in scene.objects) != sorted(o.category for o in rec.objects):
                raise RefloopError(f"{split / COCO_FILE}: image {rec.image_id} does not hold the objects of its scene; delete {split}")
            objects.append(frozenset(f"{o.colour} {o.shape}" for o in scene.objects))
            references.append([caption(scene)])
        return ObjectData(records, objects, references, shapes_table(), {}, report)
    records, report = load_data(data, images, on_error=on_error)
    records = records[:num_images]
    table = coco_table()
    unmapped: Counter = Counter()
    objects = []
    for rec in records:
        names = set()
        for obj in rec.objects:
            name = table.canonical(obj.category)
            if name is None:
                unmapped[obj.category] += 1
            else:
                names.add(name)
        objects.append(frozenset(names))
    by_image = read_coco_captions(Path(captions)) if captions is not None else {}
    references = [by_image.get(rec.image_id, []) for rec in records]
    return ObjectData(records, objects, references, table, dict(unmapped), report)


def read_coco_captions(path: Path) -> dict[object, list[str]]:
    """image_id -> captions of a COCO captions file ({"annotations": [{"image_id", "caption"}, ...]})."""
    try:
        data = json.loads(read_text(path))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise DataError(path, None, f"not valid JSON: {exc}") from None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise DataError(path, None, "expected a COCO captions file: an object with an 'annotations' list")
    out: dict[object, list[str]] = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or isinstance(ann.get("image_id"), (bool, type(None))):
            raise DataError(path, f"annotation {i}", "expected an object with an image_id and a string caption")
        out.setdefault(ann["image_id"], []).append(ann["caption"])
    return out


# ---- evaluation runs ----------------------------------------------------------------------------


def _fingerprint(task: str, vlm: VLM, found: ObjectData, **options) -> dict:
    """The model, the data and a digest of the ground truth (objects, references: another captions
    file or table is another run)."""
    sources = sorted({str(r.source) for r in found.records})
    truth = json.dumps([[str(r.image_id), sorted(o), refs] for r, o, refs in zip(found.records, found.objects, found.references)])
    digest = hashlib.sha256(truth.encode()).hexdigest()[:16]
    return {"task": task, "model": model_fingerprint(vlm), "data": sources, "table": found.table.name, "ground_truth": digest} | options


class _LastImage:
    """Consecutive questions share an image: decode it once."""

    def __init__(self) -> None:
        self.key: object = None
        self.image: Image.Image | None = None

    def __call__(self, rec: ImageRecord) -> Image.Image:
        if self.key != rec.path or self.image is None:
            self.image, self.key = rec.load_image(), rec.path
        return self.image


def evaluate_captions(
    vlm: VLM,
    found: ObjectData,
    out: Path,
    batch_size: int = 64,
    max_new_tokens: int = 64,
    progress: Callable[[int], None] | None = None,
    java: bool | None = None,
    overwrite: bool = False,
    on_error: str = "fail",
) -> dict:
    """One greedy caption per image (`vlm.caption`): CHAIR_i, CHAIR_s and object recall from the
    ground truth, and BLEU/METEOR/ROUGE-L/CIDEr against the reference captions of the images that
    have them. Writes caption_samples.jsonl (resumable) and caption_metrics.json; an image that
    does not decode stops the run, or with on_error="skip" is skipped and counted."""
    fingerprint = _fingerprint("caption", vlm, found, num_images=len(found.records), max_new_tokens=max_new_tokens)
    with run_directory(out, fingerprint, overwrite):
        return _evaluate_captions(vlm, found, Path(out), batch_size, max_new_tokens, progress, java, on_error)


def _evaluate_captions(vlm, found: ObjectData, out: Path, batch_size, max_new_tokens, progress, java, on_error) -> dict:
    items = [(str(rec.image_id), rec, gt, refs) for rec, gt, refs in zip(found.records, found.objects, found.references)]
    options = GenerateOptions(max_new_tokens=max_new_tokens)
    skipped: list[DataError] = []
    with JsonlWriter(out / "caption_samples.jsonl", key="id") as writer:
        batches = pending_batches(
            items, writer.done, lambda it: it[0], lambda it: it[1].load_image(), batch_size, on_error, skipped, progress
        )
        for chunk, images in batches:
            texts = vlm.caption(images, options)
            writer.write_many(
                {"id": key, "image": str(rec.path), "references": refs} | caption_objects(text, gt, found.table)
                for (key, rec, gt, refs), text in zip(chunk, texts)
            )
    wanted = {it[0] for it in items}
    rows = [r for r in read_records(out / "caption_samples.jsonl") if r["id"] in wanted]
    metrics = chair_from_rows(rows) | recall_from_rows(rows) | {"num": len(rows), "table": found.table.name}
    scored = [r for r in rows if r["references"]]
    if scored:
        text = caption_metrics({r["id"]: r["caption"] for r in scored}, {r["id"]: r["references"] for r in scored}, java=java)
        metrics |= {k: v for k, v in text.items() if k != "num"} | {"num_with_references": len(scored)}
    else:
        metrics["text_metrics"] = "skipped: no reference captions (pass --captions with a COCO captions file)"
    if found.unmapped_categories:
        metrics["unmapped_categories"] = found.unmapped_categories
    if skipped:
        metrics["skipped_images"] = len(skipped)
    (out / "caption_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def evaluate_pope(
    vlm: VLM,
    found: ObjectData,
    out: Path,
    strategy: str = "random",
    per_image: int = 3,
    seed: int = 0,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
    on_error: str = "fail",
) -> dict:
    """POPE: balanced yes/no questions from the ground truth (`build_pope_questions`, negatives
    from all of the table's objects), asked through `vlm.answer` in the table's wording. Writes
    pope_samples.jsonl (resumable) and pope_metrics.json; undecodable images as in `evaluate_captions`."""
    questions = build_pope_questions(found.records, found.objects, strategy, per_image, seed, found.table.objects, found.table)
    if not questions:
        raise RefloopError("no POPE questions: no image has an object of the table and an absent one")
    fingerprint = _fingerprint("pope", vlm, found, num_images=len(found.records), strategy=strategy, per_image=per_image, seed=seed)
    with run_directory(out, fingerprint, overwrite):
        return _evaluate_pope(vlm, found, questions, Path(out), strategy, per_image, seed, batch_size, progress, on_error)


def _evaluate_pope(vlm, found: ObjectData, questions, out: Path, strategy, per_image, seed, batch_size, progress, on_error) -> dict:
    record_of = {rec.image_id: rec for rec in found.records}
    load = _LastImage()
    skipped: list[DataError] = []
    with JsonlWriter(out / "pope_samples.jsonl", key="id") as writer:
        batches = pending_batches(
            questions, writer.done, lambda q: q["id"], lambda q: load(record_of[q["image_id"]]), batch_size, on_error, skipped, progress
        )
        for chunk, images in batches:
            answers = vlm.answer(images, [q["question"] for q in chunk])
            writer.write_many(q | {"answer": a, "parsed": parse_yes_no(a)} for q, a in zip(chunk, answers))
    wanted = {q["id"] for q in questions}
    rows = [r for r in read_records(out / "pope_samples.jsonl") if r["id"] in wanted]
    scores = pope_metrics([r["answer"] for r in rows], [r["label"] for r in rows])
    del scores["samples"]
    metrics = scores | {"strategy": strategy, "per_image": per_image, "seed": seed, "images": len({r["image_id"] for r in rows})}
    metrics["table"] = found.table.name
    if skipped:
        metrics["skipped_questions"] = len(skipped)
    (out / "pope_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
