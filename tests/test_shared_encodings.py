"""refloop-tiny encodes each distinct image of a call once (the boxes of one image, the K samples
of a prompt); outputs must not change (issue 12, lever 1)."""

import torch
from helpers import scene_images

from refloop.models import load_vlm
from refloop.models.base import GenerateOptions
from refloop.models.tiny.processing import distinct_images


def _vlm():
    return load_vlm("refloop-tiny", device="cpu", batch_size=16)


def _boxes_of_each_image(n: int = 3):
    scenes, images = scene_images(n)
    pairs = [(img, o.box) for s, img in zip(scenes, images) for o in s.objects]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _unshared(vlm):
    vlm.processor.supports_shared_images = False
    return vlm


def test_distinct_images_by_object_and_by_pixels():
    _, images = scene_images(2)
    copy = images[0].copy()  # another object, the same pixels
    distinct, index = distinct_images([images[0], images[1], images[0], copy])
    assert distinct == [images[0], images[1]] and index == [0, 1, 0, 0]


def test_processor_shares_only_when_asked():
    vlm = _vlm()
    images, _ = _boxes_of_each_image(2)
    prompts = ["<image> describe"] * len(images)
    shared = vlm.processor(images=images, text=prompts, share_images=True)
    plain = vlm.processor(images=images, text=prompts)
    assert shared["pixel_values"].shape[0] == 2 and plain["pixel_values"].shape[0] == len(images)
    assert "image_index" not in plain
    assert torch.equal(shared["pixel_values"][shared["image_index"]], plain["pixel_values"])


def test_shared_encodings_give_the_same_descriptions_boxes_and_logprobs():
    images, boxes = _boxes_of_each_image(3)
    shared, separate = _vlm(), _unshared(_vlm())
    greedy = GenerateOptions(max_new_tokens=12)
    captions = shared.describe(images, boxes, greedy)
    assert captions == separate.describe(images, boxes, greedy)
    located = [loc.box for loc in shared.locate(images, captions)]
    assert located == [loc.box for loc in separate.locate(images, captions)]
    ids = [shared.answer_ids(c) for c in captions]
    prompts = [shared.profile.reg_prompt(b, img.size) for img, b in zip(images, boxes)]
    for a, b in zip(shared.logprobs(images, prompts, ids), separate.logprobs(images, prompts, ids)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_k_samples_reuse_the_prompt_encoding_and_sample_the_same():
    """num_return_sequences repeats the image index, not the pixels; same seed, same samples."""
    images, boxes = _boxes_of_each_image(1)
    sampling = GenerateOptions(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=10, num_return_sequences=4)
    vlm = _vlm()
    encoded = []
    original = vlm.model.encode_images
    vlm.model.encode_images = lambda pixels: encoded.append(pixels.shape[0]) or original(pixels)
    torch.manual_seed(3)
    a = vlm.describe(images, boxes, sampling)
    assert encoded == [1]  # one scene: its boxes and their 4 samples share one encoding
    torch.manual_seed(3)
    b = _unshared(_vlm()).describe(images, boxes, sampling)
    assert a == b and len(a) == 4 * len(boxes)
    assert len(set(a)) > 1  # really sampled


def _states(vlm):
    vlm.share_image_states = True  # opt-in: equal up to float rounding
    return vlm


def _counting(inner, calls: list):
    def spy(*args):
        calls.append(args[0].shape[0])  # distinct images run
        return inner(*args)

    return spy


def test_whole_sequence_forward_runs_each_image_once_and_matches_with_gradients():
    """Log-probs of K completions per prompt (PPO's old/new log-probs): the image tokens' states are
    computed once per distinct image; values and gradients match the per-row forward."""
    images, boxes = _boxes_of_each_image(2)
    images, boxes = [i for i in images for _ in range(3)], [b for b in boxes for _ in range(3)]
    values = {}
    for name, vlm in (("shared", _states(_vlm())), ("separate", _unshared(_vlm()))):
        prompts = [vlm.profile.reg_prompt(b, img.size) for img, b in zip(images, boxes)]
        ids = [vlm.answer_ids(t) for t in ["red circle", "the left small square", "blue"] * (len(images) // 3)]
        vlm.model.zero_grad()
        calls: list[int] = []
        vlm.model.forward_shared_images = _counting(vlm.model.forward_shared_images, calls)
        rows = vlm.logprobs(images, prompts, ids, grad=True)
        # two scenes, 3 rows per box, batches of 16 rows: each batch runs each of its scenes once
        assert calls == ([2, 1] if name == "shared" else [])
        sum(r.sum() for r in rows).backward()
        values[name] = ([r.detach() for r in rows], vlm.model.lm_head.weight.grad.clone())
    for a, b in zip(values["shared"][0], values["separate"][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(values["shared"][1], values["separate"][1], rtol=1e-4, atol=1e-5)
