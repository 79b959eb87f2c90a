"""Prompt profiles against strings written from the model cards, and the transformers 5.x
pitfalls of the real families (each test shows the pitfall is real, then that refloop avoids it)."""

from __future__ import annotations

import re
from pathlib import Path

import families
import pytest
import torch
from PIL import Image

from refloop.boxes import Box
from refloop.errors import RefloopError
from refloop.models.hf import HFVLM, validate_config
from refloop.models.processors import save_processor
from refloop.models.profiles import PROFILES, get_profile, profile_for_config
from refloop.training.adapters import LoraSettings, NamedAdapters

BOX, SIZE = Box(64, 48, 320, 240), (640, 480)  # 0.1..0.5 of each side
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

# (profile, method, args, expected string)
CARD_STRINGS = [
    (
        "qwen2-vl",
        "rec_prompt",
        ("the cat",),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + QWEN_IMAGE
        + "Find <|object_ref_start|>the cat<|object_ref_end|> in the image and give its bounding box.<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    (
        "qwen2-vl",
        "rec_answer",
        (BOX, SIZE, "the cat"),
        "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,100),(500,500)<|box_end|>",
    ),
    (
        "qwen2-vl",
        "reg_instruction",
        (BOX, SIZE),
        "Give a short phrase that identifies the object in <|box_start|>(100,100),(500,500)<|box_end|>.",
    ),
    (
        "qwen3-vl",
        "rec_prompt",
        ("the cat",),
        "<|im_start|>user\n" + QWEN_IMAGE + "Locate the cat in the image and output its bbox coordinates in JSON format.<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    ("qwen3-vl", "rec_answer", (BOX, SIZE, "the cat"), '```json\n[\n\t{"bbox_2d": [100, 100, 500, 500], "label": "the cat"}\n]\n```'),
    ("qwen3-vl", "reg_instruction", (BOX, SIZE), "Give a short phrase that identifies the object at bbox_2d [100, 100, 500, 500]."),
    # Qwen2.5-VL: a 1000x500 image enters the model as 1008x504 (multiples of 28): pixels of that.
    (
        "qwen2.5-vl",
        "rec_answer",
        (Box(500, 250, 1000, 500), (1000, 500), "the cat"),
        '```json\n[\n\t{"bbox_2d": [504, 252, 1008, 504], "label": "the cat"}\n]\n```',
    ),
    ("florence-2", "reg_prompt", (BOX, SIZE), "<REGION_TO_DESCRIPTION><loc_100><loc_100><loc_500><loc_500>"),
    ("florence-2", "rec_prompt", ("the cat",), "<CAPTION_TO_PHRASE_GROUNDING>the cat"),
    ("florence-2", "rec_answer", (BOX, SIZE, "the cat"), "the cat<loc_100><loc_100><loc_500><loc_500>"),
    ("florence-2", "caption_prompt", (), "<CAPTION>"),
    ("kosmos-2", "rec_prompt", ("a snowman",), "<grounding><phrase> a snowman</phrase>"),
    # The card's referring example: the snowman at patches 0044..0863 of a 32x32 grid.
    (
        "kosmos-2",
        "reg_prompt",
        (Box(240, 15, 640, 405), SIZE),
        "<grounding><phrase> It</phrase><object><patch_index_0044><patch_index_0863></object> is",
    ),
    ("kosmos-2", "caption_prompt", (), "<grounding>An image of"),
    ("paligemma", "rec_prompt", ("the cat",), "<image>detect the cat"),
    ("paligemma", "rec_answer", (BOX, SIZE, "the cat"), "<loc0102><loc0102><loc0512><loc0512> the cat"),
    ("paligemma", "caption_prompt", (), "<image>caption en"),
    (
        "internvl",
        "rec_prompt",
        ("the cat",),
        "<|im_start|>user\n<IMG_CONTEXT>\nPlease provide the bounding box coordinate of the region this sentence describes: "
        "<ref>the cat</ref><|im_end|>\n<|im_start|>assistant\n",
    ),
    ("internvl", "rec_answer", (BOX, SIZE, "the cat"), "<ref>the cat</ref><box>[[100, 100, 500, 500]]</box>"),
    ("internvl", "reg_instruction", (BOX, SIZE), "Please provide a short description for this region: <box>[[100, 100, 500, 500]]</box>"),
]


@pytest.mark.parametrize("name, method, args, expected", CARD_STRINGS)
def test_profile_strings_match_the_model_cards(name, method, args, expected):
    assert getattr(get_profile(name), method)(*args) == expected


# Generated text as the families write it -> what refloop reads.
READS = [
    ("qwen2-vl", "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,100),(500,500)<|box_end|>", "the cat", BOX),
    ("qwen3-vl", '```json\n[\n\t{"bbox_2d": [100, 100, 500, 500], "label": "the cat"}\n]\n```', None, BOX),
    ("florence-2", "the cat<loc_100><loc_100><loc_500><loc_500>", "the cat", Box(64.32, 48.24, 320.32, 240.24)),
    ("kosmos-2", "<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>.", "a snowman", Box(240, 15, 640, 405)),
    ("paligemma", "<loc0102><loc0102><loc0512><loc0512> the cat", "the cat", Box(64.0625, 48.046875, 320.3125, 240.234375)),
    ("internvl", "<ref>the cat</ref><box>[[100, 100, 500, 500]]</box>", "the cat", BOX),
]


@pytest.mark.parametrize("name, text, expression, box", READS)
def test_profiles_read_family_answers(name, text, expression, box):
    profile = get_profile(name)
    parsed = profile.read_box(text, SIZE)
    assert parsed.as_list() == pytest.approx(box.as_list())
    if expression is not None:
        assert profile.read_expression(text) == expression


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_answers_keep_the_models_line_breaks_for_the_pope_reading(name):
    """The POPE release reads the answer as the model wrote it (stripped) and splits it on single
    spaces: "No\n\nThe image..." holds no word "No" there, so it is a yes. Answers keep their line
    breaks (family tags removed), expressions and captions are collapsed as before."""
    from refloop.evaluation.pope import reference_reading

    profile = get_profile(name)
    text = "No\n\nThe image shows a cat on a sofa."
    assert profile.read_answer(f" {text} ") == text
    assert reference_reading(profile.read_answer(text)) == "yes" and reference_reading(profile.read_answer("No, it is not.")) == "no"
    assert profile.read_caption(text) == "No The image shows a cat on a sofa" + ("" if name == "kosmos-2" else ".")


def test_a_profile_of_another_family_is_refused_before_any_weights_load(tmp_path, caplog):
    """Florence-2's prompt on a Qwen2-VL checkpoint has no image placeholder: transformers failed
    inside the first batch with a traceback (exit 1) and a run directory left behind (a
    first-contact helper's finding). A profile the processor takes but that is not the family's
    own is said."""
    from refloop.models.hf import load_parts
    from refloop.models.processors import save_processor

    model, processor = families.qwen2_vl()
    model.save_pretrained(tmp_path / "qwen")
    save_processor(processor, tmp_path / "qwen")
    with pytest.raises(RefloopError, match="processor refuses its prompt.*image_pad"):
        load_parts(str(tmp_path / "qwen"), "florence-2")
    assert "its family's profile: qwen2-vl" in caplog.text
    assert load_parts(str(tmp_path / "qwen"))[2].name == "qwen2-vl"


def test_unknown_family_lists_the_supported_ones():
    class Config:
        model_type = "llava"

    with pytest.raises(RefloopError, match=r"llava.*qwen2_vl.*florence2.*kosmos-2.*paligemma.*internvl"):
        profile_for_config(Config())
    with pytest.raises(RefloopError, match="supported: refloop-tiny, qwen2-vl"):
        get_profile("llava")


def test_profile_can_be_overridden_by_name(tmp_path):
    model, processor = families.qwen2_vl()
    model.save_pretrained(tmp_path)
    save_processor(processor, tmp_path)
    assert HFVLM.from_pretrained(tmp_path, device="cpu").profile.name == "qwen2-vl"
    assert HFVLM.from_pretrained(tmp_path, device="cpu", profile="qwen3-vl").profile.name == "qwen3-vl"
    assert set(PROFILES) >= {"qwen2-vl", "qwen2.5-vl", "qwen3-vl", "florence-2", "kosmos-2", "paligemma", "internvl"}


# ---- pitfalls ---------------------------------------------------------------------------------
def _scene():
    from helpers import scene_images

    _, images = scene_images(1)
    return images[0]


@pytest.mark.parametrize("builder", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_logits_depend_on_mm_token_type_ids(builder):
    """Without mm_token_type_ids the image tokens get 1-D positions: other logits, no error.
    refloop's log-probs keep them (extended with 0 over the answer) and equal generate()'s
    (test_families.py::test_logprobs_equal_what_generate_computes)."""
    model, processor = getattr(families, builder)()
    vlm = HFVLM(model, processor, get_profile({"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl"}.get(builder, "qwen3-vl"), processor))
    inputs = vlm._inputs([_scene()], [vlm.profile.rec_prompt("the red circle")])
    with torch.no_grad():
        right = model(**inputs).logits
        try:
            wrong = model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}).logits
        except ValueError:  # newer Qwen classes refuse; Qwen2-VL computes on, with other positions
            wrong = None
    if wrong is not None:
        assert not torch.allclose(right, wrong, atol=1e-5)
    answer = vlm.answer_ids("x")
    extended = vlm.logprobs([_scene()], [vlm.profile.rec_prompt("the red circle")], [answer])[0]
    with torch.no_grad():
        full = {**inputs}
        full["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)
        full["attention_mask"] = torch.ones_like(full["input_ids"])
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(answer), dtype=torch.long)], dim=1)
        n = inputs["input_ids"].shape[1]
        manual = model(**full).logits[0, n - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(answer)[:, None]).squeeze(-1)
    torch.testing.assert_close(extended, manual, atol=1e-5, rtol=1e-5)


def test_mrope_section_must_sum_to_half_the_head_dim(tmp_path):
    good, _ = families.qwen2_vl()
    validate_config(good.config)
    bad, processor = families.qwen2_vl(mrope_section=(2, 2, 2))  # head_dim 16: needs 8
    # transformers itself only fails inside the first forward, with a tensor-split error.
    inputs = processor(images=[_scene()], text=[get_profile("qwen2-vl").caption_prompt()], return_tensors="pt")
    with pytest.raises(RuntimeError, match="split"):
        bad(**inputs)
    with pytest.raises(RefloopError, match=r"sums to 6, but must sum to head_dim/2 = 8"):
        validate_config(bad.config)
    bad.save_pretrained(tmp_path)
    save_processor(processor, tmp_path)
    with pytest.raises(RefloopError, match="head_dim/2"):
        HFVLM.from_pretrained(tmp_path, device="cpu")


def test_mrope_section_outside_text_config_is_refused():
    model, _ = families.qwen2_5_vl()
    config = model.config
    config.text_config.rope_parameters = {k: v for k, v in config.text_config.rope_parameters.items() if k != "mrope_section"}
    config.rope_scaling = {"type": "mrope", "mrope_section": [2, 3, 3]}  # the transformers 4.x place
    with pytest.raises(RefloopError, match=r"text_config\.rope_parameters has no mrope_section"):
        validate_config(config)


@pytest.mark.parametrize("size", [(300, 170), (97, 211), (112, 112)])
def test_qwen25_frame_is_the_processors_resized_input(size):
    """Qwen2.5-VL boxes are pixels of the image the processor made: the profile's frame must be
    exactly grid * patch of what the processor produced (here with a 112*112 pixel budget)."""
    model, processor = families.qwen2_5_vl()
    profile = get_profile("qwen2.5-vl", processor)
    image = Image.new("RGB", size)
    grid = processor(images=[image], text=[profile.caption_prompt()], return_tensors="pt")["image_grid_thw"][0]
    resized_w, resized_h = int(grid[2]) * 14, int(grid[1]) * 14
    w, h = size
    assert profile.codec.coordinates(Box(0, 0, w, h), size) == [0, 0, resized_w, resized_h]
    # Read back: a box written in resized pixels lands on the original image.
    text = f'[{{"bbox_2d": [0, 0, {resized_w // 2}, {resized_h}], "label": "x"}}]'
    assert profile.read_box(text, size).as_list() == pytest.approx([0, 0, w * (resized_w // 2) / resized_w, h])


def test_image_size_limits_reach_the_processor_and_the_profile(tmp_path):
    model, processor = families.qwen2_5_vl()
    model.save_pretrained(tmp_path)
    save_processor(processor, tmp_path)
    vlm = HFVLM.from_pretrained(tmp_path, device="cpu", processor_options={"max_pixels": 56 * 56})
    assert vlm.profile.codec.max_pixels == 56 * 56
    grid = vlm._inputs([Image.new("RGB", (300, 170))], [vlm.profile.caption_prompt()])["image_grid_thw"][0]
    assert vlm.profile.codec.coordinates(Box(0, 0, 300, 170), (300, 170))[2:] == [int(grid[2]) * 14, int(grid[1]) * 14]


def test_peft_set_adapter_flips_requires_grad_and_roles_undo_it():
    model, _ = families.qwen2_5_vl()
    roles = NamedAdapters(model, LoraSettings(r=2, alpha=4), ("describer", "locator"))
    roles.use("describer", trainable=False)
    assert not any(p.requires_grad for role in ("describer", "locator") for p in roles.parameters(role))
    roles.peft.set_adapter("locator")  # PEFT's own switch makes the adapter trainable
    assert all(p.requires_grad for p in roles.parameters("locator"))
    roles.use("locator", trainable=False)
    assert not any(p.requires_grad for p in roles.parameters("locator"))
    roles.use("describer", trainable=True)
    assert all(p.requires_grad for p in roles.parameters("describer"))
    assert not any(p.requires_grad for p in roles.parameters("locator"))
    assert not any(p.requires_grad for n, p in roles.module.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize(
    "builder, naive",
    [
        ("qwen2_5_vl", ["gate_proj", "up_proj", "down_proj"]),  # also the vision blocks' MLP
        ("paligemma", r"(.*\.)?layers\.\d+\.self_attn\.(q|k|v)_proj"),  # also SigLIP's encoder layers
        ("kosmos_2", ["q_proj", "k_proj", "v_proj"]),  # also the CLIP tower and the perceiver resampler
    ],
)
def test_default_lora_targets_skip_the_vision_tower(builder, naive):
    from peft import LoraConfig, get_peft_model

    model, _ = getattr(families, builder)()
    vision = re.compile(r"visual|vision|image_to_text")
    hit = get_peft_model(model, LoraConfig(r=2, target_modules=naive))
    assert any(vision.search(n) for n, m in hit.named_modules() if hasattr(m, "lora_A"))
    model, _ = getattr(families, builder)()
    roles = NamedAdapters(model, LoraSettings(r=2, alpha=4), ("describer", "locator"))
    adapted = [n for n, m in roles.module.named_modules() if hasattr(m, "lora_A")]
    assert adapted and not any(vision.search(n) for n in adapted)
    assert any("gate_proj" in n or "fc1" in n for n in adapted) and any("q_proj" in n for n in adapted)


RECIPES = sorted((Path(__file__).parents[1] / "src" / "refloop" / "recipes").glob("sctune-*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_sctune_recipe_validates(path):
    from refloop.config import load_recipe
    from refloop.methods.sctune_recipe import SCTuneRecipe

    recipe = load_recipe(SCTuneRecipe, path)
    assert recipe.sctune.lora.target_modules == "auto"


def test_a_recipe_per_supported_family():
    text = " ".join(p.read_text() for p in RECIPES)
    for family in ("Qwen2-VL", "Qwen2.5-VL", "Qwen3-VL", "Florence-2", "kosmos-2", "paligemma2", "InternVL3"):
        assert family in text, family
