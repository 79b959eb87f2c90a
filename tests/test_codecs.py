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
