"""Model text is hostile input: every codec and every profile reads any string without raising and
returns only proper boxes (finite, ordered, non-empty, inside the image), and the report draws
whatever they return."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from refloop.boxes import Box
from refloop.codecs import CODECS, get_codec
from refloop.models.profiles import PROFILES, get_profile
from refloop.report.draw import PREDICTED_COLOUR, TARGET_COLOUR, panel

FUZZ = settings(max_examples=120, deadline=None, derandomize=True)

sizes = st.tuples(st.integers(1, 5000), st.integers(1, 5000))

# Numbers as models write them, well-formed or not: small, negative, decimals, four-digit tokens,
# and digit runs past Python's 4300-digit int() limit and past a float's range.
numbers = st.one_of(
    st.integers(-50, 1100).map(str),
    st.integers(0, 9999).map(lambda v: f"{v:04d}"),
    st.integers(-(10**30), 10**30).map(str),
    st.floats(-2, 2, allow_nan=False).map(lambda v: f"{v:.3f}"),
    st.tuples(st.sampled_from("0123456789"), st.integers(300, 5000)).map(lambda dn: "1" + dn[0] * dn[1]),
    st.tuples(st.sampled_from("0123456789"), st.integers(300, 5000)).map(lambda dn: "0." + dn[0] * dn[1]),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "-0", "0", "1e3", "", " "]),
)

# Every family's box syntax, so the numbers reach each codec's arithmetic.
TEMPLATES = [
    "<box>({},{}),({},{})</box>",
    "<|box_start|>({},{}),({},{})<|box_end|>",
    '```json\n[{{"bbox_2d": [{}, {}, {}, {}], "label": "x"}}]\n```',
    "<loc_{}><loc_{}><loc_{}><loc_{}>",
    "<loc{}><loc{}><loc{}><loc{}>",
    "<object><patch_index_{}><patch_index_{}></object>",
    "{{<{}><{}><{}><{}>}}",
    "<cell_3> {{ <{}> <{}> <{}> <{}> }}",
    "[{},{},{},{}]",
    "<ref>x</ref><box>[[{}, {}, {}, {}]]</box>",
]

boxed = st.builds(lambda t, ns: t.format(*ns), st.sampled_from(TEMPLATES), st.lists(numbers, min_size=4, max_size=4))
noise = st.text(alphabet=st.sampled_from(list("<>(){}[],.0123456789_-abcdlopxy\"': |\n")), max_size=40)
answers = st.lists(st.one_of(boxed, noise, st.text(max_size=20)), min_size=1, max_size=4).map("".join)


def assert_proper(box: Box, size: tuple[int, int]) -> None:
    w, h = size
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in box.as_list()), box
    assert 0 <= box.x1 < box.x2 <= w and 0 <= box.y1 < box.y2 <= h, (box, size)


@pytest.mark.parametrize("name", CODECS)
@FUZZ
@given(text=answers, size=sizes)
def test_codec_parse_never_raises_and_returns_proper_boxes(name, text, size):
    boxes = get_codec(name).parse(text, size)
    assert isinstance(boxes, list)
    for box in boxes:
        assert_proper(box, size)


@pytest.mark.parametrize("name", PROFILES)
@FUZZ
@given(text=answers, size=sizes)
def test_profile_read_box_never_raises_and_returns_a_proper_box(name, text, size):
    box = get_profile(name).read_box(text, size)
    if box is not None:
        assert_proper(box, size)


@pytest.mark.parametrize("name", CODECS)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(text=answers, size=st.tuples(st.integers(1, 400), st.integers(1, 400)), target=st.lists(st.floats(), min_size=4, max_size=4))
def test_report_draws_any_box_a_codec_returns(name, text, size, target):
    image = Image.new("RGB", size)
    for box in get_codec(name).parse(text, size) or [None]:
        out = panel(image, Box(*target), box, ["caption"])
        assert out.width == 256


DEGENERATE = {
    "inverted": Box(40, 40, 10, 10),
    "inverted-x": Box(40, 10, 10, 40),
    "point": Box(10, 10, 10, 10),
    "zero-width": Box(10, 10, 10, 40),
    "nan": Box(math.nan, 0, 10, 10),
    "infinite": Box(0, 0, math.inf, -math.inf),
    "huge": Box(-1e308, -1e308, 1e308, 1e308),
    "int-past-float": Box(0, 0, 10**400, 10),
    "far-outside": Box(5000, 5000, 6000, 6000),
}


@pytest.mark.parametrize("box", DEGENERATE.values(), ids=DEGENERATE.keys())
def test_report_draws_degenerate_boxes_without_crashing(box):
    image = Image.new("RGB", (64, 48))
    for target, predicted in ((box, None), (Box(1, 1, 20, 20), box), (box, box)):
        assert panel(image, target, predicted, ["a line"]).size[0] == 256


def _drawn_extent(out: Image.Image, colour: tuple[int, int, int]) -> list[int]:
    ys, xs = np.nonzero(np.all(np.asarray(out) == colour, axis=-1))
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def test_report_draws_a_valid_box_where_it_is():
    out = panel(Image.new("RGB", (100, 50)), Box(10, 10, 50, 40), Box(20, 5, 60, 30), [])
    scale = 256 / 100
    assert _drawn_extent(out, TARGET_COLOUR) == pytest.approx([v * scale for v in (10, 10, 50, 40)], abs=1.5)
    assert _drawn_extent(out, PREDICTED_COLOUR) == pytest.approx([v * scale for v in (20, 5, 60, 30)], abs=1.5)
