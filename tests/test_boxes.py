import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refloop.boxes import Box, InvalidBoxError, iou_matrix, nms, paired_iou, validate_box

coord = st.floats(min_value=0, max_value=200, allow_nan=False)


@st.composite
def boxes(draw):
    x1, x2 = sorted((draw(coord), draw(coord)))
    y1, y2 = sorted((draw(coord), draw(coord)))
    return Box(x1, y1, x2, y2)


def brute_force_iou(a: Box, b: Box, step: float = 1.0) -> float:
    """Count unit cells of a raster: an independent reference for integer boxes."""
    inter = union = 0
    for x in np.arange(0, 50, step):
        for y in np.arange(0, 50, step):
            ina = a.x1 <= x < a.x2 and a.y1 <= y < a.y2
            inb = b.x1 <= x < b.x2 and b.y1 <= y < b.y2
            inter += ina and inb
            union += ina or inb
    return inter / union if union else 0.0


int_coord = st.integers(min_value=0, max_value=50)


@st.composite
def int_boxes(draw):
    x1, x2 = sorted((draw(int_coord), draw(int_coord)))
    y1, y2 = sorted((draw(int_coord), draw(int_coord)))
    return Box(x1, y1, x2, y2)


@given(int_boxes(), int_boxes())
def test_iou_matches_brute_force_raster(a, b):
    assert iou_matrix([a], [b])[0, 0] == pytest.approx(brute_force_iou(a, b), abs=1e-9)


def test_iou_hand_computed():
    a, b = Box(0, 0, 10, 10), Box(5, 0, 15, 10)
    assert a.iou(b) == pytest.approx(50 / 150)
    assert a.iou(a) == 1.0
    assert a.iou(Box(20, 20, 30, 30)) == 0.0


@given(st.lists(boxes(), min_size=1, max_size=6), st.lists(boxes(), min_size=1, max_size=6))
def test_pairwise_iou_is_symmetric_and_bounded(a, b):
    m = iou_matrix(a, b)
    assert m.shape == (len(a), len(b))
    assert np.all((m >= 0) & (m <= 1 + 1e-12))
    np.testing.assert_allclose(m, iou_matrix(b, a).T)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            assert m[i, j] == pytest.approx(x.iou(y))


def test_paired_iou_gives_zero_for_missing_box():
    out = paired_iou([Box(0, 0, 10, 10), None], [Box(0, 0, 10, 10), Box(0, 0, 1, 1)])
    assert out.tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    "box, why",
    [
        (Box(10, 0, 5, 10), "x2 <= x1"),
        (Box(0, 0, 0, 10), "x2 <= x1"),
        (Box(0, 0, math.nan, 10), "non-finite"),
        (Box(0, 0, math.inf, 10), "non-finite"),
    ],
)
def test_validate_rejects_degenerate_boxes(box, why):
    with pytest.raises(InvalidBoxError, match=why):
        validate_box(box, (100, 100))


def test_validate_outside_policy_clips_or_rejects():
    box = Box(-5, 10, 120, 50)
    assert validate_box(box, (100, 100), outside="clip") == Box(0, 10, 100, 50)
    with pytest.raises(InvalidBoxError, match="outside"):
        validate_box(box, (100, 100), outside="reject")
    with pytest.raises(InvalidBoxError, match="no area"):
        validate_box(Box(120, 10, 130, 20), (100, 100), outside="clip")


def test_nms_keeps_highest_of_overlapping_boxes():
    boxes_ = [Box(0, 0, 10, 10), Box(1, 1, 11, 11), Box(50, 50, 60, 60)]
    assert nms(boxes_, [0.9, 0.95, 0.5], iou_threshold=0.5) == [1, 2]
    assert nms(boxes_, [0.9, 0.95, 0.5], iou_threshold=0.9) == [1, 0, 2]


# ---- the rule for model-written boxes ---------------------------------------------------------


def test_model_box_well_formed_is_the_clipped_box():
    assert Box.from_model_output(10.5, 20.0, 30.0, 40.25, (100, 50)) == Box(10.5, 20.0, 30.0, 40.25)
    assert Box.from_model_output(-5.0, 20.0, 130.0, 40.0, (100, 50)) == Box(0.0, 20.0, 100, 40.0)


@pytest.mark.parametrize(
    "corners",
    [(30.0, 40.0, 10.0, 20.0), (30.0, 20.0, 10.0, 40.0), (10.0, 40.0, 30.0, 20.0)],
    ids=["both", "x", "y"],
)
def test_model_box_inverted_corners_are_unparseable(corners):
    assert Box.from_model_output(*corners, (100, 50)) is None


@pytest.mark.parametrize(
    "corners",
    [
        (math.nan, 0, 10, 10),
        (0, 0, math.inf, 10),
        (0, -math.inf, 10, 10),
        (0, 0, 10, 10**5000),  # a whole number no float holds
        (10, 0, 10, 10),  # zero width
        (0, 5, 10, 5),  # zero height
        (120, 10, 150, 20),  # right of the image: nothing left after clipping
        (-30, -20, -10, -1),
        (None, 0, 20, 20),  # not a number at all
    ],
)
def test_model_box_unparseable_or_empty_gives_none(corners):
    assert Box.from_model_output(*corners, (100, 50)) is None


any_float = st.floats(allow_nan=True, allow_infinity=True)


@settings(derandomize=True)
@given(any_float, any_float, any_float, any_float, st.integers(1, 5000), st.integers(1, 5000))
def test_model_box_is_none_or_a_proper_box_inside_the_image(x1, y1, x2, y2, w, h):
    box = Box.from_model_output(x1, y1, x2, y2, (w, h))
    if box is not None:
        assert all(math.isfinite(v) for v in box.as_list())
        assert 0 <= box.x1 < box.x2 <= w and 0 <= box.y1 < box.y2 <= h
        validate_box(box, (w, h))  # what the data loaders accept, too
