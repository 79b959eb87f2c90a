"""The vLLM backend against the HF backend on tiny random checkpoints of real families (attention
heads of 32, the smallest size vLLM's CPU backend runs): the same greedy tokens, the same
log-probs for sampled tokens, no image placeholder ever sampled, and LoRA roles that follow the
trained adapter exactly after each push."""

from __future__ import annotations

import families
import pytest
import torch
from helpers import scene_box_items

from refloop.models.base import GenerateOptions
from refloop.models.hf import HFVLM
from refloop.models.processors import save_processor
from refloop.models.vllm import VLLMVLM, VLLMEngine, write_peft_adapter
from refloop.training.adapters import LoraSettings, NamedAdapters
from refloop.training.losses import answer_nll

FAMILIES = {"qwen2_vl": lambda: families.qwen2_vl(head_dim=32), "qwen2_5_vl": lambda: families.qwen2_5_vl(head_dim=32)}
LORA = LoraSettings(r=8, alpha=16)


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request, tmp_path_factory):
    """(HF backend, HF backend with describer/locator adapters, vLLM backend on one engine)."""
    model, processor = FAMILIES[request.param]()
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    save_processor(processor, directory)
    hf = HFVLM.from_pretrained(directory, device="cpu", dtype="fp32", batch_size=8)
    trained = HFVLM.from_pretrained(directory, device="cpu", dtype="fp32", batch_size=8)
    torch.manual_seed(0)
    adapters = NamedAdapters(trained.model, LORA, ["describer", "locator"])
    tuned = HFVLM(adapters.module, trained.processor, trained.profile, name=str(directory), batch_size=8)
    engine = VLLMEngine(str(directory), device="cpu", dtype="fp32", lora_rank=LORA.r)
    vllm = VLLMVLM(engine, hf.processor, hf.profile, name=str(directory), scorer=hf)
    yield hf, adapters, tuned, vllm
    engine.close()
    del engine, vllm
    from vllm.distributed import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()


@pytest.fixture(scope="module")
def items():
    return scene_box_items(2)[:6]


def _prompts(vlm, items):
    images = [it.load_image() for it in items]
    reg = [vlm.profile.reg_prompt(it.box, img.size) for it, img in zip(items, images)]
    rec = [vlm.profile.rec_prompt(e) for e in ("the red circle", "a small green triangle", "the blue square above")]
    return images + images[:3] + images[:1], reg + rec + [vlm.profile.caption_prompt()]


def _ids(groups):
    return [c.token_ids for group in groups for c in group]


def test_greedy_outputs_equal_the_hf_backend_token_for_token(served, items):
    hf, _, _, vllm = served
    images, prompts = _prompts(hf, items)
    options = GenerateOptions(max_new_tokens=24)
    expected = hf.generate(images, prompts, options)
    got = vllm.generate(images, prompts, options)
    assert _ids(got) == _ids(expected)
    assert [c.text for g in got for c in g] == [c.text for g in expected for c in g]
    # The task calls read the same answers.
    boxes = [it.box for it in items]
    assert vllm.describe(images[: len(items)], boxes) == hf.describe(images[: len(items)], boxes)
    expressions = ["the red circle", "a small green triangle"]
    assert vllm.locate(images[:2], expressions) == hf.locate(images[:2], expressions)
    assert vllm.caption(images[:2]) == hf.caption(images[:2])


def test_sampled_logprobs_equal_the_transformers_forward(served, items):
    hf, _, _, vllm = served
    images, prompts = _prompts(hf, items)
    torch.manual_seed(1)
    options = GenerateOptions(do_sample=True, temperature=1.0, top_k=100, top_p=0.9, max_new_tokens=12, num_return_sequences=4)
    groups = vllm.generate(images, prompts, options)
    assert all(len(g) == 4 for g in groups)
    samples = [(img, p, c) for img, p, g in zip(images, prompts, groups) for c in g]
    scored = hf.logprobs([s[0] for s in samples], [s[1] for s in samples], [list(s[2].token_ids) for s in samples])
    worst = max(float((torch.tensor(s[2].logprobs) - row).abs().max()) for s, row in zip(samples, scored))
    assert worst < 1e-5
    # Seeded from torch's RNG: the same seed gives the same samples.
    torch.manual_seed(1)
    assert _ids(vllm.generate(images, prompts, options)) == _ids(groups)


def test_image_placeholders_are_never_sampled(served, items):
    hf, _, _, vllm = served
    placeholders = {hf.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")}
    assert placeholders <= set(vllm.suppress_tokens) and all(vllm._banned[t] == float("-inf") for t in placeholders)
    images, prompts = _prompts(hf, items)
    torch.manual_seed(2)
    hot = GenerateOptions(do_sample=True, temperature=2.0, max_new_tokens=16, num_return_sequences=8)
    sampled = {t for ids in _ids(vllm.generate(images, prompts, hot)) for t in ids}
    assert len(sampled) > 50  # a flat distribution over most of the vocabulary
    assert not sampled & placeholders


def test_roles_follow_each_pushed_adapter_exactly(served, items):
    hf, adapters, tuned, vllm = served
    engine = vllm.engine
    describer, locator = adapters.view(tuned, "describer"), adapters.view(tuned, "locator")
    for name in ("describer", "locator"):
        engine.push(name, write_peft_adapter(adapters, name))
    images, prompts = _prompts(hf, items)
    options = GenerateOptions(max_new_tokens=16)
    before = _ids(hf.generate(images, prompts, options))
    # Untrained adapters (LoRA B = 0) are the base.
    assert _ids(vllm.view("describer").generate(images, prompts, options)) == before
    # One training step of the describer (a large learning rate, so that its answers change).
    optimizer = torch.optim.AdamW(adapters.parameters("describer"), lr=0.05)
    targets = [hf.answer_ids("the red circle")] * len(items)
    answer_nll(describer, images[: len(items)], prompts[: len(items)], targets).backward()
    optimizer.step()
    adapters.use("describer", trainable=False)
    trained = _ids(describer.generate(images, prompts, options))
    assert trained != before
    old_request = engine.request("describer")
    assert _ids(vllm.view("describer").generate(images, prompts, options)) == before  # not pushed yet: the old version
    engine.push("describer", write_peft_adapter(adapters, "describer"))
    assert engine.request("describer").lora_int_id != old_request.lora_int_id  # a fresh id, never a reused one
    assert _ids(vllm.view("describer").generate(images, prompts, options)) == trained
    # The other role is untouched, and one engine serves both in any order.
    assert _ids(vllm.view("locator").generate(images, prompts, options)) == _ids(locator.generate(images, prompts, options)) == before
    assert _ids(vllm.view("describer").generate(images, prompts, options)) == trained
    # Sampled log-probs of a trained role equal the transformers forward through that role.
    torch.manual_seed(3)
    sampling = GenerateOptions(do_sample=True, max_new_tokens=10, num_return_sequences=2)
    groups = vllm.view("describer", scorer=describer).generate(images[:3], prompts[:3], sampling)
    rows = [(img, p, c) for img, p, g in zip(images, prompts, groups) for c in g]
    scored = describer.logprobs([r[0] for r in rows], [r[1] for r in rows], [list(r[2].token_ids) for r in rows])
    assert max(float((torch.tensor(r[2].logprobs) - s).abs().max()) for r, s in zip(rows, scored)) < 1e-5


def test_sctune_steps_generate_through_the_engine_with_the_current_adapters(served, items):
    from refloop.methods.sctune import SCTune, SCTuneConfig

    hf, _, _, vllm = served
    engine = vllm.engine
    base = HFVLM.from_pretrained(hf.name, device="cpu", dtype="fp32", batch_size=8)
    cfg = SCTuneConfig(
        phases=2, describer_steps=1, locator_steps=1, batch_size=2, baseline="group", group_size=2, lora=LORA,
        describer_lr=0.05, locator_lr=0.05, max_new_tokens=8, generation_batch_size=8, checkpoint_every=100,
    )  # fmt: skip
    tuner = SCTune.from_base(base, cfg, items, engine=engine)
    assert tuner.describer.backend == "vllm" and tuner.locator.backend == "vllm"
    images = [it.load_image() for it in items]
    boxes = [it.box for it in items]
    hf_describer = tuner.adapters.view(tuner.vlm, "describer")
    hf_locator = tuner.adapters.view(tuner.vlm, "locator")
    for step in range(2):  # a describer step (PPO on vLLM samples), then a locator step and the parameter sync
        stats = tuner.step(step)
        assert stats["role"] == ("describer", "locator")[step]
        tuner._publish()
        greedy = GenerateOptions(max_new_tokens=12)
        assert tuner.describer.describe(images, boxes, greedy) == hf_describer.describe(images, boxes, greedy)
        expressions = ["the red circle", "a small green triangle"]
        assert tuner.locator.locate(images[:2], expressions) == hf_locator.locate(images[:2], expressions)
    trained = tuner.adapters.adapter_state("describer")
    assert any(float(v.abs().max()) > 0 for k, v in trained.items() if "lora_B" in k)  # the roles did change
