"""Pink's referential-comprehension (RC) instruction data (Sec. 3.2): annotated boxes, categories,
expressions and relations turned into one-turn chat samples, one JSON object per line.

Tasks (`TASKS`), each answered from the annotations alone:
- visual-grounding: an expression -> its box (the family's own REC answer);
- grounding-caption: a box -> an expression that singles it out;
- relation-predicate: a subject box and an object box -> every predicate joining them;
- relation-objects: a subject box and a predicate -> every object in that relation, named;
- spatial: an object's box and a quadrant around its centre (top left, ...) -> every object whose
  centre lies there, named;
- counting: an object's box or a class name -> how many objects share that category;
- detection: an object's box or a class name -> the boxes of every object of that category.

Lists of objects are sorted by box area, largest first (as Pink's release does); an empty list is
"none". Boxes are written in the prompt profile's coordinate text, so the family's codec reads
every one back. Instructions come from template banks chosen by a random stream per (seed, task,
image): the same seed gives the same file, byte for byte, and asking for fewer tasks does not
change the samples of the others. Annotations must be exhaustive per category for counting and
detection: feed detection files there, and attach bootstrapped expressions to them
(`attach_expressions`) rather than counting over kept pairs alone.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from refloop.boxes import Box, iou_matrix
from refloop.codecs.formats import JsonBBoxCodec
from refloop.codecs.profiles import PromptProfile, get_profile
from refloop.data.formats import Relation, load_visual_genome, load_visual_genome_relationships
from refloop.data.jsonl import write_text_whole
from refloop.data.loaders import LoadReport, OnError, jsonl_lines, load_coco, load_referring
from refloop.data.paths import ImageRoot, shown
from refloop.data.records import ImageRecord, InstructionExample, ObjectAnnotation
from refloop.data.sources import cache_dir
from refloop.errors import DataError, RefloopError
from refloop.runs import run_directory
from refloop.world import DOMAINS, TRAIN_SEED
from refloop.world.export import COCO_FILE, REFS_FILE, VG_RELATIONSHIPS_FILE, export_visual_genome

TASKS = (
    "visual-grounding",
    "grounding-caption",
    "relation-predicate",
    "relation-objects",
    "spatial",
    "counting",
    "detection",
)
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
EMPTY_ANSWER = "none"  # a list with no object in it

# Instruction banks in our own words. Slots: {expression}, {box} (an object's box), {subject} and
# {object} (boxes), {predicate}, {position} (a quadrant), {category} (a class name).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "visual-grounding": (
        "Where is {expression}? Answer with its bounding box.",
        "Give the box of the object described as: {expression}.",
        "Find {expression} in the picture and write down its coordinates.",
        "Which region shows {expression}? Reply with the box.",
        "Mark {expression} with a bounding box.",
    ),
    "grounding-caption": (
        "Describe the object at {box} so that it cannot be mistaken for any other.",
        "What short phrase singles out the object in {box}?",
        "Write a referring expression for the region {box}.",
        "Name the object inside {box} in a way that tells it apart from the rest.",
    ),
    "relation-predicate": (
        "How is the object at {subject} related to the object at {object}?",
        "State the relation from {subject} to {object}, reading the first box as the subject.",
        "What relation links the subject {subject} to the object {object}?",
        "Name every relationship that holds from the object in {subject} to the object in {object}.",
    ),
    "relation-objects": (
        'List every object X for which "{subject} {predicate} X" is true, with its name and box.',
        'The subject is at {subject} and the relation is "{predicate}". Name and locate each object it has this relation to.',
        'Find all objects that the object at {subject} is linked to by the relation "{predicate}", giving the name and box of each.',
        'Which objects complete the triple (subject {subject}, relation "{predicate}", object ?)? Name and locate each one.',
    ),
    "spatial": (
        "Which objects are to the {position} of the object at {box}? Give their names and boxes.",
        "Name and locate everything that lies to the {position} of {box}.",
        "Identify all objects in the {position} quadrant around the object at {box}.",
        "Taking the centre of {box} as the origin, which objects are in the {position} quadrant? List names and boxes.",
    ),
    "counting-object": (
        "How many objects in the image belong to the same category as the one at {box}?",
        "Count the objects of the same kind as the object in {box}, that object included.",
        "The region {box} holds one object. How many objects of its category does the picture contain?",
    ),
    "counting-name": (
        'How many objects of the category "{category}" are in the image?',
        "Count every {category} in the picture.",
        "What is the number of {category} instances in this image?",
    ),
    "detection-object": (
        "Find all objects of the same category as the one at {box} and give their boxes.",
        "Locate every object of the same kind as the object in {box}.",
        "Give the boxes of all objects that share a category with {box}.",
    ),
    "detection-name": (
        "Detect every {category} in the image and give its box.",
        'Give the bounding boxes of all objects of the category "{category}".',
        "Where are the instances of {category}? List their boxes.",
    ),
}

# What each task reads, and where users get it; named when the data has none.
_NEEDS = {
    "visual-grounding": "expressions",
    "grounding-caption": "expressions",
    "relation-predicate": "relationships",
    "relation-objects": "relationships",
    "spatial": "category",
    "counting": "category",
    "detection": "category",
}
_SOURCES = {
    "expressions": "referring expressions (field 'expressions' of the objects: a referring JSONL's 'sentences', RefCOCO refs, "
    "bootstrapped pairs)",
    "relationships": "relationships (Visual Genome relationships.json, or a shapes-world domain)",
    "category": "object categories (field 'category': COCO / Objects365 categories, Visual Genome object names)",
}


@dataclass(frozen=True)
class _Query:
    """One candidate sample: the bank its instruction comes from, the slot values, the answer.
    Boxes and answers are written only for the queries drawn (a crowded image has dozens of
    candidates per task and keeps a few)."""

    bank: str
    slots: dict[str, str | Box]
    answer: str | Callable[[], str]


class BoxText:
    """Boxes in a profile's coordinate text: alone (in instructions), as a located expression
    (the family's REC answer), or as a list of named boxes (answers naming several objects)."""

    def __init__(self, profile: PromptProfile) -> None:
        self.profile, self.codec = profile, profile.codec
        self.json = isinstance(profile.codec, JsonBBoxCodec)

    def box(self, box: Box, size: tuple[int, int]) -> str:
        if self.json:  # the bbox_2d object alone: the codec reads it; a label would name no one
            return json.dumps({"bbox_2d": self.codec.coordinates(box, size)})
        return self.codec.encode(box, size)

    def located(self, box: Box, size: tuple[int, int], expression: str) -> str:
        return self.profile.rec_answer(box, size, expression)

    def named(self, objects: Sequence[ObjectAnnotation], size: tuple[int, int]) -> str:
        """Name then box for each object; JSON families get their own list of bbox_2d + label."""
        if not objects:
            return EMPTY_ANSWER
        if self.json:
            rows = [json.dumps({"bbox_2d": self.codec.coordinates(o.box, size), "label": o.category or "object"}) for o in objects]
            return "```json\n[\n" + ",\n".join(f"\t{row}" for row in rows) + "\n]\n```"
        return ", ".join(f"{o.category} {self.codec.encode(o.box, size)}".strip() for o in objects)


def by_area(objects: Iterable[ObjectAnnotation]) -> list[ObjectAnnotation]:
    """Largest box first; ties top-to-bottom, then left-to-right, then by name."""
    return sorted(objects, key=lambda o: (-o.box.area, o.box.y1, o.box.x1, o.category))


def quadrant(of: Box, around: Box) -> str | None:
    """The quadrant of `of`'s centre around `around`'s centre (image y grows downwards); None on
    either centre line, where no quadrant is meant."""
    (x, y), (cx, cy) = of.center, around.center
    if x == cx or y == cy:
        return None
    return f"{'top' if y < cy else 'bottom'} {'left' if x < cx else 'right'}"


def _key(obj: ObjectAnnotation) -> tuple:
    return (obj.box, obj.category)


class _Candidates:
    """The candidate queries of each task on one image, and their text once drawn."""

    def __init__(self, profile: PromptProfile) -> None:
        self.text = BoxText(profile)

    def render(self, query: _Query, size: tuple[int, int], template: str) -> tuple[str, str]:
        """(instruction, answer) of a drawn query."""
        slots = {k: self.text.box(v, size) if isinstance(v, Box) else v for k, v in query.slots.items()}
        return template.format(**slots), query.answer if isinstance(query.answer, str) else query.answer()

    def native(self, query: _Query, size: tuple[int, int]) -> str | None:
        """The family's own instruction for a grounding query (None: the bank has no native form)."""
        if query.bank == "visual-grounding":
            return self.text.profile.rec_instruction(query.slots["expression"])
        if query.bank == "grounding-caption":
            return self.text.profile.reg_instruction(query.slots["box"], size)
        return None

    def visual_grounding(self, record: ImageRecord, relations: Sequence[Relation], rng: random.Random) -> list[_Query]:
        out = []
        for o in record.objects:
            if o.expressions:
                expression = rng.choice(o.expressions)
                out.append(
                    _Query("visual-grounding", {"expression": expression}, partial(self.text.located, o.box, record.size, expression))
                )
        return out

    def grounding_caption(self, record: ImageRecord, relations: Sequence[Relation], rng: random.Random) -> list[_Query]:
        return [_Query("grounding-caption", {"box": o.box}, rng.choice(o.expressions)) for o in record.objects if o.expressions]

    def relation_predicate(self, record: ImageRecord, relations: Sequence[Relation], rng: random.Random) -> list[_Query]:
        pairs: dict[tuple, list[str]] = {}
        ends: dict[tuple, tuple[Box, Box]] = {}
        for r in relations:
            key = (_key(r.subject), _key(r.object))
            ends.setdefault(key, (r.subject.box, r.object.box))
            if r.predicate not in pairs.setdefault(key, []):
                pairs[key].append(r.predicate)
        return [
            _Query("relation-predicate", {"subject": ends[key][0], "object": ends[key][1]}, " and ".join(predicates))
            for key, predicates in pairs.items()
        ]

    def relation_objects(self, record: ImageRecord, relations: Sequence[Relation], rng: random.Random) -> list[_Query]:
        groups: dict[tuple, dict[tuple, ObjectAnnotation]] = {}
        subjects: dict[tuple, Box] = {}
        for r in relations:
            key = (_key(r.subject), r.predicate)
            subjects.setdefault(key, r.subject.box)
            groups.setdefault(key, {}).setdefault(_key(r.object), r.object)
        return [
            _Query(
                "relation-objects",
                {"subject": subjects[key], "predicate": key[1]},
                partial(self.text.named, by_area(objects.values()), record.size),
            )
            for key, objects in groups.items()
        ]

    def spatial(self, record: ImageRecord, relations: Sequence[Relation], rng: random.Random) -> list[_Query]:
        objects = [o for o in record.objects if o.category]
        out = []
        for anchor in objects:
            for position in QUADRANTS:
                there = [o for o in objects if o is not anchor and quadrant(o.box, anchor.box) == position]
                out.append(
                    _Query("spatial", {"box": anchor.box, "position": position}, partial(self.text.named, by_area(there), record.size))
                )
        return out

    def counting(self, record: ImageRecord, relations: Sequence[Relation], rng: random.Random) -> list[_Query]:
        objects = [o for o in record.objects if o.category]
        count = Counter(o.category for o in objects)
        by_object = [_Query("counting-object", {"box": o.box}, str(count[o.category])) for o in objects]
        return by_object + [_Query("counting-name", {"category": c}, str(n)) for c, n in count.items()]

    def detection(self, record: ImageRecord, relations: Sequence[Relation], rng: random.Random) -> list[_Query]:
        objects = [o for o in record.objects if o.category]
        members = {c: by_area(o for o in objects if o.category == c) for c in dict.fromkeys(o.category for o in objects)}
        answer = {c: partial(self._boxes, group, record.size) for c, group in members.items()}
        by_object = [_Query("detection-object", {"box": o.box}, answer[o.category]) for o in objects]
        return by_object + [_Query("detection-name", {"category": c}, a) for c, a in answer.items()]

    def _boxes(self, objects: list[ObjectAnnotation], size: tuple[int, int]) -> str:
        """Boxes alone (the category is in the question); JSON families need a label per box."""
        if self.text.json:
            return self.text.named(objects, size)
        return ", ".join(self.text.box(o.box, size) for o in objects)


def _check_annotations(tasks: Sequence[str], records: Sequence[ImageRecord], relations: Mapping[Any, Sequence[Relation]] | None) -> None:
    present = {
        "expressions": any(o.expressions for r in records for o in r.objects),
        "category": any(o.category for r in records for o in r.objects),
        "relationships": bool(relations) and any(relations.get(r.image_id) for r in records),
    }
    for task in tasks:
        need = _NEEDS[task]
        if not present[need]:
            raise RefloopError(f"task {task!r} needs {_SOURCES[need]}, and the data has no {need!r}")


def _file_name(record: ImageRecord, folder: Path, root: Path | None) -> str:
    """A record's image as the file names `load_rc_data` reads: as its annotations wrote it (relative
    to their image root, recorded beside the file), else (a record built in memory) relative to the
    RC file's folder when the image is under it; else the absolute path, which the confinement rule
    refuses at read time."""
    if root is not None:
        return record.file_name
    path, folder = Path(record.path).resolve(), folder.resolve()
    return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(record.path)


def build_rc_data(
    records: Sequence[ImageRecord],
    out_path: str | Path,
    tasks: Sequence[str] | None = None,
    profile: PromptProfile | str = "refloop-tiny",
    seed: int = 0,
    max_per_image: int | None = 4,
    relations: Mapping[Any, Sequence[Relation]] | None = None,
    native: bool = False,
) -> dict[str, int]:
    """Write the RC samples of `tasks` (default: all) on `records` to `out_path` (chat JSONL,
    written whole and atomically) and return the count per task.

    `max_per_image` caps the samples of one task on one image (None: every candidate);
    `relations` maps a record's image_id to its triplets. `native`: visual-grounding and
    grounding-caption ask with the family's own REC / REG instruction (what `locate` and
    `describe` send) instead of the template banks, to tune the prompts a model is evaluated and
    used with (the other tasks have no native prompt and keep their banks). A task whose annotations the data lacks
    stops the build with a RefloopError naming the task and the field, before anything is written.
    """
    tasks = list(TASKS) if tasks is None else list(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise RefloopError(f"unknown RC task(s) {', '.join(map(repr, unknown)) or '(none given)'}; known: {', '.join(TASKS)}")
    if max_per_image is not None and max_per_image < 1:
        raise RefloopError(f"max_per_image must be at least 1 (or None for no cap), got {max_per_image}")
    profile = get_profile(profile) if isinstance(profile, str) else profile
    _check_annotations(tasks, records, relations)
    candidates = _Candidates(profile)
    twice = [i for i, n in Counter(r.image_id for r in records).items() if n > 1]
    if twice:
        raise RefloopError(f"image_id {twice[0]!r} names two records: sample ids would clash (build each source on its own)")
    making = {
        "visual-grounding": candidates.visual_grounding,
        "grounding-caption": candidates.grounding_caption,
        "relation-predicate": candidates.relation_predicate,
        "relation-objects": candidates.relation_objects,
        "spatial": candidates.spatial,
        "counting": candidates.counting,
        "detection": candidates.detection,
    }
    ordered = [t for t in TASKS if t in tasks]
    counts = dict.fromkeys(ordered, 0)

    def lines() -> Iterable[str]:
        for record in records:
            image_relations = (relations or {}).get(record.image_id, ())
            for task in ordered:
                rng = random.Random(f"refloop-rc/{seed}/{task}/{record.image_id!r}")
                queries = making[task](record, image_relations, rng)
                rng.shuffle(queries)
                for n, query in enumerate(queries[:max_per_image]):
                    instruction, answer = candidates.render(query, record.size, rng.choice(TEMPLATES[query.bank]))
                    if native:
                        instruction = candidates.native(query, record.size) or instruction
                    counts[task] += 1
                    sample = {
                        "id": f"{record.image_id}/{task}/{n}",
                        "task": task,
                        "image": str(record.path),
                        "file_name": _file_name(record, out.parent, root),  # what refloop reads: relative to the image root
                        "messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}],
                        "prompt": profile.prompt(instruction),
                        "answer": answer,
                        "profile": profile.name,
                        "frame": profile.frame_text,
                    }
                    yield json.dumps(sample) + "\n"

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    root = _records_root(records)
    write_text_whole(out, lines())  # all lines or none: a build stopped half way leaves no file a trainer takes as whole
    sidecar = out.with_name(out.name + ROOT_SUFFIX)  # where load_rc_data (and sft) reads the images
    if root is not None:
        sidecar.write_text(json.dumps({IMAGE_ROOT_KEY: str(root)}) + "\n")
    else:
        sidecar.unlink(missing_ok=True)
    return counts


IMAGE_ROOT_KEY = "image_root"
ROOT_SUFFIX = ".root.json"  # rc.jsonl -> rc.jsonl.root.json: {"image_root": ...}, written by `build_rc_data`


def rc_image_root(path: str | Path) -> Path:
    """The image root of an RC file: the one `build_rc_data` recorded beside it (FILE.root.json),
    else the file's folder."""
    path = Path(path)
    try:
        root = json.loads(path.with_name(path.name + ROOT_SUFFIX).read_text()).get(IMAGE_ROOT_KEY)
    except (OSError, ValueError, AttributeError):
        root = None
    return Path(root) if isinstance(root, str) and root else path.parent


def _records_root(records: Sequence[ImageRecord]) -> Path | None:
    """The one image root the records' file names are relative to (their paths without the file
    names), or None when they have none or disagree."""
    roots = set()
    for r in records:
        if not r.file_name or Path(r.file_name).is_absolute():
            return None
        parts, name = Path(r.path).parts, Path(r.file_name).parts
        if len(parts) <= len(name) or parts[-len(name) :] != name:
            return None
        roots.add(Path(*parts[: -len(name)]))
    return roots.pop() if len(roots) == 1 else None


def load_rc_data(
    path: str | Path, profile: PromptProfile | str | None = None, image_root: str | Path | None = None, model: str | None = None
) -> list[InstructionExample]:
    """The samples of an RC file as SFT examples. A line that is not a sample (bad JSON, a field
    missing or not a string, an id seen before, another profile's text or, for a PromptProfile,
    another pixel frame when `profile` is given) is a DataError naming the file and line; `model`
    names the checkpoint in the way out. Each image (`file_name`; a file without it: `image`)
    goes through the confinement rule before anything is opened: relative, under `image_root`
    (default `rc_image_root`), no symlink out of it."""
    path = Path(path)
    root = ImageRoot(image_root if image_root is not None else rc_image_root(path))
    name = profile if isinstance(profile, str) or profile is None else profile.name
    rebuild = f"rebuild it with `refloop rc-data --model {model}`" if model else f"rebuild it with --profile {name}"
    examples, seen = [], {}
    for number, entry in jsonl_lines(path):
        rec = f"line {number}"
        if isinstance(entry, DataError):
            raise entry
        if not isinstance(entry, dict):
            raise DataError(path, rec, f"expected a JSON object, got {shown(entry)}")
        for key in ("id", "image", "prompt", "answer"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise DataError(path, rec, f"field {key!r} must be a non-empty string, got {shown(entry.get(key))}")
        if entry["id"] in seen:
            raise DataError(path, rec, f"id {shown(entry['id'])} is already used on line {seen[entry['id']]}")
        seen[entry["id"]] = number
        if name is not None and entry.get("profile") != name:
            raise DataError(path, rec, f"written for profile {shown(entry.get('profile'))}, not {name!r} (the model's): {rebuild}")
        if isinstance(profile, PromptProfile) and entry.get("frame", "") != profile.frame_text:
            raise DataError(
                path,
                rec,
                f"boxes written in the pixel frame {shown(entry.get('frame'))}, not {profile.frame_text!r} (the model's): {rebuild}",
            )
        if "file_name" not in entry and Path(entry["image"]).is_absolute():
            problem = f"image path {shown(entry['image'])} is absolute and the line has no file_name"
            raise DataError(path, rec, f"{problem}: rebuild the file with `refloop rc-data`")
        image = root.resolve_str(entry.get("file_name", entry["image"]), path, rec)
        examples.append(InstructionExample(image, entry["prompt"], entry["answer"], example_id=entry["id"]))
    return examples


def attach_expressions(records: Sequence[ImageRecord], referring: Sequence[ImageRecord], min_iou: float = 0.9) -> list[ImageRecord]:
    """Detection records whose objects gain the expressions of referring objects on the same image
    file with a matching box (the best IoU of at least `min_iou`): Pink's bootstrapped pairs keep
    the ground-truth box, so counting and detection still see every box of the detection file."""
    by_path: dict[Path, list[ObjectAnnotation]] = {}
    for r in referring:
        by_path.setdefault(r.path, []).extend(o for o in r.objects if o.expressions)
    out = []
    for record in records:
        refs = by_path.get(record.path)
        if not refs or not record.objects:
            out.append(record)
            continue
        iou = iou_matrix([o.box for o in record.objects], [o.box for o in refs])
        objects = []
        for i, obj in enumerate(record.objects):
            j = int(iou[i].argmax())
            if iou[i, j] >= min_iou:
                obj = replace(obj, expressions=tuple(dict.fromkeys(obj.expressions + refs[j].expressions)))
            objects.append(obj)
        out.append(replace(record, objects=tuple(objects)))
    return out


class RCAnnotations(NamedTuple):
    """What `build_rc_data` reads, with the load report of each file (skips counted under "skip")."""

    records: list[ImageRecord]
    relations: dict[Any, list[Relation]] | None
    reports: list[LoadReport]


def rc_annotations_root(
    data: str, images: str | Path | None = None, objects: str | Path | None = None, num_images: int = 1000, seed: int = TRAIN_SEED
) -> Path:
    """The image root the file names of `load_rc_annotations(data, images, objects, ...)` are
    relative to (what `refloop rc-data` records for `sft`)."""
    if data in DOMAINS:
        return (cache_dir() / "world" / f"{data}-seed{seed}-n{num_images}").resolve()
    return Path(images if images is not None or objects is not None else Path(data).parent).resolve()


def load_rc_annotations(
    data: str,
    images: str | Path | None = None,
    objects: str | Path | None = None,
    relationships: str | Path | None = None,
    expressions: str | Path | None = None,
    num_images: int = 1000,
    seed: int = TRAIN_SEED,
    on_error: OnError = "fail",
) -> RCAnnotations:
    """Records and relations from what `refloop rc-data --data` names:
    - a shapes-world domain: its training split (`num_images` scenes of `seed`) with boxes and
      categories, the grammar's expressions and the geometric relations, read back from the
      exported COCO, referring and Visual Genome files;
    - with `objects`: Visual Genome (`data` is image_data.json; images {image_id}.jpg under `images`);
    - else a COCO / Objects365 `.json` or a referring `.jsonl`.
    `relationships` (VG relationships.json) adds triplets by image_id; `expressions` (a referring
    JSONL, e.g. bootstrapped pairs) adds expressions to the boxes they match. Annotation-only: no
    image is opened."""
    if data in DOMAINS:
        directory = export_visual_genome(data, rc_annotations_root(data, num_images=num_images, seed=seed), num_images, seed)
        records, report = load_coco(directory / COCO_FILE, directory, on_error=on_error)
        images, expressions, relationships = directory, directory / REFS_FILE, directory / VG_RELATIONSHIPS_FILE
    elif objects is not None:
        if images is None:
            raise RefloopError("Visual Genome data needs --images, the folder of its {image_id}.jpg files")
        records, report = load_visual_genome(data, images, objects, on_error=on_error)
    elif str(data).endswith(".json"):
        records, report = load_coco(data, images, on_error=on_error)
    elif str(data).endswith(".jsonl"):
        records, report = load_referring(data, images, on_error=on_error)
    else:
        raise RefloopError(
            f"--data {data!r} is neither a shapes-world domain ({', '.join(DOMAINS)}), a .json (COCO, or VG image_data with --objects) "
            "nor a .jsonl (referring) file"
        )
    reports = [report]
    if expressions is not None:
        referring, report = load_referring(expressions, images, on_error=on_error)
        records, reports = attach_expressions(records, referring), reports + [report]
    relations = None
    if relationships is not None:
        relations, report = load_visual_genome_relationships(relationships, {r.image_id: r.size for r in records}, on_error=on_error)
        reports.append(report)
    return RCAnnotations(records, relations, reports)


def parse_tasks(tasks: str | None) -> list[str] | None:
    """A comma-separated task list (None: the tasks the annotations support); an unknown task is refused."""
    chosen = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    unknown = sorted(set(chosen or ()) - set(TASKS))
    if unknown:
        raise RefloopError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    return chosen


def check_sources(data: str, **files: object) -> None:
    """A shapes-world domain brings its own boxes, expressions and relations: other annotation
    files (`files`: option name -> value) beside it are refused."""
    given = [name for name, value in files.items() if value]
    if data in DOMAINS and given:
        raise RefloopError(f"{', '.join(given)} cannot be combined with the shapes-world domain {data!r} (it has its own annotations)")


def supported_tasks(found: RCAnnotations) -> list[str]:
    """What the annotations support: relation tasks need relations, grounding tasks expressions."""
    has_expressions = any(o.expressions for r in found.records for o in r.objects)
    return [t for t in TASKS if not (t.startswith("relation") and not found.relations) and not ("grounding" in t and not has_expressions)]


def write_rc_dataset(
    out: Path,
    data: str,
    profile: PromptProfile,
    tasks: list[str] | None = None,
    images: str | Path | None = None,
    objects: str | Path | None = None,
    relationships: str | Path | None = None,
    expressions: str | Path | None = None,
    seed: int = 0,
    max_per_image: int = 4,
    num_images: int = 1000,
    native_prompts: bool = False,
    on_error: OnError = "fail",
    overwrite: bool = False,
) -> dict:
    """`refloop rc-data`: out/rc.jsonl from the annotations `load_rc_annotations` reads (`tasks`
    None: every task they support), and out/counts.json (samples per task, records skipped, the
    image root `sft` reads from), returned. A run directory: rerun to reuse, another recipe refused."""
    fingerprint = {
        "task": "rc-data",
        "data": data,
        "tasks": tasks,
        "profile": profile.name,
        "frame": profile.frame_text,
        "seed": seed,
        "max_per_image": max_per_image,
        "native_prompts": native_prompts,
    }
    with run_directory(out, fingerprint, overwrite):
        found = load_rc_annotations(data, images, objects, relationships, expressions, num_images=num_images, on_error=on_error)
        chosen = supported_tasks(found) if tasks is None else tasks
        counts = build_rc_data(found.records, out / "rc.jsonl", chosen, profile, seed, max_per_image, found.relations, native_prompts)
        skipped = {str(r.source): r.skipped for r in found.reports if r.skipped}
        summary = {"samples": counts, "total": sum(counts.values()), "skipped_records": skipped}
        summary[IMAGE_ROOT_KEY] = str(rc_image_root(out / "rc.jsonl"))  # where sft reads the images
        write_text_whole(out / "counts.json", json.dumps(summary, indent=2) + "\n")
    return summary
