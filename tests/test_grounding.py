"""Grounders (SVP's g(z_p, c)): tiny random GroundingDINO and OWLv2 end to end offline, Florence-2
and REC grounders, the scene oracle's error rates, phrase extraction, output hygiene, and the
grounding context text."""

from __future__ import annotations

import math
import string
import warnings
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import families
import pytest
import torch
from PIL import Image, ImageDraw

from refloop.boxes import Box
from refloop.codecs import CODECS, get_codec
from refloop.errors import RefloopError
from refloop.grounding import (
    Florence2Grounder,
    Grounding,
    HFGroundingDINO,
    HFOwlV2,
    SceneOracle,
    VLMGrounder,
    category_phrases,
    grounding_context,
    parse_grounding_context,
    parse_phrase_grounding,
    phrases_from_caption,
    scene_objects,
    scene_record,
    shapes_vocabulary,
    singular,
)
from refloop.models.base import Located
from refloop.models.hf import HFVLM
from refloop.models.profiles import get_profile
from refloop.world import COLOURS, SHAPES, caption, get_style, render, sample_scene

WORDS = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "object", "a", "the", "large", "small"]


def _corners(pred_boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = pred_boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


@contextmanager
def _raw_output(model):
    """The model's raw output of the forward inside the block, to check what the wrapper made of it."""
    seen: dict = {}
    handle = model.register_forward_hook(lambda module, args, output: seen.update(output=output))
    try:
        yield seen
    finally:
        handle.remove()


def _picture(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (230, 230, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.1, height * 0.2, width * 0.4, height * 0.7), fill=(215, 38, 38))
    draw.rectangle((width * 0.6, height * 0.3, width * 0.9, height * 0.8), fill=(40, 78, 215))
    return image


def _assert_matches_raw(grounding: Grounding, raw_xyxy: torch.Tensor, scale: tuple[float, float], size: tuple[int, int]) -> None:
    """Every detection is one of the model's boxes, scaled by `scale` and clipped to `size`."""
    w, h = size
    sx, sy = scale
    expected = [Box(x1 * sx, y1 * sy, x2 * sx, y2 * sy).clip(w, h) for x1, y1, x2, y2 in raw_xyxy.tolist()]
    for box in grounding.boxes:
        assert 0 <= box.x1 < box.x2 <= w and 0 <= box.y1 < box.y2 <= h
        assert any(max(abs(a - b) for a, b in zip(box.as_list(), e.as_list())) < 1e-3 for e in expected), box


# --- GroundingDINO ---------------------------------------------------------------------------
def tiny_grounding_dino(tmp_path, variant: str = "grounding-dino"):
    """A random GroundingDINO (or MM-GroundingDINO) saved as a checkpoint directory: Swin backbone,
    1-layer BERT whose WordPiece vocabulary puts [CLS], [SEP], '.', '?' at 101, 102, 1012, 1029,
    the ids the model hard-codes."""
    import transformers
    from transformers import BertTokenizer, GroundingDinoProcessor, SwinConfig
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

    prefix = {"grounding-dino": "GroundingDino", "mm-grounding-dino": "MMGroundingDino"}[variant]
    config_cls, model_cls = getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForObjectDetection")

    tokens = ["[PAD]", "[UNK]", "[MASK]"] + [f"[unused{i}]" for i in range(3, 1040)]
    tokens[101], tokens[102], tokens[1012], tokens[1029] = "[CLS]", "[SEP]", ".", "?"
    for i, word in enumerate(WORDS):
        tokens[200 + i] = word
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})
    config = config_cls(
        backbone_config=SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], out_indices=[2, 3, 4]),
        text_config={
            "model_type": "bert",
            "vocab_size": len(tokens),
            "hidden_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 8,
            "max_position_embeddings": 32,
        },
        d_model=32,  # GroupNorm(32, d_model)
        encoder_layers=1,
        decoder_layers=2,  # the box heads of layers > 0 are tied to layer 0's
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=12,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    processor = GroundingDinoProcessor(GroundingDinoImageProcessorPil(size={"shortest_edge": 48, "longest_edge": 96}), tokenizer)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture(scope="module", params=["grounding-dino", "mm-grounding-dino"])
def grounding_dino(tmp_path_factory, request):
    path = tiny_grounding_dino(tmp_path_factory.mktemp(request.param), request.param)
    return HFGroundingDINO.from_pretrained(path, device="cpu", threshold=0.0, text_threshold=0.0, nms_iou=None)


def test_grounding_dino_boxes_are_pixels_of_the_original_image(grounding_dino):
    image = _picture(90, 60)
    phrases = ["red circle", "blue square"]
    with _raw_output(grounding_dino.model) as raw:
        [found] = grounding_dino.ground([image], [phrases])
    assert isinstance(found, Grounding) and len(found) + found.dropped == 12  # every query above threshold 0
    assert len(found) > 0
    assert set(found.labels) <= set(phrases)
    assert all(0.0 < s <= 1.0 for s in found.scores) and list(found.scores) == sorted(found.scores, reverse=True)
    _assert_matches_raw(found, _corners(raw["output"].pred_boxes[0]), (90, 60), (90, 60))


def test_grounding_dino_prompt_is_lowercased_period_separated_phrases():
    assert HFGroundingDINO.prompt(["Red Circle", "a cat. or dog?", "  blue   square "]) == "red circle. a cat or dog. blue square."


def test_grounding_dino_batches_images_of_different_sizes_and_skips_empty_phrase_lists(grounding_dino):
    images = [_picture(90, 60), _picture(50, 80), _picture(70, 70)]
    found = grounding_dino.ground(images, [["red circle"], ["?", " "], ["blue square", ".", "green triangle", "object"]])
    assert len(found[1]) == 0 and found[1].dropped == 0
    for image, grounding, asked in zip(images, found, [["red circle"], [], ["blue square", "green triangle", "object"]]):
        assert set(grounding.labels) <= set(asked)
        assert all(b.x2 <= image.width and b.y2 <= image.height for b in grounding.boxes)


def test_grounding_dino_thresholds_and_nms_reduce_detections(grounding_dino):
    image = _picture(90, 60)
    everything = grounding_dino.ground([image], [["red circle", "blue square"]])[0]
    strict = HFGroundingDINO(grounding_dino.model, grounding_dino.processor, threshold=0.999, nms_iou=0.3)
    fewer = strict.ground([image], [["red circle", "blue square"]])[0]
    assert len(fewer) < len(everything)
    assert all(s > 0.999 for s in fewer.scores)


# --- OWLv2 -----------------------------------------------------------------------------------
def tiny_owlv2(tmp_path):
    """A random OWLv2 (64 px input, 16 px patches: 16 boxes) with a character-level CLIP tokenizer."""
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

    # OWLv2 masks a text query whose first token id is 0: a regular character takes id 0, as in CLIP.
    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}
    for c in string.ascii_lowercase + string.digits + ".,-'":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    config = Owlv2Config(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 16,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(config).eval()
    processor = Owlv2Processor(Owlv2ImageProcessorPil(size={"height": 64, "width": 64}), tokenizer)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def owlv2(tmp_path_factory):
    path = tiny_owlv2(tmp_path_factory.mktemp("owlv2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no scipy here: resized with PIL (tested below)
        return HFOwlV2.from_pretrained(path, device="cpu", threshold=0.0, nms_iou=None)


def test_owlv2_without_scipy_resizes_with_pil_and_says_so(owlv2, monkeypatch):
    """Both branches, whether or not scipy is installed here: its absence is simulated."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else find_spec(name, *a))
    with pytest.warns(UserWarning, match="scipy"):
        assert HFOwlV2(owlv2.model, owlv2.processor)._resize_here
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "scipy" else find_spec(name, *a))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert not HFOwlV2(owlv2.model, owlv2.processor)._resize_here


def test_owlv2_maps_boxes_of_the_padded_square_back_to_a_non_square_image(owlv2):
    image = _picture(96, 48)  # padded below to 96x96: relative boxes scale by the longer side
    phrases = ["red circle", "blue square"]
    with _raw_output(owlv2.model) as raw:
        [found] = owlv2.ground([image], [phrases])
    assert len(found) + found.dropped == 16  # one box per patch, all above threshold 0
    assert len(found) > 0 and set(found.labels) <= set(phrases)
    _assert_matches_raw(found, _corners(raw["output"].pred_boxes[0]), (96, 96), (96, 48))


def test_owlv2_boxes_scale_with_the_original_image(owlv2):
    """The same picture at twice the size gives the same input pixels, so boxes exactly twice as large."""
    small, large = Image.new("RGB", (60, 40), (215, 38, 38)), Image.new("RGB", (120, 80), (215, 38, 38))
    a, b = owlv2.ground([small, large], [["red circle"], ["red circle"]])
    assert len(a) == len(b) > 0
    for box_a, box_b in zip(a.boxes, b.boxes):
        assert max(abs(2 * u - v) for u, v in zip(box_a.as_list(), box_b.as_list())) < 1e-3


def test_owlv2_padding_queries_of_a_batch_never_label_a_box(owlv2):
    """Images with fewer phrases than the batch's longest list get blank queries (transformers'
    own post-processing indexes past the image's labels when one wins)."""
    images = [_picture(64, 64), _picture(80, 40)]
    many, one = owlv2.ground(images, [["red circle", "blue square", "green triangle"], ["yellow square"]])
    assert set(one.labels) == {"yellow square"} and len(one) > 0
    assert set(many.labels) <= {"red circle", "blue square", "green triangle"}


def test_nan_and_inverted_detector_boxes_are_dropped_and_counted(owlv2):
    def corrupt(module, args, output):
        output.pred_boxes[:, :4] = float("nan")
        output.pred_boxes[:, 4:6, 2] = -0.5  # negative width: inverted corners
        return output

    handle = owlv2.model.register_forward_hook(corrupt)
    try:
        [found] = owlv2.ground([_picture(64, 64)], [["red circle"]])
    finally:
        handle.remove()
    assert found.dropped >= 6 and len(found) + found.dropped == 16
    assert all(math.isfinite(v) for b in found.boxes for v in b.as_list())


# --- Output hygiene --------------------------------------------------------------------------
def test_malformed_detections_are_dropped_and_counted():
    size = (100, 50)
    found = Grounding.from_detections(
        [
            [10, 10, 40, 40],  # fine
            [float("nan"), 0, 10, 10],  # non-finite
            [50, 20, 30, 40],  # inverted
            [120, 60, 150, 80],  # entirely outside the image
            [0, 0, 10, 10],  # no label
            [5, 5, 20, 20],  # NaN score
            Box(60, 10, 130, 45),  # partly outside: clipped
            "junk",  # not four numbers
        ],
        ["red circle", "x", "x", "x", "", "x", "blue square", "x"],
        [0.5, 0.9, 0.9, 0.9, 0.9, float("nan"), 0.7, 0.9],
        size,
    )
    assert found.labels == ("blue square", "red circle")  # best first
    assert found.boxes == (Box(60, 10, 100, 45), Box(10, 10, 40, 40))
    assert found.dropped == 6


def test_detections_whose_labels_or_scores_do_not_pair_up_are_all_dropped():
    found = Grounding.from_detections([[0, 0, 5, 5], [1, 1, 6, 6]], ["a"], [0.5, 0.4], (10, 10))
    assert len(found) == 0 and found.dropped == 2
    assert Grounding.from_detections([], [], [], (10, 10)) == Grounding()


def test_suppression_keeps_the_best_box_per_label_and_caps_the_count():
    g = Grounding.from_detections(
        [[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], ["cat", "cat", "dog", "cat"], [0.9, 0.8, 0.7, 0.6], (100, 100)
    )
    assert g.suppress(0.5).labels == ("cat", "dog", "cat")
    assert g.suppress(0.5, max_detections=2).scores == (0.9, 0.7)


# --- Florence-2 and REC as grounders ---------------------------------------------------------
def test_florence2_phrase_grounding_text_is_parsed_into_detections():
    codec = get_codec("florence-2")
    text = (
        "</s><s>red circle<loc_100><loc_200><loc_300><loc_400>blue squares<loc_500><loc_100><loc_700><loc_900>"
        "<loc_800><loc_100><loc_900><loc_300>the sun<loc_900><loc_900><loc_100><loc_950>tail<loc_1><loc_2></s>"
    )
    corners, labels, incomplete = parse_phrase_grounding(text, (200, 100), codec)
    assert labels == ["red circle", "blue squares", "blue squares", "the sun"]
    assert incomplete == 1
    found = Grounding.from_detections(corners, labels, [1.0] * len(labels), (200, 100), dropped=incomplete)
    assert len(found) == 3 and found.dropped == 2  # the inverted 'sun' box and the 2-token tail
    assert found.boxes[0].as_list() == pytest.approx([20.1, 20.05, 60.1, 40.05])


def test_florence2_grounder_runs_a_tiny_model_end_to_end():
    model, processor = families.florence_2()
    vlm = HFVLM(model, processor, get_profile("florence-2"), name="tiny-florence")
    grounder = Florence2Grounder(vlm, max_new_tokens=12)
    assert grounder.prompt(["red circle", "blue square"]) == "<CAPTION_TO_PHRASE_GROUNDING>red circle. blue square"
    images = [_picture(80, 40), _picture(64, 64)]
    found = grounder.ground(images, [["red circle"], []])
    assert len(found) == 2 and all(isinstance(g, Grounding) for g in found) and len(found[1]) == 0
    assert all(b.x2 <= 80 and b.y2 <= 40 for b in found[0].boxes)
    with pytest.raises(ValueError, match="Florence-2"):
        Florence2Grounder(SimpleNamespace(name="kosmos", profile=get_profile("kosmos-2")))


class _LocatingVLM:
    """REC double: a scripted box (None = unparseable answer) per expression."""

    name = "scripted"

    def __init__(self, answers: dict[str, Box | None]) -> None:
        self.answers, self.asked = answers, []

    def locate(self, images, expressions, options=None):
        self.asked.append(list(expressions))
        return [Located(self.answers.get(e), "text") for e in expressions]


def test_vlm_rec_grounder_gives_one_box_per_phrase_and_counts_unparseable_answers():
    vlm = _LocatingVLM({"red circle": Box(1, 2, 30, 40), "blue square": None, "green triangle": Box(50, 5, 90, 45)})
    images = [Image.new("RGB", (100, 50)), Image.new("RGB", (100, 50))]
    a, b = VLMGrounder(vlm).ground(images, [["red circle", "blue square", "red circle"], ["green triangle"]])
    assert vlm.asked == [["red circle", "blue square", "green triangle"]]  # one batched call, repeats asked once
    assert a.labels == ("red circle",) and a.boxes == (Box(1, 2, 30, 40),) and a.dropped == 1
    assert b.labels == ("green triangle",) and b.scores == (1.0,) and b.dropped == 0
    assert VLMGrounder(vlm).ground(images[:1], [[]]) == [Grounding()]


# --- Scene oracle ----------------------------------------------------------------------------
def _scenes(n: int, domain: str = "wild", seed: int = 3):
    return [sample_scene(get_style(domain), seed, i) for i in range(n)]


def test_perfect_oracle_returns_exactly_the_named_objects_of_an_exported_split(tmp_path):
    from refloop.data.loaders import load_coco
    from refloop.world.export import COCO_FILE, export_split

    split = export_split("in-domain", tmp_path / "split", 3, seed=3)
    records, _ = load_coco(split / COCO_FILE, split)
    for scene, record in zip(_scenes(3, "in-domain"), records, strict=True):
        # the export carries each object's colour and size: nothing is re-derived from the file name
        assert [o.attributes for o in record.objects] == [{"colour": o.colour, "size": o.size} for o in scene.objects]
        assert scene_objects(record) == scene_objects(scene_record(scene))
        image = render(scene)
        obj = scene.objects[-1]
        phrase = f"{obj.colour} {obj.shape}"
        expected = sorted(o.box.as_list() for o in scene.objects if (o.colour, o.shape) == (obj.colour, obj.shape))
        [found] = SceneOracle().ground([image], [[phrase, "purple hexagon"]], [record])
        assert sorted(b.as_list() for b in found.boxes) == expected
        assert set(found.labels) == {phrase} and found.dropped == 0


def test_oracle_knows_only_the_objects_its_record_carries_and_refuses_a_record_that_says_nothing():
    scene = _scenes(1, "in-domain")[0]
    full = scene_record(scene)
    partial = replace(full, objects=full.objects[:1])
    assert scene_objects(partial) == scene_objects(full)[:1]
    bare = replace(full, objects=tuple(replace(o, attributes={}, expressions=()) for o in full.objects))
    with pytest.raises(RefloopError, match="no colour/size attributes and no referring expressions"):
        scene_objects(bare)


def test_oracle_reads_shape_and_colour_from_annotations_of_other_records():
    scene = _scenes(1, "in-domain")[0]
    record = scene_record(scene)
    renamed = replace(record, file_name="elsewhere/photo.png")
    objects = scene_objects(renamed)
    assert [(o.shape, o.box) for o in objects] == [(o.shape, o.box) for o in scene.objects]
    assert all(o.colour == s.colour for o, s in zip(objects, scene.objects))


def test_oracle_miss_and_false_positive_rates_match_their_settings():
    scenes = _scenes(300)
    records = [scene_record(s) for s in scenes]
    image = Image.new("RGB", (scenes[0].width, scenes[0].height))
    phrases = [sorted({f"{o.colour} {o.shape}" for o in s.objects} | {"blue triangle"}) for s in scenes]
    oracle = SceneOracle(miss_rate=0.2, false_positive_rate=0.1, jitter=0.1, seed=7)
    found = oracle.ground([image] * len(scenes), phrases, records)
    named = sum(sum(1 for o in s.objects if f"{o.colour} {o.shape}" in p) for s, p in zip(scenes, phrases))
    true_found = false_found = 0
    for scene, grounding in zip(scenes, found):
        for box, label in zip(grounding.boxes, grounding.labels):
            hit = any(
                f"{o.colour} {o.shape}" == label and box.iou(o.box) > 0.5 and abs(box.x1 - o.box.x1) <= 0.1 * o.box.width + 1e-9
                for o in scene.objects
            )
            true_found += hit
            false_found += not hit
    asked = sum(len(p) for p in phrases)
    miss = 1 - true_found / named
    fp = false_found / asked
    assert abs(miss - 0.2) < 3 * math.sqrt(0.2 * 0.8 / named), miss
    assert abs(fp - 0.1) < 3 * math.sqrt(0.1 * 0.9 / asked), fp


def test_oracle_false_positives_carry_wrong_labels_and_stay_inside_the_image():
    scenes = _scenes(40)
    records = [scene_record(s) for s in scenes]
    image = Image.new("RGB", (scenes[0].width, scenes[0].height))
    phrases = [[f"{o.colour} {o.shape}" for o in s.objects] for s in scenes]
    found = SceneOracle(false_positive_rate=1.0, seed=1).ground([image] * 40, phrases, records)
    for scene, grounding, asked in zip(scenes, found, phrases):
        present = {f"{o.colour} {o.shape}" for o in scene.objects}
        extra = [lab for lab in grounding.labels if lab not in present]
        assert len(extra) == len(set(asked))  # one false positive per phrase, each a pair not in the scene
        assert all(0 <= b.x1 < b.x2 <= scene.width and 0 <= b.y1 < b.y2 <= scene.height for b in grounding.boxes)


def test_oracle_is_deterministic_by_seed_and_image_and_independent_of_other_phrases():
    scenes = _scenes(20)
    records = [scene_record(s) for s in scenes]
    images = [Image.new("RGB", (s.width, s.height)) for s in scenes]
    phrases = [[f"{o.colour} {o.shape}" for o in s.objects] + ["red circle"] for s in scenes]
    make = SceneOracle(miss_rate=0.3, false_positive_rate=0.3, jitter=0.2, seed=5)
    first, again = make.ground(images, phrases, records), make.ground(images, phrases, records)
    assert first == again
    other = SceneOracle(miss_rate=0.3, false_positive_rate=0.3, jitter=0.2, seed=6).ground(images, phrases, records)
    assert other != first
    alone = make.ground(images[:1], [["red circle"]], records[:1])[0]
    together = first[0]
    assert set(zip(alone.boxes, alone.labels)) <= set(zip(together.boxes, together.labels))


def test_oracle_jitter_moves_each_corner_by_at_most_its_fraction_of_the_box():
    scene = _scenes(1)[0]
    record = scene_record(scene)
    phrases = [[f"{o.colour} {o.shape}" for o in scene.objects]]
    [found] = SceneOracle(jitter=0.25, seed=2).ground([Image.new("RGB", (scene.width, scene.height))], phrases, [record])
    moved = False
    for box in found.boxes:
        truth = max(scene.objects, key=lambda o: o.box.iou(box)).box
        dx, dy = 0.25 * truth.width + 1e-9, 0.25 * truth.height + 1e-9
        assert abs(box.x1 - truth.x1) <= dx and abs(box.x2 - truth.x2) <= dx
        assert abs(box.y1 - truth.y1) <= dy and abs(box.y2 - truth.y2) <= dy
        moved |= box != truth
    assert moved


def test_oracle_refuses_bad_settings_and_missing_records():
    with pytest.raises(ValueError, match="miss_rate"):
        SceneOracle(miss_rate=1.5)
    with pytest.raises(ValueError, match="jitter"):
        SceneOracle(jitter=0.5)
    with pytest.raises(ValueError, match="records"):
        SceneOracle().ground([Image.new("RGB", (8, 8))], [["red circle"]])


# --- Phrases ---------------------------------------------------------------------------------
def test_shapes_caption_phrases_are_singular_colour_shape_pairs():
    scene = _scenes(1, "crowded")[0]
    expected = sorted({f"{o.colour} {o.shape}" for o in scene.objects})
    assert sorted(phrases_from_caption(caption(scene), shapes_vocabulary())) == expected
    text = "two red circles , a large blue square and three circles"
    assert phrases_from_caption(text, shapes_vocabulary()) == ["red circle", "blue square", "circle"]
    vocabulary = shapes_vocabulary()
    assert set(vocabulary.nouns.values()) == set(SHAPES) and vocabulary.modifiers == frozenset(COLOURS)


def test_free_text_phrases_are_determiner_led_noun_chunks():
    text = "In the image, a man holding two red umbrellas stands next to a tall building and several benches."
    assert phrases_from_caption(text) == ["man", "red umbrella", "tall building", "bench"]


def test_singular_handles_regular_and_irregular_plurals():
    words = ["circles", "boxes", "benches", "berries", "people", "buses", "glass", "horses", "knives", "cookies"]
    assert [singular(w) for w in words] == ["circle", "box", "bench", "berry", "person", "bus", "glass", "horse", "knife", "cookie"]


def test_category_phrases_all_or_those_a_caption_mentions():
    categories = ["person", "traffic light", "dog", "cup"]
    assert category_phrases(categories) == categories
    assert category_phrases(categories, "Two people wait at the traffic lights with their dogs.") == ["person", "traffic light", "dog"]
    assert category_phrases(categories, "A mug on a table", synonyms={"cup": ["mug"]}) == ["cup"]


# --- Context text ----------------------------------------------------------------------------
GROUNDING = Grounding(
    boxes=(Box(10.3, 20.7, 60.2, 70.9), Box(70.0, 5.0, 111.0, 40.0)),
    labels=("red circle", "blue square"),
    scores=(0.9, 0.8),
)


def test_context_lists_labels_with_normalised_xyxy_boxes():
    text = grounding_context(GROUNDING, (112, 84))
    assert text == "red circle [0.09, 0.25, 0.54, 0.84]\nblue square [0.62, 0.06, 0.99, 0.48]"
    assert grounding_context(Grounding(), (112, 84)) == ""


@pytest.mark.parametrize("codec_name", [None, *CODECS])
def test_context_text_round_trips_through_the_codec(codec_name):
    size = (112, 84)
    codec = get_codec(codec_name) if codec_name else None
    text = grounding_context(GROUNDING, size, codec)
    back = parse_grounding_context(text, size, codec)
    step = codec.step if codec else 0.005
    assert back.labels == GROUNDING.labels and back.dropped == 0
    for got, want in zip(back.boxes, GROUNDING.boxes):
        for g, w, side in zip(got.as_list(), want.as_list(), (112, 84, 112, 84)):
            assert abs(g - w) <= step * side + 1e-6, (codec_name, text)


def test_context_labels_lose_box_characters_and_unreadable_lines_are_counted():
    g = Grounding((Box(0, 0, 50, 50),), ("cup (left) <b>",), (1.0,))
    text = grounding_context(g, (100, 100))
    assert text == "cup left b [0.00, 0.00, 0.50, 0.50]"
    back = parse_grounding_context(text + "\nnonsense line\nbroken [0.5, 0.5, 0.1, 0.1]\n", (100, 100))
    assert back.labels == ("cup left b",) and back.dropped == 2


def test_a_detector_wrapper_refuses_another_model_family(tmp_path):
    from refloop.errors import RefloopError

    path = tiny_owlv2(tmp_path / "owl")
    with pytest.raises(RefloopError, match="owlv2"):
        HFGroundingDINO.from_pretrained(path, device="cpu")
    with pytest.raises(RefloopError, match="does not exist"):
        HFOwlV2.from_pretrained(tmp_path / "nothing-here", device="cpu")
