"""The shapes-world scene oracle: a grounder that knows the answer, with a detector's failings
added on purpose (misses, false positives, box jitter), for demos, tests and SVP's ablations."""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from refloop.boxes import Box
from refloop.data.records import ImageRecord, ObjectAnnotation
from refloop.errors import RefloopError
from refloop.grounding.base import Grounding, check_inputs, unique_phrases
from refloop.grounding.phrases import singular
from refloop.world import COLOURS, SHAPES, SIZES, Scene, referring_expressions

_GENERIC = frozenset({"object", "shape", "thing"})
# Confidence ranges: false positives score lower on average, as a detector's do, but overlap
# the true ones, so a score threshold cannot remove them all.
TRUE_SCORES = (0.5, 1.0)
FALSE_SCORES = (0.3, 0.8)


@dataclass(frozen=True)
class SceneObject:
    """What the oracle knows of one object; None where the record does not say."""

    shape: str
    colour: str | None
    size: str | None
    box: Box


def scene_record(scene: Scene, image: Image.Image | None = None) -> ImageRecord:
    """A generated scene as the record its export would load to (file name, shape categories,
    colour and size attributes, referring expressions), with the rendered `image` in memory when given."""
    file_name = f"images/{scene.image_id}.png"
    objects = tuple(
        ObjectAnnotation(
            o.box, o.shape, ann_id=k, expressions=tuple(referring_expressions(scene, o)), attributes={"colour": o.colour, "size": o.size}
        )
        for k, o in enumerate(scene.objects)
    )
    return ImageRecord(
        scene.image_id, Path(file_name), scene.width, scene.height, objects, source="shapes-world", file_name=file_name, image=image
    )


def _first(words: Sequence[str], choices: Sequence[str]) -> str | None:
    return next((w for w in words if w in choices), None)


def scene_objects(record: ImageRecord) -> list[SceneObject]:
    """Every object the record annotates: shape = category; colour and size from its attributes
    (a shapes-world export's COCO file writes them), else read from its referring expressions.
    A record whose objects carry neither cannot be grounded by the oracle (any circle would
    answer "red circle"): that is an error naming the record."""
    if record.objects and not any(a.attributes or a.expressions for a in record.objects):
        raise RefloopError(
            f"the scene oracle cannot know the objects of image {record.image_id!r} ({record.source or record.path}): its "
            "annotations carry no colour/size attributes and no referring expressions; give it a shapes-world export's "
            "COCO file (instances.json), whose annotations carry them"
        )
    out = []
    for a in record.objects:
        colour, size = a.attributes.get("colour"), a.attributes.get("size")
        if not a.attributes:
            words = " ".join(a.expressions).lower().split()
            colour, size = _first(words, COLOURS), _first(words, SIZES)
        out.append(SceneObject(singular(a.category), colour, size, a.box))
    return out


@dataclass(frozen=True)
class _Query:
    shape: str | None
    colour: str | None
    size: str | None

    @classmethod
    def read(cls, phrase: str) -> _Query | None:
        """The attributes a phrase asks for; None if it names nothing of the shapes world."""
        words = [singular(w) for w in re.findall(r"[a-z]+", phrase.lower())]
        shape, colour = _first(words, SHAPES), _first(words, COLOURS)
        if shape is None and colour is None and not _GENERIC.intersection(words):
            return None
        return cls(shape, colour, _first(words, SIZES))

    def matches(self, obj: SceneObject) -> bool:
        # An attribute the record does not know cannot refute the phrase.
        return all(
            want is None or have is None or want == have
            for want, have in ((self.shape, obj.shape), (self.colour, obj.colour), (self.size, obj.size))
        )


@dataclass(frozen=True)
class SceneOracle:
    """Grounds phrases with the true objects of shapes-world records.

    For each phrase: every object whose shape, colour and size agree with what the phrase names
    ('red circle', 'circle', 'large blue object') is found, except that each is missed with
    probability `miss_rate`; corners move by up to `jitter` of the box's width (x) or height (y);
    and with probability `false_positive_rate` one false detection is added on a random box,
    labelled with the phrase if nothing in the scene matches it (the detector confirms a
    hallucination), else with a colour-shape pair absent from the scene. True detections score
    in TRUE_SCORES, false ones in FALSE_SCORES.

    Deterministic: the draws for a phrase depend only on (seed, image, phrase), so an image asked
    the same phrase twice gets the same answer, as from a real detector.
    """

    miss_rate: float = 0.0
    false_positive_rate: float = 0.0
    jitter: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for field, value in (("miss_rate", self.miss_rate), ("false_positive_rate", self.false_positive_rate)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SceneOracle {field} must lie in [0, 1], got {value}")
        if not 0.0 <= self.jitter < 0.5:
            raise ValueError(f"SceneOracle jitter must lie in [0, 0.5) of the box size (more can invert boxes), got {self.jitter}")

    @property
    def name(self) -> str:
        return f"scene-oracle(miss={self.miss_rate},fp={self.false_positive_rate},jitter={self.jitter},seed={self.seed})"

    def ground(
        self,
        images: Sequence[Image.Image],
        phrases: Sequence[Sequence[str]],
        records: Sequence[ImageRecord] | None = None,
    ) -> list[Grounding]:
        if records is None:
            raise ValueError("the scene oracle reads the answer from the image records: pass records=")
        check_inputs(images, phrases, records)
        out = []
        for image, asked, record in zip(images, phrases, records, strict=True):
            if image.size != record.size:
                w, h = image.size
                raise ValueError(f"image {record.image_id!r} is {w}x{h} but its record says {record.width}x{record.height}")
            out.append(self._ground_one(record, unique_phrases(asked)))
        return out

    def _ground_one(self, record: ImageRecord, phrases: list[str]) -> Grounding:
        truth = scene_objects(record)
        present = {(o.colour, o.shape) for o in truth}
        absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if (c, s) not in present]
        image_key = zlib.crc32(f"{record.image_id}|{record.file_name or record.path}".encode())
        boxes: list[Box] = []
        labels: list[str] = []
        scores: list[float] = []
        for phrase in phrases:
            rng = np.random.default_rng([self.seed, image_key, zlib.crc32(phrase.lower().encode())])
            query = _Query.read(phrase)
            matched = [o for o in truth if query is not None and query.matches(o)]
            for obj in matched:
                missed = rng.random() < self.miss_rate
                shift = rng.uniform(-self.jitter, self.jitter, size=4) if self.jitter else np.zeros(4)
                score = rng.uniform(*TRUE_SCORES)
                if not missed:
                    b = obj.box
                    boxes.append(
                        Box(b.x1 + shift[0] * b.width, b.y1 + shift[1] * b.height, b.x2 + shift[2] * b.width, b.y2 + shift[3] * b.height)
                    )
                    labels.append(phrase)
                    scores.append(score)
            if rng.random() < self.false_positive_rate:
                label = phrase if not matched else (absent[int(rng.integers(len(absent)))] if absent else phrase)
                boxes.append(self._random_box(rng, record.size))
                labels.append(label)
                scores.append(rng.uniform(*FALSE_SCORES))
        return Grounding.from_detections(boxes, labels, scores, record.size)

    @staticmethod
    def _random_box(rng: np.random.Generator, image_size: tuple[int, int]) -> Box:
        """A box of a typical object's size (10-30% of the shorter side) anywhere in the image."""
        w, h = image_size
        side = rng.uniform(0.1, 0.3) * min(w, h)
        bw, bh = side * rng.uniform(0.8, 1.25), side * rng.uniform(0.8, 1.25)
        x1, y1 = rng.uniform(0, max(w - bw, 0)), rng.uniform(0, max(h - bh, 0))
        return Box(x1, y1, x1 + bw, y1 + bh)
