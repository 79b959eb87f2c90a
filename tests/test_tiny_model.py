import pytest
import torch
from helpers import save_tiny_random, scene_images, tiny_random_model
from transformers import AutoModelForImageTextToText, AutoProcessor

from refloop.boxes import Box
from refloop.methods.pretrain import PretrainConfig, encode_pairs, make_batch, smoothed_loss
from refloop.models.hf import HFVLM
from refloop.models.profiles import TinyProfile

profile = TinyProfile()


@torch.no_grad()
def test_generation_with_cache_matches_full_forward():
    model, proc = tiny_random_model()
    _, images = scene_images(3)
    prompts = [profile.rec_prompt("the red circle"), profile.reg_prompt(Box(10, 10, 40, 40), (112, 112)), profile.caption_prompt()]
    inp = proc(images=images, text=prompts)
    out = model.generate(**inp, max_new_tokens=5, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id)
    length = inp["input_ids"].shape[1]
    mask = torch.cat([inp["attention_mask"], torch.ones(3, out.shape[1] - length, dtype=torch.long)], dim=1)
    full = model(input_ids=out, attention_mask=mask, pixel_values=inp["pixel_values"]).logits
    assert torch.equal(full[:, length - 1 : -1].argmax(-1), out[:, length:])


@torch.no_grad()
def test_left_padding_does_not_change_logits():
    model, proc = tiny_random_model()
    _, images = scene_images(2)
    short, long = profile.rec_prompt("the circle"), profile.rec_prompt("the left small red circle")
    batch = model(**proc(images=images, text=[short, long])).logits[0, -1]
    alone = model(**proc(images=images[:1], text=[short])).logits[0, -1]
    assert torch.allclose(batch, alone, atol=1e-5)


@torch.no_grad()
def test_shared_image_training_path_equals_plain_forward():
    model, proc = tiny_random_model()
    cfg = PretrainConfig(batch_scenes=3, queries_per_scene=3)
    batch = make_batch(0, cfg, proc, profile)
    n = model.config.num_cells
    ids = torch.cat([torch.full((batch["input_ids"].shape[0], n), model.config.image_token_id), batch["input_ids"]], dim=1)
    mask = torch.cat([torch.ones(ids.shape[0], n, dtype=torch.long), batch["attention_mask"]], dim=1)
    plain = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], image_index=batch["image_index"]).logits
    shared = model.forward_shared_images(batch["pixel_values"], batch["image_index"], batch["input_ids"], batch["attention_mask"])
    keep = batch["attention_mask"].bool()
    assert torch.allclose(plain[:, n:][keep], shared[keep], atol=1e-4)


@torch.no_grad()
def test_region_token_reads_the_box_before_it():
    model, proc = tiny_random_model()
    _, images = scene_images(1)
    a = model(**proc(images=images, text=[profile.reg_prompt(Box(5, 5, 30, 30), (112, 112))])).logits[0, -1]
    b = model(**proc(images=images, text=[profile.reg_prompt(Box(60, 60, 100, 100), (112, 112))])).logits[0, -1]
    assert not torch.allclose(a, b)


def test_rec_answer_starts_with_pointer_to_centre_cell():
    assert profile.rec_answer(Box(0, 0, 16, 16), (112, 112)) == "<cell_0> {<0><0><14><14>}"
    assert profile.rec_answer(Box(96, 96, 112, 112), (112, 112)).startswith("<cell_48> ")
    assert profile.read_expression("<cell_3> the red circle") == "the red circle"


def test_smoothed_loss_is_cross_entropy_without_smoothing():
    logits = torch.randn(2, 4, 300)
    labels = torch.tensor([[-100, 7, 150, 2], [-100, -100, 9, 3]])
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert smoothed_loss(logits, labels, coord_start=100, bins=101, sigma=0.0) == pytest.approx(plain.item(), rel=1e-5)
    assert smoothed_loss(logits, labels, coord_start=100, bins=101, sigma=1.0) != pytest.approx(plain.item(), rel=1e-5)


def test_encode_pairs_labels_only_answer_tokens():
    _, proc = tiny_random_model()
    _, images = scene_images(1)
    batch = encode_pairs(proc, images, [profile.caption_prompt()], ["a red circle"], [0])
    labelled = [t for t in batch["labels"][0].tolist() if t != -100]
    assert proc.tokenizer.convert_ids_to_tokens(labelled) == ["a", "red", "circle", "<eos>"]


def test_checkpoint_loads_through_auto_classes(tmp_path):
    path = save_tiny_random(tmp_path / "ckpt")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    original, _ = tiny_random_model()
    _, images = scene_images(1)
    inp = processor(images=images, text=[profile.caption_prompt()])
    with torch.no_grad():
        assert torch.allclose(model(**inp).logits, original(**inp).logits, atol=1e-6)


def test_logprobs_use_the_real_mask_and_match_one_by_one(tmp_path):
    vlm = HFVLM.from_pretrained(save_tiny_random(tmp_path / "ckpt"), device="cpu", batch_size=4)
    _, images = scene_images(3)
    prompts = [profile.rec_prompt("the circle"), profile.rec_prompt("the left small red circle"), profile.caption_prompt()]
    tok = vlm.tokenizer
    comps = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in ["<cell_3> {<1><2><3><4>}", "the", "two red circles"]]
    batched = vlm.logprobs(images, prompts, comps)
    for i in range(3):
        alone = vlm.logprobs(images[i : i + 1], prompts[i : i + 1], comps[i : i + 1])[0]
        assert batched[i].shape == (len(comps[i]),)
        assert torch.allclose(batched[i], alone, atol=1e-5)
    # Teacher-forced greedy tokens must be the argmax at every step.
    (greedy,) = vlm.generate(images[:1], prompts[:1])
    lp = vlm.logprobs(images[:1], prompts[:1], [greedy[0].token_ids])[0]
    full = vlm.model(**vlm._inputs(images[:1], prompts[:1]))
    first = torch.log_softmax(full.logits[0, -1], -1)
    assert lp[0].item() == pytest.approx(first.max().item(), abs=1e-5)


def test_generation_encodes_each_image_once_and_feeds_one_token_per_step():
    """generate() hands the cache over under transformers' current name; a model that missed it
    would re-encode the image and the whole prefix at every step (same tokens, several times slower)."""
    from refloop.models.base import GenerateOptions

    model, processor = tiny_random_model()
    vlm = HFVLM(model, processor, TinyProfile(), batch_size=4)
    scenes, images = scene_images(3)
    encoded, fed = [], []
    encode = model.encode_images
    model.encode_images = lambda pixels: (encoded.append(pixels.shape[0]), encode(pixels))[1]
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        vlm.generate(images, [vlm.profile.caption_prompt()] * 3, GenerateOptions(max_new_tokens=6))
    finally:
        hook.remove()
    assert encoded == [3]
    assert len(fed) > 1 and fed[0] > 1 and set(fed[1:]) == {1}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_weights_describe_locate_and_score(tmp_path, dtype):
    """What GPU users run: the region token's box lattice follows the weights' dtype (boxes come
    from the processor in fp32; bf16 / fp16 weights crashed in grid_sample)."""
    vlm = HFVLM.from_pretrained(save_tiny_random(tmp_path / "m"), device="cpu", dtype=dtype, batch_size=2)
    scenes, images = scene_images(2)
    boxes = [s.objects[0].box for s in scenes]
    captions = vlm.describe(images, boxes)
    assert len(captions) == 2 and len(vlm.locate(images, captions)) == 2
    (logp,) = vlm.logprobs(images[:1], [vlm.profile.reg_prompt(boxes[0], images[0].size)], [vlm.answer_ids("a red circle")])
    assert torch.isfinite(logp).all()
