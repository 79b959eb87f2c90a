"""refloop-tiny's grounded caption prompt (SVP's q(z | c, g)) and the continued pretraining that
teaches it (the context_caption task, init_from)."""

import hashlib
import random

import pytest
import torch
from safetensors.torch import load_file

from refloop.errors import RefloopError
from refloop.grounding import SceneOracle, grounding_context, scene_record
from refloop.methods.pretrain import (
    PretrainConfig,
    build_model,
    context_scene,
    load_init_weights,
    make_batch,
    noisy_grounding,
)
from refloop.models import PROFILES, default_model_path, get_profile, packaged_model_path, resolve_model
from refloop.models.profiles import TinyProfile
from refloop.models.tiny.processing import RefloopTinyProcessor, build_tokenizer
from refloop.world import IN_DOMAIN, get_style, render, sample_scene
from refloop.world.augment import degrade_image


@pytest.fixture(scope="module")
def processor():
    return RefloopTinyProcessor(build_tokenizer())


def batch_digest(batch: dict) -> str:
    h = hashlib.sha256()
    for key in ("input_ids", "labels", "image_index"):
        h.update(batch[key].numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_empty_context_gives_the_plain_caption_prompt(name):
    profile = get_profile(name)
    assert profile.grounded_caption_prompt("") == profile.caption_prompt()
    assert profile.grounded_caption_prompt(" \n ") == profile.caption_prompt()


def test_chat_profiles_put_the_context_before_the_caption_instruction():
    profile = get_profile("qwen2-vl")
    prompt = profile.grounded_caption_prompt("red circle <|box_start|>(1,2),(3,4)<|box_end|>")
    assert prompt == profile.prompt(profile.grounded_caption_instruction("red circle <|box_start|>(1,2),(3,4)<|box_end|>"))
    assert prompt.index("Objects detected") < prompt.index("red circle") < prompt.index(profile.caption_instruction())


def test_florence2_refuses_context_it_cannot_read():
    with pytest.raises(RefloopError, match="Florence-2"):
        get_profile("florence-2").grounded_caption_prompt("red circle <loc_1><loc_2><loc_3><loc_4>")


def test_tiny_grounded_prompt_is_entries_then_caption():
    profile = TinyProfile()
    assert profile.grounded_caption_prompt("red circle {<1><2><30><40>}\nblue square {<5><6><7><8>}") == (
        "<image> red circle {<1><2><30><40>} blue square {<5><6><7><8>} caption <sep>"
    )


def test_tiny_context_text_has_no_unknown_tokens(processor):
    """The oracle's grounding (with false positives) and the training noise, as refloop-tiny reads them."""
    tok, profile = processor.tokenizer, TinyProfile()
    oracle = SceneOracle(miss_rate=0.2, false_positive_rate=0.5, jitter=0.1, seed=3)
    rng = random.Random(0)
    prompts = []
    for i in range(30):
        scene = sample_scene(get_style("wild"), 5, i)
        image = render(scene)
        phrases = ["red circle", "blue square", "yellow triangle", "green object", "large circle"]
        grounding = oracle.ground([image], [phrases], [scene_record(scene, image)])[0]
        prompts.append(profile.grounded_caption_prompt(grounding_context(grounding, image.size, codec=profile.codec)))
        noisy = noisy_grounding(scene, rng)
        prompts.append(profile.grounded_caption_prompt(grounding_context(noisy, image.size, codec=profile.codec)))
    assert sum("{" in p for p in prompts) > 40
    for prompt in prompts:
        ids = tok(processor.expand_prompt(prompt), add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, prompt


def test_noisy_grounding_labels_true_objects_and_absent_pairs_best_first():
    rng = random.Random(7)
    for i in range(50):
        scene = sample_scene(get_style(IN_DOMAIN), 9, i)
        present = {f"{o.colour} {o.shape}" for o in scene.objects}
        g = noisy_grounding(scene, rng)
        assert list(g.scores) == sorted(g.scores, reverse=True)
        for box, label, score in zip(g.boxes, g.labels, g.scores):
            if label in present:  # a true detection: near its object
                assert score >= 0.5 and max(box.iou(o.box) for o in scene.objects) > 0.5
            else:
                assert label.split()[1] in ("circle", "square", "triangle")
        assert len([lab for lab in g.labels if lab in present]) <= len(scene.objects)


def test_context_caption_batch_is_a_function_of_seed_and_step(processor):
    cfg = PretrainConfig(batch_scenes=2, queries_per_scene=4, task_mix={"context_caption": 1.0}, seed=1)
    a, b = make_batch(3, cfg, processor, TinyProfile()), make_batch(3, cfg, processor, TinyProfile())
    assert batch_digest(a) == batch_digest(b)
    assert batch_digest(make_batch(4, cfg, processor, TinyProfile())) != batch_digest(a)
    assert batch_digest(make_batch(3, cfg.model_copy(update={"seed": 2}), processor, TinyProfile())) != batch_digest(a)
    open_brace = processor.tokenizer.convert_tokens_to_ids("{")
    assert (a["input_ids"] == open_brace).any(dim=1).sum() >= 6  # most prompts carry detections


# Digests of make_batch under the old recipe's task mix, computed with the code that trained the
# committed refloop-tiny (before context_caption existed): its data must not move.
OLD_RECIPE_DIGESTS = {
    0: "c37bfd9ef89e785980b1ed5baded8a99ea585e8ad47fe6ee51e9f1e29f52cc8e",
    7: "9cc4eb39cb7ebe98eef4ff03fbd71c405c563a45b897bc0ecf77e3199e37fdd0",
}


def test_old_recipe_batches_are_unchanged(processor):
    cfg = PretrainConfig(batch_scenes=3, queries_per_scene=8, curriculum_steps=2)
    with_zero = cfg.model_copy(update={"task_mix": cfg.task_mix | {"context_caption": 0.0}})
    for step, digest in OLD_RECIPE_DIGESTS.items():
        assert batch_digest(make_batch(step, cfg, processor, TinyProfile())) == digest
        assert batch_digest(make_batch(step, with_zero, processor, TinyProfile())) == digest


# Digests of make_batch under the v1 refloop-tiny-context recipe's task mix (no context_styles, no
# degradation), computed with the code that trained v1 (commit f4f245b): its data must not move.
V1_CONTEXT_RECIPE_DIGESTS = {
    0: "aa47d5a042f36204868bdd60e20c3c953256502ef5bdf1e6226c40bd3eb42afa",
    5: "10653d04f8cbd228eee30d809213b47b550f0a7478ef300b72c16f058e810baa",
}
V1_MIX = {"rec": 0.32, "reg": 0.2, "caption": 0.1, "exist": 0.08, "context_caption": 0.3}


def test_v1_context_recipe_batches_are_unchanged(processor):
    cfg = PretrainConfig(batch_scenes=3, queries_per_scene=8, curriculum_steps=0, task_mix=V1_MIX, seed=1)
    assert not cfg.separate_context_images
    for step, digest in V1_CONTEXT_RECIPE_DIGESTS.items():
        assert batch_digest(make_batch(step, cfg, processor, TinyProfile())) == digest


# Digests of make_batch (pixels included) under the committed grounded recipe's context options,
# computed with the code that trained the packaged stage 2 (c8055e6, before the colour-cast,
# outline-texture and miss-rate options existed): its data must not move.
GROUNDED_RECIPE_DIGESTS = {
    0: "095dc9071c03022c530bb3cda5a621388a6b1d0df5578e385d2940a3593db015",
    5: "7d208ebe9f6459669148d23a9c0ad46fc817f545aeb66951f9f49984d35f4f75",
}


def test_grounded_recipe_batches_are_unchanged(processor):
    cfg = PretrainConfig(
        batch_scenes=3,
        queries_per_scene=8,
        curriculum_steps=0,
        seed=3,
        task_mix={"rec": 0.3, "reg": 0.2, "caption": 0.1, "exist": 0.05, "context_caption": 0.35},
        context_styles={"crowded": 0.5, IN_DOMAIN: 0.5},
        context_degrade_prob=0.75,
    )
    for step, digest in GROUNDED_RECIPE_DIGESTS.items():
        batch = make_batch(step, cfg, processor, TinyProfile())
        h = hashlib.sha256()
        for key in ("input_ids", "labels", "image_index", "pixel_values"):
            h.update(batch[key].numpy().tobytes())
        assert h.hexdigest() == digest


def test_context_images_of_their_own_carry_the_context_queries(processor):
    """context_styles / context_degrade_prob: context_caption queries are asked on extra images
    (other styles, degraded), one per batch scene that has such queries; the other tasks on the
    batch's in-domain scenes."""
    cfg = PretrainConfig(
        batch_scenes=4,
        queries_per_scene=8,
        curriculum_steps=0,
        task_mix=V1_MIX,
        seed=2,
        context_styles={"crowded": 0.5, IN_DOMAIN: 0.5},
        context_degrade_prob=0.75,
    )
    a = make_batch(3, cfg, processor, TinyProfile())
    assert batch_digest(a) == batch_digest(make_batch(3, cfg, processor, TinyProfile()))
    assert a["pixel_values"].shape[0] > cfg.batch_scenes
    assert a["image_index"].max() == a["pixel_values"].shape[0] - 1
    caption_id = processor.tokenizer.convert_tokens_to_ids("caption")
    open_brace = processor.tokenizer.convert_tokens_to_ids("{")
    grounded = (a["input_ids"] == open_brace).any(dim=1) & (a["input_ids"] == caption_id).any(dim=1)
    # every image is used; the grounded caption queries' images carry no other task's query
    used = set(a["image_index"].tolist())
    assert used == set(range(a["pixel_values"].shape[0]))
    other_tasks = ~(a["input_ids"] == caption_id).any(dim=1)
    assert set(a["image_index"][grounded].tolist()).isdisjoint(a["image_index"][other_tasks].tolist())
    assert grounded.sum() >= 5  # about a third of the 32 queries


def test_context_scenes_come_from_the_chosen_styles_and_degrade():
    cfg = PretrainConfig(batch_scenes=8, context_styles={"crowded": 1.0}, context_degrade_prob=1.0)
    rng = random.Random(0)
    for i in range(8):
        scene, image, _ = context_scene(0, i, cfg, rng, None)
        assert scene.domain == "crowded"
        assert image.size == (scene.width, scene.height)
        assert image.tobytes() != render(scene).tobytes()
    cfg = PretrainConfig(context_degrade_prob=0.0, context_styles={IN_DOMAIN: 1.0})
    scene, image, _ = context_scene(0, 0, cfg, random.Random(0), None)
    assert scene.domain == IN_DOMAIN and image.tobytes() == render(scene).tobytes()
    scene = sample_scene(get_style(IN_DOMAIN), 0, 5)
    import numpy as np

    one = degrade_image(scene, render(scene), np.random.default_rng(4))
    assert one.tobytes() == degrade_image(scene, render(scene), np.random.default_rng(4)).tobytes()


def test_wild_is_never_a_context_training_style():
    with pytest.raises(ValueError, match="out-of-domain"):
        PretrainConfig(context_styles={"crowded": 1.0, "wild": 0.1})
    with pytest.raises(ValueError, match="unknown style"):
        PretrainConfig(context_styles={"crowdd": 1.0})


def test_v1_run_config_is_unchanged_by_the_context_options():
    """v1 run directories still resume: unset context options are not part of their config."""
    keys = PretrainConfig(init_from="packaged").trainer_config()
    assert "context_styles" not in keys and "context_degrade_prob" not in keys
    cfg = PretrainConfig(context_styles={"crowded": 1.0}, context_degrade_prob=0.5).trainer_config()
    assert cfg["context_styles"] == {"crowded": 1.0} and cfg["context_degrade_prob"] == 0.5


def test_old_recipe_run_config_is_unchanged_by_init_from():
    """Run directories of the old recipe still resume: an unset init_from is not part of their config."""
    assert "init_from" not in PretrainConfig().trainer_config()
    assert PretrainConfig(init_from="packaged").trainer_config()["init_from"] == "packaged"


def test_unknown_task_in_the_mix_is_an_error():
    with pytest.raises(ValueError, match="unknown task"):
        PretrainConfig(task_mix={"rec": 1.0, "captoin": 0.5})


def test_init_from_packaged_loads_the_committed_weights():
    model, processor = build_model(PretrainConfig())
    load_init_weights(model, processor, "packaged")
    committed = load_file(default_model_path() / "model.safetensors")
    state = model.state_dict()
    assert committed.keys() <= state.keys()
    for key, value in committed.items():
        assert torch.equal(state[key], value), key


def test_init_from_a_checkpoint_of_another_size_is_refused():
    model, processor = build_model(PretrainConfig(hidden_size=32, num_layers=1, num_heads=2))
    with pytest.raises(RefloopError, match="architecture"):
        load_init_weights(model, processor, str(default_model_path()))


def test_packaged_model_names_resolve_to_their_directories(tmp_path, monkeypatch):
    assert resolve_model(None) == default_model_path()
    assert resolve_model("refloop-tiny") == packaged_model_path("refloop-tiny") == default_model_path()
    # the retired context model's name serves the one packaged model that replaced it
    assert resolve_model("refloop-tiny-context") == default_model_path()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "refloop-tiny-context").mkdir()  # a user's own directory of that name wins
    assert resolve_model("refloop-tiny-context") == "refloop-tiny-context"


def test_packaged_model_loads_by_name_and_captions_with_a_context():
    from refloop.models import load_vlm

    vlm = load_vlm("refloop-tiny", device="cpu")
    assert isinstance(vlm.profile, TinyProfile)
    scene = sample_scene(get_style(IN_DOMAIN), 3, 0)
    image = render(scene)
    grounding = SceneOracle().ground([image], [["red circle", "blue square"]], [scene_record(scene, image)])[0]
    prompt = vlm.profile.grounded_caption_prompt(grounding_context(grounding, image.size, codec=vlm.profile.codec))
    assert vlm.generate([image], [prompt])[0][0].text


def test_colour_cast_misleads_colours_and_keeps_the_layout():
    import numpy as np

    from refloop.world.augment import colour_cast

    scene = sample_scene(get_style(IN_DOMAIN), 0, 5)
    image = render(scene)
    casts = [colour_cast(image, np.random.default_rng(i)) for i in range(12)]
    assert casts[0].tobytes() == colour_cast(image, np.random.default_rng(0)).tobytes()
    grey = [c for c in casts if np.ptp(np.asarray(c).astype(int), axis=2).max() == 0]
    coloured = [c for c in casts if np.ptp(np.asarray(c).astype(int), axis=2).max() > 0]
    assert grey and coloured  # monochrome one time in four, a colour cast otherwise
    # the last object is drawn on top: its centre pixel is its own colour in the render
    obj = scene.objects[-1]
    centre = (int((obj.box.x1 + obj.box.x2) / 2), int((obj.box.y1 + obj.box.y2) / 2))
    value = image.convert("HSV").getpixel(centre)[2]
    for cast in coloured:
        assert cast.size == image.size
        assert cast.getpixel(centre) != image.getpixel(centre)  # the object's colour changed
        assert abs(cast.convert("HSV").getpixel(centre)[2] - value) <= 2  # its brightness did not
    for cast in grey:
        assert cast.getpixel(centre)[0] == image.convert("L").getpixel(centre)


def test_context_colour_cast_is_drawn_only_when_asked():
    cfg = PretrainConfig(batch_scenes=4, context_styles={IN_DOMAIN: 1.0}, context_colour_cast_prob=1.0)
    assert cfg.separate_context_images
    scene, image, _ = context_scene(0, 0, cfg, random.Random(0), None)
    assert image.tobytes() != render(scene).tobytes()
    off = cfg.model_copy(update={"context_colour_cast_prob": 0.0})
    scene, image, _ = context_scene(0, 0, off, random.Random(0), None)
    assert image.tobytes() == render(scene).tobytes()
    assert "context_colour_cast_prob" not in PretrainConfig().trainer_config()
    assert PretrainConfig(context_colour_cast_prob=0.5).trainer_config()["context_colour_cast_prob"] == 0.5


def test_context_miss_rate_sets_how_often_the_grounding_misses_an_object(processor):
    def found(miss_rate):
        rng = random.Random(3)
        hits = total = 0
        for i in range(60):
            scene = sample_scene(get_style(IN_DOMAIN), 9, i)
            g = noisy_grounding(scene, rng, miss_rate)
            present = [f"{o.colour} {o.shape}" for o in scene.objects]
            hits += sum(label in present for label in g.labels)
            total += len(present)
        return hits / total

    assert found((0.0, 0.0)) == 1.0
    assert found((1.0, 1.0)) == 0.0

    def detections(miss_rate):  # boxes in a batch of grounded-caption prompts
        cfg = PretrainConfig(batch_scenes=4, queries_per_scene=4, task_mix={"context_caption": 1.0}, context_miss_rate=miss_rate)
        batch = make_batch(0, cfg, processor, TinyProfile())
        return int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("{")).sum())

    assert detections((1.0, 1.0)) < detections((0.0, 0.0)) / 2  # make_batch hands the range to the grounding
    assert 0.75 < found((0.0, 0.4)) < 0.85  # the default: a fifth missed on average
    assert "context_miss_rate" not in PretrainConfig().trainer_config()
    assert PretrainConfig(context_miss_rate=(0.0, 0.1)).trainer_config()["context_miss_rate"] == [0.0, 0.1]
    with pytest.raises(ValueError, match="low <= high"):
        PretrainConfig(context_miss_rate=(0.3, 0.1))


def test_context_outline_texture_redraws_the_scene_with_edges_and_is_drawn_only_when_asked():
    import numpy as np

    from refloop.world.augment import outline_texture

    scene = sample_scene(get_style(IN_DOMAIN), 0, 2)
    image = outline_texture(scene, np.random.default_rng(1))
    assert image.tobytes() == outline_texture(scene, np.random.default_rng(1)).tobytes()
    assert image.size == (scene.width, scene.height)
    obj = scene.objects[-1]  # drawn on top: its centre shows its own colour
    cx, cy = int((obj.box.x1 + obj.box.x2) / 2), int((obj.box.y1 + obj.box.y2) / 2)
    assert image.getpixel((cx, cy)) == obj.rgb  # objects keep their own colours
    assert min(render(scene).getpixel((0, 0))) >= 225 and image.getpixel((0, 0)) != render(scene).getpixel((0, 0))
    cfg = PretrainConfig(batch_scenes=4, context_styles={IN_DOMAIN: 1.0}, context_outline_texture_prob=1.0)
    assert cfg.separate_context_images
    ctx_scene, ctx_image, _ = context_scene(0, 0, cfg, random.Random(0), None)
    assert ctx_image.tobytes() != render(ctx_scene).tobytes()
    assert "context_outline_texture_prob" not in PretrainConfig().trainer_config()


def test_outputs_written_before_the_late_options_still_match():
    """An --out recorded before the colour-cast, outline-texture and miss-rate options existed
    holds none of them: at their defaults they are not part of the run's identity."""
    from refloop.methods.recipe import recipe_fingerprint

    cfg = PretrainConfig(context_styles={"crowded": 1.0}, context_degrade_prob=0.75)
    recorded = recipe_fingerprint("pretrain-tiny", cfg, cfg.options_at_default())["recipe"]
    assert not {"context_colour_cast_prob", "context_outline_texture_prob", "context_miss_rate"} & set(recorded)
    assert recorded["context_degrade_prob"] == 0.75
    changed = cfg.model_copy(update={"context_miss_rate": (0.0, 0.1)})
    assert recipe_fingerprint("pretrain-tiny", changed, changed.options_at_default())["recipe"]["context_miss_rate"] == [0.0, 0.1]


def test_frozen_vision_trains_the_decoder_but_not_the_encoder_on_outline_texture_images(processor):
    """context_outline_texture_frozen_vision: the outline_texture images' rows change no vision
    weight, still train the decoder, and the forward itself is unchanged."""
    cfg = PretrainConfig(
        batch_scenes=2,
        queries_per_scene=2,
        task_mix={"context_caption": 1.0},
        context_outline_texture_prob=1.0,
        context_outline_texture_frozen_vision=True,
    )
    batch = make_batch(0, cfg, processor, TinyProfile())
    # own scenes (never queried here) stay trainable; every context image is an outline_texture one
    assert batch["frozen_images"].tolist() == [False, True, False, True]
    trainable = cfg.model_copy(update={"context_outline_texture_frozen_vision": False})
    assert "frozen_images" not in make_batch(0, trainable, processor, TinyProfile())
    model, _ = build_model(cfg)
    args = (batch["pixel_values"], batch["image_index"], batch["input_ids"], batch["attention_mask"])

    def grads(frozen):
        model.zero_grad(set_to_none=True)
        logits = model.forward_shared_images(*args, frozen)
        logits.float().pow(2).mean().backward()
        vision = [p.grad for n, p in model.named_parameters() if n.startswith("vision.")]
        decoder = [p.grad for n, p in model.named_parameters() if n.startswith("layers.")]
        return logits.detach(), vision, decoder

    plain, vision, decoder = grads(None)
    assert sum(float(g.abs().sum()) for g in vision if g is not None) > 0
    frozen, vision, decoder = grads(batch["frozen_images"])
    torch.testing.assert_close(frozen, plain)
    assert all(g is None or not g.any() for g in vision)
    assert all(g is not None for g in decoder) and sum(float(g.abs().sum()) for g in decoder) > 0
    with pytest.raises(ValueError, match="context_outline_texture_prob > 0"):
        PretrainConfig(context_outline_texture_frozen_vision=True)
    assert "context_outline_texture_frozen_vision" not in PretrainConfig().trainer_config()
