"""The grounder interface: images + phrases -> boxes, labels, scores (one `Grounding` per image).

SVP's inner loop grounds each prior caption and writes the result into the guided prompt; any
grounder (an open-set detector, a VLM's REC, the shapes-world oracle) stands behind this one
Protocol. Model output is not trusted: `Grounding.from_detections` is the one place where a
detection is checked, and what fails the check is dropped and counted, never raised.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from refloop.boxes import Box, nms
from refloop.data.records import ImageRecord

ImageSize = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class Grounding:
    """Detections on one image, best score first; boxes in pixel xyxy of the original image.

    `dropped` counts detections the grounder produced but that could not be used (non-finite or
    inverted boxes, boxes with no area inside the image, missing labels, non-finite scores,
    labels and scores that do not pair up with boxes, answers that did not parse).
    """

    boxes: tuple[Box, ...] = ()
    labels: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    dropped: int = 0

    def __post_init__(self) -> None:
        if not len(self.boxes) == len(self.labels) == len(self.scores):
            counts = f"{len(self.boxes)} boxes, {len(self.labels)} labels, {len(self.scores)} scores"
            raise ValueError(f"a Grounding needs one label and one score per box, got {counts}")

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def from_detections(
        cls,
        boxes: Iterable[object],
        labels: Iterable[object],
        scores: Iterable[object],
        image_size: ImageSize,
        dropped: int = 0,
    ) -> Grounding:
        """Keep the usable detections of raw grounder output, clipped to the image, best first.

        A box is a `Box` or four numbers x1, y1, x2, y2 in pixels (a tensor row works), read by the
        rule every codec applies to model-written boxes (`Box.from_model_output`). If boxes, labels
        and scores differ in number, nothing pairs them reliably: every detection is dropped.
        `dropped` carries detections a caller already discarded (e.g. answers that did not parse).
        """
        boxes, labels, scores = list(boxes), list(labels), list(scores)
        if not len(boxes) == len(labels) == len(scores):
            return cls(dropped=dropped + max(len(boxes), len(labels), len(scores)))
        kept: list[tuple[Box, str, float]] = []
        for raw_box, raw_label, raw_score in zip(boxes, labels, scores, strict=True):
            box = _read_box(raw_box, image_size)
            label = " ".join(raw_label.split()) if isinstance(raw_label, str) else ""
            score = _read_score(raw_score)
            if box is None or not label or score is None:
                dropped += 1
                continue
            kept.append((box, label, score))
        kept.sort(key=lambda d: -d[2])
        return cls(tuple(d[0] for d in kept), tuple(d[1] for d in kept), tuple(d[2] for d in kept), dropped)

    def suppress(self, iou_threshold: float | None = 0.5, max_detections: int | None = None) -> Grounding:
        """Non-maximum suppression within each label, then at most `max_detections`, best first.

        Open-set detectors answer with many overlapping boxes per object; SVP keeps the best box
        of each overlapping group (appendix, Fig. 17). Suppressing within a label, as detection
        benchmarks do, keeps a shirt inside its person.
        """
        keep = list(range(len(self)))
        if iou_threshold is not None:
            keep = []
            for label in dict.fromkeys(self.labels):
                members = [i for i, lab in enumerate(self.labels) if lab == label]
                keep += [members[j] for j in nms([self.boxes[i] for i in members], [self.scores[i] for i in members], iou_threshold)]
            keep.sort(key=lambda i: (-self.scores[i], i))
        if max_detections is not None:
            keep = keep[:max_detections]
        return Grounding(
            tuple(self.boxes[i] for i in keep), tuple(self.labels[i] for i in keep), tuple(self.scores[i] for i in keep), self.dropped
        )


def _read_box(raw: object, image_size: ImageSize) -> Box | None:
    if isinstance(raw, Box):
        values: Sequence[object] = raw.as_list()
    else:
        try:
            values = [v.item() if hasattr(v, "item") else v for v in raw]  # type: ignore[union-attr]
        except TypeError:
            return None
    if len(values) != 4:
        return None
    return Box.from_model_output(*values, image_size)  # type: ignore[arg-type]


def _read_score(raw: object) -> float | None:
    try:
        score = float(raw.item() if hasattr(raw, "item") else raw)  # type: ignore[union-attr, arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return score if math.isfinite(score) else None


class Grounder(Protocol):
    """Finds the objects named by phrases: one `Grounding` per image, labels taken from its phrases
    (the scene oracle's false positives aside). `records` carry annotations; only the scene oracle
    reads them."""

    name: str

    def ground(
        self,
        images: Sequence[Image.Image],
        phrases: Sequence[Sequence[str]],
        records: Sequence[ImageRecord] | None = None,
    ) -> list[Grounding]: ...


def check_inputs(images: Sequence[object], phrases: Sequence[Sequence[str]], records: Sequence[object] | None = None) -> None:
    """One phrase list (and record, when given) per image; a mismatch is a caller's bug."""
    if len(images) != len(phrases):
        raise ValueError(f"{len(images)} images for {len(phrases)} phrase lists")
    if records is not None and len(records) != len(images):
        raise ValueError(f"{len(images)} images for {len(records)} records")
    for group in phrases:
        if isinstance(group, str):
            raise TypeError("phrases must be one list of phrases per image, not a string")


def unique_phrases(phrases: Iterable[str]) -> list[str]:
    """Phrases stripped of surrounding space, empty ones removed, first occurrence kept
    (case-insensitive): a detector asked twice for one thing answers twice."""
    seen: dict[str, str] = {}
    for phrase in phrases:
        text = " ".join(str(phrase).split())
        if text and text.lower() not in seen:
            seen[text.lower()] = text
    return list(seen.values())
