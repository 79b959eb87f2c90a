"""The describe-then-locate cycle: both consistency rules, K samples per box, parse failures."""

import numpy as np
import pytest
from helpers import ScriptedVLM
from PIL import Image

from refloop.boxes import Box
from refloop.cycle import PINK_CONSISTENCY, SC_TUNE_CONSISTENCY, Consistency, describe_then_locate
from refloop.models.base import GenerateOptions

IMAGES = [Image.new("RGB", (20, 20))] * 3
BOXES = [Box(0, 0, 10, 10), Box(1, 0, 11, 10), Box(2, 0, 12, 10)]
ANSWERS = {
    "box 0": Box(0, 0, 10, 10),  # IoU 1
    "box 1": Box(1, 0, 6, 10),  # IoU exactly 0.5
    # "box 2": does not parse
    "box 1 #1": Box(1, 0, 11, 10),  # the second sample of box 1 is found exactly
    "box 2 #2": Box(2, 0, 9, 10),  # IoU 0.7
}


def test_sctune_rule_needs_iou_above_half_and_pink_rule_accepts_half():
    assert not SC_TUNE_CONSISTENCY(0.5) and SC_TUNE_CONSISTENCY(0.5001)
    assert PINK_CONSISTENCY(0.5) and not PINK_CONSISTENCY(0.4999)
    assert SC_TUNE_CONSISTENCY.rule == "IoU > 0.5" and PINK_CONSISTENCY.rule == "IoU >= 0.5"
    assert Consistency(0.7, inclusive=True)(np.array([0.69, 0.7])).tolist() == [False, True]


@pytest.mark.parametrize("rule, expected", [(SC_TUNE_CONSISTENCY, [True, False, False]), (PINK_CONSISTENCY, [True, True, False])])
def test_greedy_cycle_scores_each_box_by_its_rule(rule, expected):
    vlm = ScriptedVLM(ANSWERS)
    result = describe_then_locate(vlm, vlm, IMAGES, BOXES, consistency=rule)
    assert result.samples == 1 and len(result) == 3
    assert result.expressions == ["box 0", "box 1", "box 2"]
    assert result.iou.tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert result.consistent.tolist() == expected
    assert result.parse_failures == 1


def test_k_samples_per_box_are_box_major_and_best_rows_pick_the_most_consistent():
    vlm = ScriptedVLM(ANSWERS)
    result = describe_then_locate(vlm, vlm, IMAGES, BOXES, GenerateOptions(do_sample=True, num_return_sequences=3))
    assert len(result) == 9 and result.samples == 3
    assert result.expressions[3:6] == ["box 1", "box 1 #1", "box 1 #2"]
    assert result.boxes == [b for b in BOXES for _ in range(3)]
    assert result.per_box().shape == (3, 3)
    assert result.best_rows() == [0, 4, 8]
    assert result.iou[result.best_rows()].tolist() == pytest.approx([1.0, 1.0, 0.7])
    assert result.parse_failures == 9 - 4


def test_describer_and_locator_may_be_different_models():
    describer = ScriptedVLM({})
    locator = ScriptedVLM({"box 0": Box(0, 0, 10, 10)})
    result = describe_then_locate(describer, locator, IMAGES[:1], BOXES[:1])
    assert result.consistent.tolist() == [True]


def test_images_and_boxes_must_pair_up():
    vlm = ScriptedVLM({})
    with pytest.raises(ValueError, match="2 images for 3 boxes"):
        describe_then_locate(vlm, vlm, IMAGES[:2], BOXES)


def test_repeated_greedy_queries_on_the_same_image_are_answered_once():
    """K samples that agree are located once per image; answers and IoU are as if asked each time."""

    class Counting(ScriptedVLM):
        def __init__(self, answers):
            super().__init__(answers)
            self.asked = []

        def generate(self, images, prompts, options=None):  # every sample says the same thing
            k = options.num_return_sequences if options else 1
            from refloop.models.base import Completion

            return [[Completion(p, ()) for _ in range(k)] for p in prompts]

        def locate(self, images, expressions, options=None):
            self.asked += list(zip(map(id, images), expressions))
            return super().locate(images, expressions, options)

    other = Image.new("RGB", (20, 20))  # another image asked the same expression: asked again
    vlm = Counting(ANSWERS)
    result = describe_then_locate(
        vlm, vlm, [IMAGES[0], IMAGES[0], other], BOXES[:1] * 3, GenerateOptions(do_sample=True, num_return_sequences=4)
    )
    assert result.expressions == ["box 0"] * 12
    assert result.iou.tolist() == [1.0] * 12
    assert sorted(vlm.asked) == sorted([(id(IMAGES[0]), "box 0"), (id(other), "box 0")])
