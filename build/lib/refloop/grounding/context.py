"""A grounding as text for the guided caption prompt (SVP Sec. 3 and appendix F), and back.

SVP turns the detector's output into text and puts it into the captioner's prompt: one object
per line, its label then its box. By default a box is normalised x1, y1, x2, y2 in 0-1 with two
decimals, as the paper's system prompt describes; with a `codec` it is written in a model
family's own box text (refloop-tiny's `{<x1><y1><x2><y2>}`, Qwen2-VL's `<|box_start|>...`), the
form that model already reads.
"""

from __future__ import annotations

import re

from refloop.boxes import Box
from refloop.codecs import Codec, ImageSize
from refloop.codecs.formats import NormalisedXYXY
from refloop.grounding.base import Grounding

# Every family's box text starts with one of these; labels are kept free of them.
_BOX_START = re.compile(r"[\[\(\{<]")
_LABEL_JUNK = re.compile(r"[\[\]\(\)\{\}<>]")


def _clean_label(label: str) -> str:
    return " ".join(_LABEL_JUNK.sub(" ", label).split()) or "object"


def grounding_context(grounding: Grounding, image_size: ImageSize, codec: Codec | None = None) -> str:
    """The grounding as context text: one 'label box' line per detection, in the grounding's
    order (best first); '' for an empty grounding (the caller decides whether to skip the sample).

    `image_size` is the (width, height) the boxes are in; `codec` None writes normalised xyxy."""
    codec = codec or NormalisedXYXY()
    return "\n".join(
        f"{_clean_label(label)} {codec.encode(box, image_size)}" for box, label in zip(grounding.boxes, grounding.labels, strict=True)
    )


def parse_grounding_context(text: str, image_size: ImageSize, codec: Codec | None = None) -> Grounding:
    """Read context text back: a line's label is the text before its box, its box the first the
    codec finds. The text carries no scores: each is 1.0. Lines with no usable box are dropped
    and counted."""
    codec = codec or NormalisedXYXY()
    boxes: list[Box | None] = []
    labels: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        start = _BOX_START.search(line)
        labels.append(" ".join(line[: start.start()].split()) if start else "")
        boxes.append(codec.parse_first(line, image_size))
    unparsed = sum(b is None for b in boxes)
    pairs = [(b, lab) for b, lab in zip(boxes, labels, strict=True) if b is not None]
    return Grounding.from_detections([b for b, _ in pairs], [lab for _, lab in pairs], [1.0] * len(pairs), image_size, dropped=unparsed)
