"""Leaner generate() (issue 22, item 4, lever 2): one prompt prefill shared by the K samples of a
prompt, and a preallocated cache; the outputs are generate()'s own, token for token (given the
seed), on refloop-tiny and real families. refloop-tiny's opt-in image-state prefill: equal within
float rounding."""

from __future__ import annotations

import families
import pytest
import torch
from helpers import scene_images, tiny_random_model

from refloop.codecs.profiles import profile_for_config
from refloop.models.base import GenerateOptions
from refloop.models.hf import HFVLM, PreallocatedLayer

BUILDERS = {
    "refloop_tiny": tiny_random_model,
    "qwen2_vl": families.qwen2_vl,
    "paligemma": families.paligemma,
    "internvl": families.internvl,
}
K = 4


@pytest.fixture(scope="module", params=list(BUILDERS))
def vlm(request):
    model, processor = BUILDERS[request.param]()
    return HFVLM(model, processor, profile_for_config(model.config, processor), batch_size=8)


def _prefill_rows(vlm, run):
    """Rows of every forward that starts from an empty cache (a prefill), while `run` runs."""
    rows = []

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:
            rows.append(kwargs["input_ids"].shape[0])

    handle = vlm.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return run(), rows
    finally:
        handle.remove()


def _sample(vlm, shared: bool, images, prompts, options, seed: int = 7):
    vlm.shared_prefill = vlm.preallocated_cache = shared
    torch.manual_seed(seed)
    return _prefill_rows(vlm, lambda: [[c.token_ids for c in g] for g in vlm.generate(images, prompts, options)])


def test_k_samples_share_one_prefill_and_sample_the_same_tokens(vlm):
    scenes, images = scene_images(3)
    images = images + images[:1]  # two prompts on one image as well
    boxes = [s.objects[0].box for s in scenes] + [scenes[0].objects[-1].box]
    prompts = [vlm.profile.reg_prompt(b, img.size) for img, b in zip(images, boxes)]
    options = GenerateOptions(do_sample=True, temperature=1.0, top_k=100, top_p=0.95, max_new_tokens=8, num_return_sequences=K)
    shared, shared_rows = _sample(vlm, True, images, prompts, options)
    plain, plain_rows = _sample(vlm, False, images, prompts, options)
    assert shared_rows == [len(prompts)] and plain_rows == [len(prompts) * K]  # the lever ran, once per batch
    assert shared == plain  # bit for bit: same tokens, same stopping
    assert any(len(set(group)) > 1 for group in shared)  # random weights: the K samples differ, so the RNG is exercised


def test_shared_prefill_is_the_same_across_batches_and_seeds(vlm):
    """Several generate() calls (batch_size 8 rows of prompts: two calls), another seed, top-k only."""
    scenes, images = scene_images(3)
    images = [img for img in images for _ in range(3)]
    boxes = [o.box for s in scenes for o in s.objects[:3]][: len(images)]
    images = images[: len(boxes)]
    prompts = [vlm.profile.reg_prompt(b, img.size) for img, b in zip(images, boxes)]
    options = GenerateOptions(do_sample=True, top_k=5, max_new_tokens=6, num_return_sequences=2)
    shared, rows = _sample(vlm, True, images, prompts, options, seed=11)
    assert shared == _sample(vlm, False, images, prompts, options, seed=11)[0]
    assert sum(rows) == len(prompts)


def test_refloop_tiny_prefill_shares_image_states_among_the_queries_on_one_image():
    """Opt-in (`share_image_states`): the image tokens' keys and values once per distinct image
    in generate()'s prefill. Equal up to float rounding: the first step's logits within 1e-5, and
    here the greedy answers and the samples token for token."""
    model, processor = tiny_random_model()
    vlm = HFVLM(model, processor, profile_for_config(model.config, processor), batch_size=16)
    scenes, images = scene_images(3)
    images = [img for img in images for _ in range(4)]  # four queries on each image
    words = ["the red circle", "a small green triangle left of the blue square", "square", "the thing above"]
    expressions = [w for _ in scenes for w in words]
    inputs = vlm._inputs(images, [vlm.profile.rec_prompt(e) for e in expressions])
    assert inputs["pixel_values"].shape[0] == 3 and inputs["attention_mask"].min() == 0  # shared images, left padding

    from transformers.cache_utils import DynamicCache

    with torch.no_grad():
        caches = [DynamicCache(config=model.config) for _ in range(2)]
        plain = model(**inputs, cache=caches[0], use_cache=True, logits_to_keep=1)
        shared = model(**inputs, cache=caches[1], use_cache=True, logits_to_keep=1, share_image_states=True)
    torch.testing.assert_close(shared.logits, plain.logits, rtol=0, atol=1e-5)
    mask = inputs["attention_mask"].bool()[:, None, :, None]
    for a, b in zip(caches[0].layers, caches[1].layers):  # the cache, at every real (unpadded) position
        torch.testing.assert_close(b.keys * mask, a.keys * mask, rtol=0, atol=1e-5)
        torch.testing.assert_close(b.values * mask, a.values * mask, rtol=0, atol=1e-5)

    taken = []
    prefill = model._shared_image_prefill
    model._shared_image_prefill = lambda *a: taken.append(prefill(*a)) or taken[-1]
    prompts = [vlm.profile.rec_prompt(e) for e in expressions]
    options = GenerateOptions(do_sample=True, top_k=100, max_new_tokens=8, num_return_sequences=K)
    outputs = {}
    for share in (False, True):
        vlm.share_image_states = share
        located = [loc.text for loc in vlm.locate(images, expressions)]
        outputs[share] = (located, _sample(vlm, True, images, prompts, options)[0])
    assert len(taken) == 2 and all(t is not None for t in taken)  # the shared prefill ran (greedy, then sampled)
    assert outputs[True] == outputs[False]


def test_preallocated_cache_gives_the_same_greedy_answers_and_is_used(vlm):
    scenes, images = scene_images(3)
    boxes = [s.objects[0].box for s in scenes]
    layers = []
    update = PreallocatedLayer.update

    def spy(self, *args, **kwargs):
        layers.append(self)
        return update(self, *args, **kwargs)

    outputs = {}
    for preallocated in (False, True):
        vlm.preallocated_cache = preallocated
        PreallocatedLayer.update = spy
        try:
            captions = vlm.describe(images, boxes, GenerateOptions(max_new_tokens=10))
            located = [loc.text for loc in vlm.locate(images, captions)]
        finally:
            PreallocatedLayer.update = update
        outputs[preallocated] = captions, located
        assert bool(layers) == preallocated
    assert outputs[True] == outputs[False]
    # one buffer per layer and call, written in place: the returned keys are views into it
    assert all(layer.keys.data_ptr() == layer._buffers[0].data_ptr() for layer in layers)
