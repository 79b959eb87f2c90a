"""The describe-then-locate cycle, the one loop every method is built on.

A describer writes an expression for a box (REG); a locator finds that expression again (REC);
the IoU of the found box with the original decides whether the pair is consistent. SC-Tune's
metric (appendix 6) counts IoU > 0.5; its describer reward is the IoU itself (Eq. 2); Pink keeps
a bootstrapped expression when IoU >= lambda = 0.5 (Sec. 3.3). The describer and the locator
may be the same VLM or two adapter views of one base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from refloop.boxes import Box, paired_iou
from refloop.models.base import GREEDY, VLM, Completion, GenerateOptions, Located


@dataclass(frozen=True)
class Consistency:
    """When a cycle counts as consistent: IoU above `threshold`, or at least it if `inclusive`."""

    threshold: float = 0.5
    inclusive: bool = False

    def __call__(self, iou: np.ndarray | float) -> np.ndarray | bool:
        return np.greater_equal(iou, self.threshold) if self.inclusive else np.greater(iou, self.threshold)

    @property
    def rule(self) -> str:
        return f"IoU {'>=' if self.inclusive else '>'} {self.threshold:g}"


# Every IoU rule of the project lives here; the README's "Metrics" section says which metric uses which.
SC_TUNE_CONSISTENCY = Consistency(0.5, inclusive=False)  # Pr@0.5, SC-Tune appendix 6
PINK_CONSISTENCY = Consistency(0.5, inclusive=True)  # lambda = 0.5, Pink Sec. 4.1
REC_ACCURACY = Consistency(0.5, inclusive=True)  # REC acc@0.5 as lmms-eval's RefCOCO utils and Qwen-VL's evaluate_grounding count it


@dataclass(frozen=True)
class CycleResult:
    """One cycle per (box, sample), box-major: sample j of box i sits at row i * samples + j."""

    samples: int
    boxes: list[Box]  # the box of each row
    descriptions: list[Completion]  # the describer's raw output (token ids for log-probs)
    expressions: list[str]  # the expression read from each description
    located: list[Located]  # the locator's answer and the box parsed from it (None: unparseable)
    iou: np.ndarray  # IoU(box, located box), 0 when unparseable
    consistent: np.ndarray  # the Consistency rule applied to `iou`

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def parse_failures(self) -> int:
        return sum(loc.box is None for loc in self.located)

    def per_box(self) -> np.ndarray:
        """IoU as (boxes, samples)."""
        return self.iou.reshape(-1, self.samples)

    def best_rows(self) -> list[int]:
        """The row of each box's most consistent sample (the first on ties)."""
        return [i * self.samples + int(j) for i, j in enumerate(self.per_box().argmax(axis=1))]


def locate_boxes(
    locator: VLM,
    images: Sequence[Image.Image],
    expressions: Sequence[str],
    boxes: Sequence[Box],
    locate_options: GenerateOptions | None = None,
) -> tuple[list[Located], np.ndarray]:
    """The locator's answers for `expressions` and their IoU with `boxes` (0 when unparseable).

    Greedy answers are deterministic, so a query repeated on the same image (the K samples of a
    box often agree) is answered once and its answer shared."""
    greedy = locate_options is None or (not locate_options.do_sample and locate_options.num_return_sequences == 1)
    if not greedy:
        located = locator.locate(images, expressions, locate_options)
        return located, paired_iou([loc.box for loc in located], boxes)
    first: dict[tuple[int, str], int] = {}
    rows = [first.setdefault((id(img), e), len(first)) for img, e in zip(images, expressions, strict=True)]
    queries = list(first)
    by_image = {id(img): img for img in images}
    answers = locator.locate([by_image[i] for i, _ in queries], [e for _, e in queries], locate_options)
    located = [answers[r] for r in rows]
    return located, paired_iou([loc.box for loc in located], boxes)


def describe_then_locate(
    describer: VLM,
    locator: VLM,
    images: Sequence[Image.Image],
    boxes: Sequence[Box],
    describe_options: GenerateOptions = GREEDY,
    locate_options: GenerateOptions | None = None,
    consistency: Consistency = SC_TUNE_CONSISTENCY,
) -> CycleResult:
    """Describe each box (`describe_options.num_return_sequences` samples; greedy by default),
    locate every description with the locator, score each by IoU with its box."""
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images for {len(boxes)} boxes")
    profile = describer.profile
    k = describe_options.num_return_sequences
    prompts = [profile.reg_prompt(b, img.size) for img, b in zip(images, boxes, strict=True)]
    descriptions = [c for group in describer.generate(images, prompts, describe_options) for c in group]
    expressions = [profile.read_expression(c.text) for c in descriptions]
    row_images = [img for img in images for _ in range(k)]
    row_boxes = [b for b in boxes for _ in range(k)]
    located, iou = locate_boxes(locator, row_images, expressions, row_boxes, locate_options)
    return CycleResult(k, row_boxes, descriptions, expressions, located, iou, consistency(iou))
