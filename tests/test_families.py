"""Every supported real model family, as a tiny random-weight instance built offline: loading
through the public entry point, the prompts of the model cards, describe/locate/caption,
log-probs equal to what generate() computes, and one SC-Tune step of each phase."""

from __future__ import annotations

import re

import families
import pytest
import torch
from helpers import scene_box_items

from refloop.boxes import Box
from refloop.methods.sctune import SCTune, SCTuneConfig
from refloop.models.hf import HFVLM
from refloop.models.processors import save_processor

# builder in tests/families.py -> profile chosen from the checkpoint's config
FAMILIES = {
    "qwen2_vl": "qwen2-vl",
    "qwen2_5_vl": "qwen2.5-vl",
    "qwen3_vl": "qwen3-vl",
    "florence_2": "florence-2",
    "kosmos_2": "kosmos-2",
    "paligemma": "paligemma",
    "paligemma2": "paligemma",
    "internvl": "internvl",
}


def _build(name: str):
    if name == "paligemma2":
        return families.paligemma(version=2)
    return getattr(families, name)()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(builder name, HFVLM loaded from a saved checkpoint directory)."""
    model, processor = _build(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    save_processor(processor, directory)
    vlm = HFVLM.from_pretrained(directory, device="cpu", dtype="fp32", batch_size=4)
    return request.param, vlm


@pytest.fixture(scope="module")
def items():
    return scene_box_items(1)[:3]


def test_profile_is_chosen_from_the_config(family):
    name, vlm = family
    assert vlm.profile.name == FAMILIES[name]
    assert vlm.encoder_decoder == (name == "florence_2")


def test_inspect_reports_profile_prompts_and_lora_targets_without_weights(family):
    from refloop.models.inspection import inspect_checkpoint

    name, vlm = family
    report = inspect_checkpoint(vlm.name)
    assert report["profile"] == FAMILIES[name] and report["model_type"] == vlm.model.config.model_type
    assert report["parameters"] == sum(p.numel() for p in vlm.model.parameters())
    assert report["lora"]["adapted_linear_layers"] > 0 and report["lora"]["adapted_outside_language_model"] == []
    assert report["example"]["rec_prompt"] == vlm.profile.rec_prompt("the red mug on the left")


def test_describe_locate_caption_run(family, items):
    _, vlm = family
    images = [it.image for it in items]
    captions = vlm.describe(images, [it.box for it in items])
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    located = vlm.locate(images, ["the red circle", "a blue square", "it"])
    assert len(located) == 3 and all(loc.box is None or isinstance(loc.box, Box) for loc in located)
    assert all(isinstance(c, str) for c in vlm.caption(images[:2]))


def _generation_logprobs(vlm: HFVLM, images, prompts):
    """Greedy generation's own raw logits, log-softmaxed at the chosen tokens (in the batches
    HFVLM.generate would use)."""
    ids, logps = [None] * len(prompts), [None] * len(prompts)
    for batch in vlm._generation_batches(prompts):
        got_ids, got_lp = _generate_batch(vlm, [images[i] for i in batch], [prompts[i] for i in batch])
        for row, i in enumerate(batch):
            ids[i], logps[i] = got_ids[row], got_lp[row]
    return ids, logps


def _generate_batch(vlm: HFVLM, images, prompts):
    inputs = vlm._inputs(images, prompts)
    out = vlm.model.generate(
        **inputs,
        do_sample=False,
        min_new_tokens=5,
        max_new_tokens=5,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=vlm.tokenizer.pad_token_id,
        suppress_tokens=vlm.suppress_tokens,
    )
    skip = 1 if vlm.encoder_decoder else inputs["input_ids"].shape[1]
    ids = out.sequences[:, skip:]
    steps = torch.stack(out.logits, dim=1).float().log_softmax(-1)
    return ids.tolist(), steps.gather(-1, ids[..., None]).squeeze(-1)


def test_logprobs_equal_what_generate_computes(family, items):
    """One teacher-forced forward must reproduce generation's per-step distributions: this
    catches a wrong mask, lost per-token side inputs (Qwen's mm_token_type_ids, PaliGemma's
    token_type_ids, Kosmos-2's image_embeds_position_mask) and wrong decoder inputs."""
    _, vlm = family
    images = [it.image for it in items[:2]]
    prompts = [vlm.profile.rec_prompt("the small red circle"), vlm.profile.caption_prompt()]  # different lengths: padding
    ids, expected = _generation_logprobs(vlm, images, prompts)
    got = vlm.logprobs(images, prompts, ids)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=2e-4, rtol=1e-4)


def _answers(vlm: HFVLM, items):
    images = [it.image for it in items[:2]]
    prompts = [vlm.profile.rec_prompt("the small red circle"), vlm.profile.caption_prompt()]
    answers = [vlm.answer_ids(vlm.profile.rec_answer(items[0].box, images[0].size, "the red circle")), vlm.answer_ids("a red circle")]
    return images, prompts, answers


def test_full_vocab_rows_gather_to_the_token_logprobs(family, items):
    """SVP's Eq. 5-6 read whole next-token distributions at the answer positions."""
    _, vlm = family
    images, prompts, answers = _answers(vlm, items)
    tokens = vlm.logprobs(images, prompts, answers)
    rows = vlm.logprobs(images, prompts, answers, full_vocab=True)
    for row, token, ids in zip(rows, tokens, answers, strict=True):
        assert row.shape == (len(ids), vlm.model.get_output_embeddings().out_features)
        torch.testing.assert_close(row.logsumexp(-1), torch.zeros(len(ids)), atol=1e-5, rtol=0)
        assert torch.equal(row.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1), token)


def test_logprobs_project_only_answer_positions_onto_the_vocabulary(family, items):
    """With ~1000 image tokens the prompt's vocabulary logits dominate memory: none are computed
    (decoder-only: the answer's positions and the last prompt position; encoder-decoder: the decoder's)."""
    _, vlm = family
    images, prompts, answers = _answers(vlm, items)
    positions = []
    hook = vlm.model.get_output_embeddings().register_forward_hook(lambda module, args, out: positions.append(out.shape[1]))
    try:
        vlm.logprobs(images, prompts, answers)
    finally:
        hook.remove()
    width = max(len(a) for a in answers)
    assert positions == [width if vlm.encoder_decoder else width + 1]


def test_greedy_locate_budget_fits_the_familys_whole_answer(family):
    """The greedy REC budget covers the family's own answer for the longest expression and a box
    with four-digit coordinates (families repeating the expression need more than 32 tokens, so a
    long model-written description is not cut off before the box, or before its end)."""
    name, vlm = family
    long = "the small red circle left of the big blue square above the green triangle"
    budget = vlm._locate_budget(["the circle", long])
    answer = vlm.profile.rec_answer(Box(1234.0, 1234.0, 2345.0, 2345.0), (4000, 4000), long)
    assert budget >= max(32, len(vlm.tokenizer.encode(answer, add_special_tokens=False)))
    longer = " and ".join([long] * 3)
    answer = vlm.profile.rec_answer(Box(1234.0, 1234.0, 2345.0, 2345.0), (4000, 4000), longer)
    assert vlm._locate_budget([longer]) >= len(vlm.tokenizer.encode(answer, add_special_tokens=False))
    if name != "kosmos_2":  # Kosmos-2 answers with patch tokens only; the others repeat the expression
        assert vlm._locate_budget([longer]) > 32 + len(vlm.tokenizer.encode(long, add_special_tokens=False))


def test_batched_generation_equals_one_by_one(family, items):
    """Left padding must not change what a prompt generates (Kosmos-2's incremental position ids
    count pads, so its profile generates in equal-length batches)."""
    _, vlm = family
    images = [it.image for it in items[:2]]
    prompts = [vlm.profile.rec_prompt("the small red circle"), vlm.profile.caption_prompt()]
    together = vlm.generate(images, prompts)
    alone = [vlm.generate([img], [p])[0] for img, p in zip(images, prompts, strict=True)]
    assert [g[0].token_ids for g in together] == [g[0].token_ids for g in alone]


def test_rec_answer_round_trips_through_the_tokenizer(family, items):
    """What the locator is trained to write decodes and parses back to the box."""
    _, vlm = family
    image, box = items[0].image, items[0].box
    text = vlm.profile.decode(vlm.tokenizer, vlm.answer_ids(vlm.profile.rec_answer(box, image.size, "the red circle")))
    parsed = vlm.profile.read_box(text, image.size)
    step = vlm.profile.codec.step * max(image.size) * 2 + 1e-6
    assert parsed is not None
    assert max(abs(a - b) for a, b in zip(parsed.as_list(), box.as_list(), strict=True)) <= max(step, 1.0)


def test_one_sctune_step_per_phase_trains_only_the_language_model(family, items):
    _, vlm = family
    cfg = SCTuneConfig(
        batch_size=2,
        ppo_epochs=1,
        max_new_tokens=6,
        describer_lr=1e-2,
        locator_lr=1e-2,
        generation_batch_size=4,
        lora={"r": 2, "alpha": 4},
    )
    # A fresh base per test: the adapters are injected into the module.
    sctune = SCTune.from_base(_fresh(vlm), cfg, items[:2])
    adapted = [n for n, m in sctune.adapters.module.named_modules() if hasattr(m, "lora_A")]
    assert adapted and not any(re.search(r"vision|visual|image_to_text|projector", n) for n in adapted)
    before = {role: sctune.adapters.adapter_state(role) for role in ("describer", "locator")}
    stats = sctune.describer_step(items[:2])
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    after = sctune.adapters.adapter_state("describer")
    assert any(not torch.equal(before["describer"][k], after[k]) for k in after)
    assert all(torch.equal(before["locator"][k], v) for k, v in sctune.adapters.adapter_state("locator").items())
    stats = sctune.locator_step(items[:2], step=0)
    assert stats["loss"] > 0 and torch.isfinite(torch.tensor(stats["loss"]))
    after = sctune.adapters.adapter_state("locator")
    assert any(not torch.equal(before["locator"][k], after[k]) for k in after)


def _fresh(vlm: HFVLM) -> HFVLM:
    import copy

    return HFVLM(copy.deepcopy(vlm.model), vlm.processor, vlm.profile, name=vlm.name, batch_size=vlm.batch_size)


@pytest.mark.parametrize("builder", list(FAMILIES))
def test_sctune_recipe_runs_end_to_end_on_a_real_family(builder, tmp_path):
    """`refloop sctune` with a real family: data, both phases, export of the merged model (which
    loads back with the same profile), evaluation before and after."""
    from refloop.methods.sctune_recipe import SCTuneRecipe, run_sctune

    model, processor = _build(builder)
    model.save_pretrained(tmp_path / "base")
    save_processor(processor, tmp_path / "base")
    recipe = SCTuneRecipe(
        model=str(tmp_path / "base"),
        train_data="in-domain",
        train_images=6,
        min_area_fraction=0.0,
        eval_data=["in-domain"],
        eval_boxes=3,
        device="cpu",
        dtype="fp32",
        threads=1,
        sctune={"phases": 2, "describer_steps": 1, "locator_steps": 1, "batch_size": 2, "max_new_tokens": 5, "lora": {"r": 2, "alpha": 4}},
    )
    results = run_sctune(recipe, tmp_path / "run")
    assert set(results["base"]) == set(results["tuned"]) == {"in-domain"}
    assert (tmp_path / "run" / "curves.png").exists()
    merged = HFVLM.from_pretrained(tmp_path / "run" / "merged", device="cpu")
    assert merged.profile.name == FAMILIES[builder]
    assert not any("lora" in n for n, _ in merged.model.named_parameters())
    assert "(the `locator` adapter folded into the base weights)" in (tmp_path / "run" / "merged" / "README.md").read_text()


@pytest.mark.parametrize("builder", ["florence_2", "kosmos_2"])
def test_cli_consistency_and_eval_on_a_real_family(builder, tmp_path):
    import json

    from typer.testing import CliRunner

    from refloop.cli import app

    model, processor = _build(builder)
    model.save_pretrained(tmp_path / "model")
    save_processor(processor, tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--device", "cpu", "--batch-size", "4"]
    runner = CliRunner()
    result = runner.invoke(
        app, ["consistency", "--data", "in-domain", "--num-boxes", "3", "--no-report", "--out", str(tmp_path / "c"), *common]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["num_boxes"] == 3
    for task in ("rec", "reg"):
        out = tmp_path / task
        args = ["eval", task, "--data", "in-domain", "--limit", "3", "--out", str(out), "--profile", FAMILIES[builder], *common]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert json.loads((out / f"{task}_metrics.json").read_text())["num"] == 3


@pytest.mark.parametrize("builder", ["qwen2_5_vl", "florence_2"])
def test_bf16_weights_run_both_phases(builder, tmp_path, items):
    """What GPU users run: bf16 weights (log-probs are computed in fp32 from bf16 logits)."""
    model, processor = _build(builder)
    model.save_pretrained(tmp_path)
    save_processor(processor, tmp_path)
    vlm = HFVLM.from_pretrained(tmp_path, device="cpu", dtype="bf16", batch_size=4)
    assert next(vlm.model.parameters()).dtype == torch.bfloat16
    cfg = SCTuneConfig(batch_size=2, ppo_epochs=1, max_new_tokens=4, lora={"r": 2, "alpha": 4})
    sctune = SCTune.from_base(vlm, cfg, items[:2])
    assert all(torch.isfinite(torch.tensor(v)) for v in sctune.describer_step(items[:2]).values())
    assert torch.isfinite(torch.tensor(sctune.locator_step(items[:2], step=0)["loss"]))
