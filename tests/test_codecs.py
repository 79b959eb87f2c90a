import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refloop.boxes import Box
from refloop.codecs import CODECS, get_codec

sizes = st.tuples(st.integers(32, 2000), st.integers(32, 2000))


@st.composite
def box_in(draw, size):
    w, h = size
    x1 = draw(st.floats(0, w * 0.9))
    y1 = draw(st.floats(0, h * 0.9))
    x2 = draw(st.floats(x1 + w * 0.05, w))
    y2 = draw(st.floats(y1 + h * 0.05, h))
    return Box(x1, y1, x2, y2)


@st.composite
def sized_box(draw):
    size = draw(sizes)
    return size, draw(box_in(size))


# One quantisation step of each format, as a fraction of the image side (plus float slack).
STEP = {
    "qwen-vl": 1 / 1000,
    "qwen2-vl": 1 / 1000,
    "qwen3-vl": 1 / 1000,
    "florence-2": 1 / 1000,
    "kosmos-2": 1 / 32,
    "paligemma": 1 / 1024,
    "minigpt-v2": 1 / 100,
    "internvl": 1 / 1000,
    "pink": 1 / 1000,
}


@pytest.mark.parametrize("name", [n for n in CODECS if n != "qwen2.5-vl"])
@settings(max_examples=60, deadline=None)
@given(data=sized_box())
def test_encode_then_parse_is_within_one_step(name, data):
    size, box = data
    codec = get_codec(name)
    parsed = codec.parse(codec.encode(box, size), size)
    assert len(parsed) == 1
    w, h = size
    p = parsed[0]
    for got, want, side in ((p.x1, box.x1, w), (p.y1, box.y1, h), (p.x2, box.x2, w), (p.y2, box.y2, h)):
        assert abs(got - want) <= STEP[name] * side + 1e-6


@settings(max_examples=60, deadline=None)
@given(data=sized_box())
def test_qwen25_round_trip_within_one_resized_pixel(data):
    from refloop.codecs import smart_resize

    size, box = data
    codec = get_codec("qwen2.5-vl")
    parsed = codec.parse(codec.encode(box, size), size)
    assert len(parsed) == 1
    w, h = size
    rh, rw = smart_resize(h, w)
    p = parsed[0]
    assert abs(p.x1 - box.x1) <= 0.5 * w / rw + 1e-6 and abs(p.x2 - box.x2) <= 0.5 * w / rw + 1e-6
    assert abs(p.y1 - box.y1) <= 0.5 * h / rh + 1e-6 and abs(p.y2 - box.y2) <= 0.5 * h / rh + 1e-6


@pytest.mark.parametrize("name", CODECS)
@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("<>(){}[],.0123456789_abcdlopxy\"': |-bbox_2dloc")), max_size=80))
def test_parse_never_raises_on_garbage(name, text):
    boxes = get_codec(name).parse(text, (640, 480))
    assert isinstance(boxes, list)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("text", ["", "no box here", "(1,2),(3", "<loc_12><loc_", "{<1><2><3>}", '{"bbox_2d": [1, 2]}', None])
def test_unparseable_text_gives_no_box(name, text):
    assert get_codec(name).parse(text, (640, 480)) == []


# Strings written from the model cards' documented formats.
CARD_EXAMPLES = [
    ("qwen-vl", Box(64, 48, 320, 240), (640, 480), "<box>(100,100),(500,500)</box>"),
    ("qwen2-vl", Box(64, 48, 320, 240), (640, 480), "<|box_start|>(100,100),(500,500)<|box_end|>"),
    ("qwen3-vl", Box(64, 48, 320, 240), (640, 480), '[{"bbox_2d": [100, 100, 500, 500], "label": "object"}]'),
    ("florence-2", Box(64, 48, 320, 240), (640, 480), "<loc_100><loc_100><loc_500><loc_500>"),
    ("paligemma", Box(64, 48, 320, 240), (640, 480), "<loc0102><loc0102><loc0512><loc0512>"),
    ("minigpt-v2", Box(64, 48, 320, 240), (640, 480), "{<10><10><50><50>}"),
    ("pink", Box(64, 48, 320, 240), (640, 480), "[0.100,0.100,0.500,0.500]"),
    ("internvl", Box(64, 48, 320, 240), (640, 480), "<box>[[100, 100, 500, 500]]</box>"),
    ("kosmos-2", Box(0, 0, 320, 240), (640, 480), "<object><patch_index_0000><patch_index_0495></object>"),
]


@pytest.mark.parametrize("name, box, size, text", CARD_EXAMPLES)
def test_encode_matches_model_card_format(name, box, size, text):
    assert get_codec(name).encode(box, size) == text


def test_qwen25_uses_resized_input_pixels():
    # A 1000x500 image is resized by Qwen2.5-VL's processor to 1008x504 (multiples of 28).
    codec = get_codec("qwen2.5-vl")
    text = '{"bbox_2d": [504, 252, 1008, 504], "label": "cat"}'
    (box,) = codec.parse(text, (1000, 500))
    assert (box.x1, box.y1, box.x2, box.y2) == pytest.approx((500, 250, 1000, 500))


def test_minigpt_parse_accepts_spaces_from_word_level_decoding():
    (box,) = get_codec("minigpt-v2").parse("<cell_3> { <10> <20> <30> <40> }", (100, 100))
    assert box == Box(10, 20, 30, 40)


def test_unknown_codec_lists_supported():
    with pytest.raises(ValueError, match="supported: qwen-vl"):
        get_codec("nope")


# ---- the rule for model-written boxes (Box.from_model_output), through every codec ----------


def _swap_corners(box: Box, axes: str) -> Box:
    x1, x2 = (box.x2, box.x1) if "x" in axes else (box.x1, box.x2)
    y1, y2 = (box.y2, box.y1) if "y" in axes else (box.y1, box.y2)
    return Box(x1, y1, x2, y2)


def _inverted_text(codec, box: Box, size, axes: str) -> str:
    """The answer naming `box` with its corners swapped along `axes`, as each format writes it."""
    if codec.name != "kosmos-2":
        return codec.encode(_swap_corners(box, axes), size)
    ul, lr = (int(v) for v in re.findall(r"<patch_index_(\d{4})>", codec.encode(box, size)))
    (r1, c1), (r2, c2) = divmod(ul, 32), divmod(lr, 32)
    c1, c2 = (c2, c1) if "x" in axes else (c1, c2)
    r1, r2 = (r2, r1) if "y" in axes else (r1, r2)
    return f"<object><patch_index_{r1 * 32 + c1:04d}><patch_index_{r2 * 32 + c2:04d}></object>"


@pytest.mark.parametrize("axes", ["x", "y", "xy"])
@pytest.mark.parametrize("name", CODECS)
@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=sized_box())
def test_inverted_corners_are_unparseable_in_every_format(name, axes, data):
    size, box = data
    codec = get_codec(name)
    assert len(codec.parse(codec.encode(box, size), size)) == 1
    inverted = _inverted_text(codec, box, size, axes)
    parsed = codec.parse(inverted, size)
    # A box narrower than one quantisation step encodes with equal corners, so swapping changes nothing.
    assert parsed == [] or inverted == codec.encode(box, size)


INVERTED_EXAMPLES = [
    ("qwen-vl", "<box>(500,500),(100,100)</box>", Box(64, 48, 320, 240)),
    ("qwen2-vl", "<|box_start|>(100,500),(500,100)<|box_end|>", Box(64, 48, 320, 240)),
    ("qwen3-vl", '[{"bbox_2d": [500, 500, 100, 100], "label": "object"}]', Box(64, 48, 320, 240)),
    ("internvl", "<box>[[500, 100, 100, 500]]</box>", Box(64, 48, 320, 240)),
    ("minigpt-v2", "{<50><50><10><10>}", Box(64, 48, 320, 240)),
    ("pink", "[0.500,0.500,0.100,0.100]", Box(64, 48, 320, 240)),
    ("kosmos-2", "<object><patch_index_0495><patch_index_0000></object>", Box(0, 0, 320, 240)),
    ("florence-2", "<loc_499><loc_499><loc_99><loc_99>", Box(64, 48, 320, 240)),
]


@pytest.mark.parametrize("name, text, box", INVERTED_EXAMPLES)
def test_inverted_corners_are_unparseable(name, text, box):
    assert get_codec(name).parse(text, (640, 480)) == []


HUGE = "9" * 5000  # past Python's 4300-digit int() limit, and past what a float holds
# Each family's own format with one 5000-digit coordinate (Kosmos-2 and PaliGemma take exactly
# four digits, so there the number is not even a token).
HUGE_ANSWERS = {
    "qwen-vl": f"<box>({HUGE},1),(500,500)</box>",
    "qwen2-vl": f"<|box_start|>(1,1),(500,{HUGE})<|box_end|>",
    "qwen2.5-vl": f'[{{"bbox_2d": [1, 1, {HUGE}, 500], "label": "x"}}]',
    "qwen3-vl": f'[{{"bbox_2d": [1, 1, 1{"0" * 4999}.5, 500], "label": "x"}}]',
    "florence-2": f"<loc_{HUGE}><loc_1><loc_500><loc_500>",
    "kosmos-2": f"<object><patch_index_{HUGE}><patch_index_0495></object>",
    "paligemma": f"<loc{HUGE}><loc0001><loc0500><loc0500>",
    "minigpt-v2": f"{{ <1> <1> <50> <{HUGE}> }}",
    "internvl": f"<box>[[1, -{HUGE}, 500, 500]]</box>",
    "pink": f"[0.1,0.1,{HUGE},0.5]",
}


def test_every_codec_has_a_huge_answer():
    assert set(HUGE_ANSWERS) == set(CODECS)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("text", list(HUGE_ANSWERS.values()), ids=list(HUGE_ANSWERS))
def test_a_5000_digit_number_gives_no_box(name, text):
    assert get_codec(name).parse(text, (640, 480)) == []


@pytest.mark.parametrize(
    "name, text",
    [
        ("qwen-vl", "<box>(100,100),(100,500)</box>"),  # zero width
        ("qwen2-vl", "<|box_start|>(1100,100),(1500,500)<|box_end|>"),  # right of the image
        ("qwen3-vl", '[{"bbox_2d": [-500, 100, -100, 500]}]'),  # left of the image
        ("internvl", "<box>[[100, 300, 500, 300]]</box>"),  # zero height
        ("minigpt-v2", "{<10><10><10><50>}"),
        ("minigpt-v2", "{<120><10><150><50>}"),
        ("florence-2", "<loc_100><loc_100><loc_100><loc_500>"),  # one bin wide: both corners at its centre
        ("paligemma", "<loc0102><loc0102><loc0102><loc0512>"),
        ("pink", "[0.300,0.100,0.300,0.500]"),
    ],
)
def test_a_box_with_no_area_in_the_image_is_unparseable(name, text):
    assert get_codec(name).parse(text, (640, 480)) == []


def test_a_box_partly_outside_is_clipped():
    (box,) = get_codec("qwen2-vl").parse("<|box_start|>(-100,500),(1500,1200)<|box_end|>", (640, 480))
    assert box == Box(0.0, 240.0, 640, 480)


def _tiny_parse_before_the_rule(x1: int, y1: int, x2: int, y2: int, size) -> Box:
    """What refloop-tiny's codec returned for a well-formed answer before the box rule existed."""
    w, h = size
    return Box(x1 / 100 * w, y1 / 100 * h, x2 / 100 * w, y2 / 100 * h).clip(w, h)


@pytest.mark.parametrize("size", [(112, 112), (640, 480), (97, 211), (2000, 33)])
def test_well_formed_tiny_answers_parse_exactly_as_before(size):
    """The SC-Tune benchmark's numbers rest on refloop-tiny's '{<x1><y1><x2><y2>}' (bins 0..100):
    every ordered, non-empty answer gives the very same box (floats, bit for bit)."""
    from refloop.models.profiles import get_profile

    codec, profile = get_codec("minigpt-v2"), get_profile("refloop-tiny")
    pairs = [(a, b) for a in range(101) for b in range(a + 1, 101)]
    for (x1, x2), (y1, y2) in zip(pairs, pairs[::-1]):
        expected = _tiny_parse_before_the_rule(x1, y1, x2, y2, size)
        (box,) = codec.parse(f"{{<{x1}><{y1}><{x2}><{y2}>}}", size)
        assert repr(box) == repr(expected)
        assert repr(profile.read_box(f"<cell_3> {{ <{x1}> <{y1}> <{x2}> <{y2}> }}", size)) == repr(expected)
