"""The VLM interface methods type against: HFVLM implements every member of the Protocol, task
methods return all K samples box-major, locate takes generation options, and log-probs come from
vocabulary logits at the completion positions only (refloop-tiny: bitwise what full logits give)."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import save_tiny_random, scene_images

from refloop.boxes import Box
from refloop.models.base import GREEDY, VLM, GenerateOptions
from refloop.models.hf import HFVLM

SAMPLED = GenerateOptions(do_sample=True, max_new_tokens=6, num_return_sequences=3)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return HFVLM.from_pretrained(save_tiny_random(tmp_path_factory.mktemp("tiny")), device="cpu", dtype="fp32", batch_size=4)


@pytest.fixture(scope="module")
def scenes():
    scenes, images = scene_images(2)
    return images, [s.objects[0].box for s in scenes]


METHODS = ("generate", "logprobs", "answer_ids", "describe", "locate", "caption", "answer")


def test_hfvlm_implements_the_protocol_methods_with_their_signatures():
    for name in METHODS:
        expected = inspect.signature(getattr(VLM, name)).parameters.values()
        got = inspect.signature(getattr(HFVLM, name)).parameters.values()
        assert [(p.name, p.default) for p in got] == [(p.name, p.default) for p in expected], name


def test_hfvlm_instance_has_the_protocol_attributes(vlm):
    assert set(VLM.__annotations__) == {"profile", "name", "tokenizer", "batch_size"}
    assert isinstance(VLM.device, property) and vlm.device == torch.device("cpu")
    assert vlm.profile.name == "refloop-tiny" and vlm.name and vlm.batch_size == 4
    assert isinstance(vlm.tokenizer.eos_token_id, int)


def test_describe_returns_every_sample_box_major(vlm, scenes):
    images, boxes = scenes
    torch.manual_seed(0)
    described = vlm.describe(images, boxes, SAMPLED)
    torch.manual_seed(0)
    prompts = [vlm.profile.reg_prompt(b, img.size) for img, b in zip(images, boxes)]
    groups = vlm.generate(images, prompts, SAMPLED)
    assert len(described) == 2 * 3
    assert described == [vlm.profile.read_expression(groups[i][j].text) for i in range(2) for j in range(3)]


def test_caption_returns_every_sample_image_major(vlm, scenes):
    images, _ = scenes
    torch.manual_seed(1)
    captions = vlm.caption(images, SAMPLED)
    torch.manual_seed(1)
    groups = vlm.generate(images, [vlm.profile.caption_prompt()] * 2, SAMPLED)
    assert captions == [vlm.profile.read_caption(c.text) for group in groups for c in group]


def test_one_sample_per_input_is_what_greedy_generation_writes(vlm, scenes):
    images, boxes = scenes
    prompts = [vlm.profile.reg_prompt(b, img.size) for img, b in zip(images, boxes)]
    assert vlm.describe(images, boxes) == [vlm.profile.read_expression(g[0].text) for g in vlm.generate(images, prompts)]


def test_locate_takes_options_and_returns_every_sample(vlm, scenes):
    images, _ = scenes
    expressions = ["the red circle", "the left small blue square"]
    torch.manual_seed(2)
    located = vlm.locate(images, expressions, SAMPLED)
    torch.manual_seed(2)
    groups = vlm.generate(images, [vlm.profile.rec_prompt(e) for e in expressions], SAMPLED)
    assert [loc.text for loc in located] == [c.text for group in groups for c in group]
    assert [loc.box for loc in located[3:]] == [vlm.profile.read_box(c.text, images[1].size) for c in groups[1]]


def test_tiny_locate_default_is_plain_greedy_32_tokens(vlm, scenes, monkeypatch):
    """refloop-tiny's REC answer '<cell_k> {<x1><y1><x2><y2>}' never repeats the expression: the
    default must stay GREEDY exactly (SC-Tune's numbers are reproduced from it bit for bit)."""
    seen = []
    generate = vlm.generate
    monkeypatch.setattr(vlm, "generate", lambda images, prompts, options=GREEDY: seen.append(options) or generate(images, prompts, options))
    images, _ = scenes
    vlm.locate(images, ["the red circle", " ".join(["the left small blue square"] * 8)])
    assert seen == [GREEDY]


def test_tiny_logits_to_keep_equals_the_tail_of_full_logits(vlm, scenes):
    images, _ = scenes
    inputs = vlm._inputs(images, [vlm.profile.caption_prompt(), vlm.profile.rec_prompt("the small red circle")])
    with torch.no_grad():
        full = vlm.model(**inputs).logits
        kept = vlm.model(**inputs, logits_to_keep=3).logits
    assert kept.shape == (2, 3, full.shape[-1])
    # the same positions, equal up to float rounding: the head's matmul over 3 rows may take another
    # BLAS kernel than over all rows (bit for bit on some CPUs, 6e-8 apart on an AMD EPYC)
    torch.testing.assert_close(kept, full[:, -3:], rtol=1.3e-6, atol=1e-6)
    assert not torch.allclose(kept, full[:, -4:-1], atol=1e-3)  # one position off is far from it


def _full_sequence_logprobs(vlm: HFVLM, images, prompts, completions) -> list[torch.Tensor]:
    """The former computation: vocabulary logits at every position, then the completion slice."""
    inputs = vlm._inputs(images, prompts)
    prompt_len = inputs["input_ids"].shape[1]
    width = max(len(c) for c in completions)
    ids = torch.tensor([list(c) + [vlm.tokenizer.pad_token_id] * (width - len(c)) for c in completions])
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], ids], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], mask], dim=1)
    with torch.no_grad():
        logits = vlm.model(**inputs).logits[:, prompt_len - 1 : -1].float()
    token_lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    return [token_lp[i, : len(c)] for i, c in enumerate(completions)]


def test_tiny_logprobs_are_bitwise_those_of_full_sequence_logits(vlm, scenes):
    images, boxes = scenes
    prompts = [vlm.profile.reg_prompt(b, img.size) for img, b in zip(images, boxes)]
    torch.manual_seed(3)
    two = GenerateOptions(do_sample=True, max_new_tokens=6, num_return_sequences=2)
    sampled = [c.token_ids for group in vlm.generate(images, prompts, two) for c in group]
    completions = [ids[: 3 + i] for i, ids in enumerate(sampled)]  # right padding: lengths 3..6, one batch of 4
    images, prompts = [img for img in images for _ in range(2)], [p for p in prompts for _ in range(2)]
    expected = _full_sequence_logprobs(vlm, images, prompts, completions)
    got = vlm.logprobs(images, prompts, completions)
    assert [len(g) for g in got] == [3, 4, 5, 6]
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_full_vocab_rows_are_log_distributions_that_gather_to_token_logprobs(vlm, scenes):
    images, _ = scenes
    prompts = [vlm.profile.caption_prompt(), vlm.profile.rec_prompt("the circle")]
    completions = [vlm.answer_ids("two red circles"), vlm.answer_ids(vlm.profile.rec_answer(Box(10, 10, 40, 40), images[1].size))]
    tokens = vlm.logprobs(images, prompts, completions)
    rows = vlm.logprobs(images, prompts, completions, full_vocab=True)
    for row, token, ids in zip(rows, tokens, completions):
        assert row.shape == (len(ids), len(vlm.tokenizer))
        torch.testing.assert_close(row.logsumexp(-1), torch.zeros(len(ids)), atol=1e-5, rtol=0)
        assert torch.equal(row.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1), token)
