"""Vision-language models as grounders: any refloop VLM's REC, and Florence-2's phrase grounding."""

from __future__ import annotations

import re
from collections.abc import Sequence

from PIL import Image

from refloop.codecs import Codec, ImageSize
from refloop.codecs.base import Corners
from refloop.data.records import ImageRecord
from refloop.grounding.base import Grounding, check_inputs, unique_phrases
from refloop.models.base import VLM, GenerateOptions


class VLMGrounder:
    """A VLM's referring-expression comprehension as a grounder: one located box per phrase,
    score 1.0 (REC gives no confidence). An answer that does not parse is dropped and counted.

    REC names one object per phrase, so a phrase for several objects ("two red circles") yields
    one box; an open-set detector finds them all."""

    def __init__(self, vlm: VLM, options: GenerateOptions | None = None) -> None:
        self.vlm, self.options = vlm, options
        self.name = f"vlm-rec:{vlm.name}"

    def ground(
        self,
        images: Sequence[Image.Image],
        phrases: Sequence[Sequence[str]],
        records: Sequence[ImageRecord] | None = None,
    ) -> list[Grounding]:
        check_inputs(images, phrases, records)
        asked = [unique_phrases(p) for p in phrases]
        flat = [(i, p) for i, group in enumerate(asked) for p in group]
        located = self.vlm.locate([images[i] for i, _ in flat], [p for _, p in flat], self.options) if flat else []
        per = self.options.num_return_sequences if self.options else 1
        answers = located[::per]  # the first of each phrase's answers
        out = []
        for i, image in enumerate(images):
            mine = [(p, a.box) for (j, p), a in zip(flat, answers, strict=True) if j == i]
            found = [(p, box) for p, box in mine if box is not None]
            out.append(
                Grounding.from_detections(
                    [b for _, b in found], [p for p, _ in found], [1.0] * len(found), image.size, dropped=len(mine) - len(found)
                )
            )
        return out


_LOCS = re.compile(r"((?:\s*<loc_\d+>)+)")
_CONTROL = re.compile(r"</?s>|<pad>|<unk>")


def parse_phrase_grounding(text: str, image_size: ImageSize, codec: Codec) -> tuple[list[Corners], list[str], int]:
    """Florence-2's '<CAPTION_TO_PHRASE_GROUNDING>' answer: 'phrase<loc_x1><loc_y1><loc_x2><loc_y2>...',
    one or more groups of four location tokens after each phrase (one group per object).

    Returns raw corners in pixels (unchecked: `Grounding.from_detections` judges them), the label
    of each, and the number of incomplete groups (a run of location tokens not a multiple of four)."""
    corners, labels, incomplete = [], [], 0
    pieces = _LOCS.split(_CONTROL.sub("", text))
    # split() with a capturing group alternates text, location run, text, location run, ..., text:
    # one more text piece than runs, and the trailing text (after the last run) has no box.
    for label_text, locs in zip(pieces[0::2], pieces[1::2], strict=False):
        label = " ".join(label_text.split()).strip(" .,;:")
        found = list(codec.corners(locs, image_size))
        incomplete += locs.count("<loc_") % 4 != 0
        corners += found
        labels += [label] * len(found)
    return corners, labels, incomplete


class Florence2Grounder:
    """Florence-2's phrase grounding: the phrases, joined as a caption ('a. b. c'), after
    '<CAPTION_TO_PHRASE_GROUNDING>'; every box it writes is a detection with score 1.0, labelled
    with the requested phrase its text names (case and spacing aside) or else its own text.

    `vlm` is a refloop VLM with the Florence-2 profile (e.g. `HFVLM.from_pretrained` of a
    Florence-2 checkpoint); generation goes through its `generate`, so any backend serves."""

    task = "<CAPTION_TO_PHRASE_GROUNDING>"

    def __init__(self, vlm: VLM, max_new_tokens: int = 256) -> None:
        if vlm.profile.name != "florence-2":
            raise ValueError(f"Florence2Grounder needs a Florence-2 model, got profile {vlm.profile.name!r}")
        self.vlm, self.options = vlm, GenerateOptions(max_new_tokens=max_new_tokens)
        self.name = f"florence-2:{vlm.name}"

    def prompt(self, phrases: Sequence[str]) -> str:
        return self.vlm.profile.prompt(self.task + ". ".join(phrases))

    def ground(
        self,
        images: Sequence[Image.Image],
        phrases: Sequence[Sequence[str]],
        records: Sequence[ImageRecord] | None = None,
    ) -> list[Grounding]:
        check_inputs(images, phrases, records)
        asked = [unique_phrases(p) for p in phrases]
        todo = [i for i, p in enumerate(asked) if p]
        out = [Grounding() for _ in images]
        if not todo:
            return out
        answers = self.vlm.generate([images[i] for i in todo], [self.prompt(asked[i]) for i in todo], self.options)
        for i, group in zip(todo, answers, strict=True):
            corners, labels, incomplete = parse_phrase_grounding(group[0].text, images[i].size, self.vlm.profile.codec)
            by_text = {" ".join(p.lower().split()): p for p in asked[i]}
            labels = [by_text.get(label.lower(), label) for label in labels]
            out[i] = Grounding.from_detections(corners, labels, [1.0] * len(corners), images[i].size, dropped=incomplete)
        return out
