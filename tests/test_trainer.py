"""The shared trainer, SFT loss and named adapters: what every method inherits."""

import json
import math

import pytest
import torch
import yaml
from helpers import scene_images, tiny_random_model

from refloop.config import load_recipe
from refloop.data.records import InstructionExample
from refloop.errors import RefloopError
from refloop.models.hf import HFVLM
from refloop.models.profiles import TinyProfile
from refloop.training.adapters import REFERENCE, LoraSettings, NamedAdapters
from refloop.training.losses import answer_nll
from refloop.training.sft import SFT, SFTConfig, epoch_order
from refloop.training.trainer import step_seed


def _vlm(seed: int = 0) -> HFVLM:
    model, processor = tiny_random_model(seed=seed)
    return HFVLM(model, processor, TinyProfile(), batch_size=8)


def _examples(n: int = 6) -> list[InstructionExample]:
    scenes, images = scene_images(n)
    profile = TinyProfile()
    out = []
    for i, (scene, image) in enumerate(zip(scenes, images)):
        obj = scene.objects[0]
        out.append(
            InstructionExample("", profile.reg_prompt(obj.box, image.size), f"the {obj.colour} {obj.shape}", image=image, example_id=str(i))
        )
    return out


SMALL_SFT = dict(batch_size=4, lr=5e-3, lora=LoraSettings(r=4, alpha=8), checkpoint_every=1, generation_batch_size=8, epochs=2)


def test_sft_loss_is_the_nll_of_answer_tokens_only():
    """answer_nll equals the model's own cross-entropy with every prompt position labelled -100."""
    vlm = _vlm()
    (example,) = _examples(1)
    target = vlm.answer_ids(example.answer)
    with torch.no_grad():
        ours = answer_nll(vlm, [example.image], [example.prompt], [target])
        inputs = vlm._inputs([example.image], [example.prompt])
        prompt_len = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([target])], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        labels = inputs["input_ids"].clone()
        labels[:, :prompt_len] = -100
        reference = vlm.model(**inputs, labels=labels).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    # A different prompt changes the loss only through the answer's conditioning, never by counting prompt tokens.
    longer = answer_nll(vlm, [example.image], [example.prompt + " extra words here"], [target])
    assert longer.item() != pytest.approx(ours.item()) and longer.item() > 0


def test_epoch_order_visits_every_example_once_per_epoch():
    steps = [epoch_order(10, 4, s, seed=3) for s in range(5)]
    flat = [i for s in steps for i in s]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert epoch_order(10, 4, 2, seed=3) == steps[2]
    assert epoch_order(10, 4, 0, seed=4) != steps[0]


def _sft_weights(tmp_path, name: str, **overrides) -> tuple[dict, list[dict]]:
    sft = SFT(_vlm(), SFTConfig(**(SMALL_SFT | overrides)), _examples())
    sft.run(tmp_path / name)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return sft.adapters.state_dict(), rows


def test_micro_batches_give_the_same_sft_update(tmp_path):
    start = {k: v.detach().clone() for k, v in SFT(_vlm(), SFTConfig(**SMALL_SFT), _examples()).adapters.state_dict().items()}
    whole, _ = _sft_weights(tmp_path, "whole")
    micro, _ = _sft_weights(tmp_path, "micro", micro_batch_size=1)
    assert whole.keys() == micro.keys() == start.keys()
    moved = [k for k in whole if not torch.allclose(whole[k], start[k], rtol=0, atol=1e-4)]
    assert len(moved) >= len(whole) // 2, "the update must move the adapter (a no-op update would pass the comparison)"
    for key in whole:
        torch.testing.assert_close(whole[key], micro[key], rtol=1e-4, atol=1e-6)


def test_sft_sets_each_steps_learning_rate_from_its_schedule(tmp_path):
    """Constant by default; with lr_schedule cosine the rate warms up linearly, then decays to 0
    over the run (SVP Table 11), and the shared trainer logs the rate each step trained at."""
    from refloop.training.schedules import warmup_cosine

    assert warmup_cosine(0, 1.0, 4, 20) == 0.25 and warmup_cosine(3, 1.0, 4, 20) == 1.0
    assert warmup_cosine(4, 1.0, 4, 20) == 1.0 and warmup_cosine(12, 1.0, 4, 20) == pytest.approx(0.5)
    assert warmup_cosine(20, 1.0, 4, 20) == pytest.approx(0.0) and warmup_cosine(30, 1.0, 4, 20, min_ratio=0.1) == pytest.approx(0.1)
    _, constant = _sft_weights(tmp_path, "constant", epochs=4)  # 6 steps of 4 examples over 6
    assert [r["lr"] for r in constant] == [5e-3] * 6
    _, cosine = _sft_weights(tmp_path, "cosine", epochs=4, lr_schedule="cosine", warmup_ratio=0.2)  # 2 warm-up steps
    expected = [5e-3 / 2, 5e-3] + [5e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(3)]
    assert [r["lr"] for r in cosine][:5] == pytest.approx(expected) and 0 < cosine[5]["lr"] < cosine[4]["lr"]
    sft = SFT(_vlm(), SFTConfig(**(SMALL_SFT | {"epochs": 4, "warmup_ratio": 0.5})), _examples())
    assert [sft.lr_at(s) for s in range(6)] == pytest.approx([5e-3 / 3, 5e-3 * 2 / 3] + [5e-3] * 4)


class Killed(Exception):
    pass


def test_killed_sft_run_resumes_to_the_same_adapter_and_log(tmp_path):
    straight, straight_rows = _sft_weights(tmp_path, "straight")
    assert len(straight_rows) == 3
    cfg = SFTConfig(**SMALL_SFT)

    def kill_at_step_2(row):
        if row["step"] == 2:
            raise Killed

    with pytest.raises(Killed):
        SFT(_vlm(), cfg, _examples()).run(tmp_path / "resumed", progress=kill_at_step_2)
    resumed = SFT(_vlm(), cfg, _examples())
    resumed.run(tmp_path / "resumed")
    for key, value in resumed.adapters.state_dict().items():
        assert torch.equal(value, straight[key]), key
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    timing = {"elapsed_s", "step_seconds", "tokens_per_s", "peak_memory_mb"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows] == [
        {k: v for k, v in r.items() if k not in timing} for r in straight_rows
    ]


def test_metrics_rows_carry_lr_throughput_and_memory(tmp_path):
    _, rows = _sft_weights(tmp_path, "run", epochs=1)
    for row in rows:
        assert row["lr"] == pytest.approx(5e-3)
        assert row["tokens_per_s"] > 0 and row["peak_memory_mb"] > 0 and row["answer_tokens"] > 0


def test_resume_with_another_config_is_refused(tmp_path):
    _sft_weights(tmp_path, "run", epochs=1)
    with pytest.raises(RefloopError, match="another config"):
        _sft_weights(tmp_path, "run", epochs=1, lr=1e-3)


def test_three_named_adapters_train_and_sync_independently():
    model, _ = tiny_random_model()
    names = ("describer", "locator", "critic")
    adapters = NamedAdapters(model, LoraSettings(r=2, alpha=4), names, reference="snapshot")
    params = {n: adapters.parameters(n) for n in (*names, REFERENCE)}
    ids = {n: {id(p) for p in ps} for n, ps in params.items()}
    assert all(not (ids[a] & ids[b]) for a in ids for b in ids if a != b)
    assert len({len(ps) for ps in params.values()}) == 1
    adapters.use("critic", trainable=True)
    assert [n for n, ps in params.items() if all(p.requires_grad for p in ps)] == ["critic"]
    assert not any(p.requires_grad for n, p in adapters.module.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        for p in params["critic"]:
            p.add_(1.0)
    adapters.copy("critic", "locator")
    assert all(torch.equal(a, b) for a, b in zip(params["critic"], params["locator"]))
    assert not any(torch.equal(a, b) for a, b in zip(params["critic"], params["describer"]) if a.abs().sum() > 0)
    state = adapters.state_dict()
    assert {k.split("/")[0] for k in state} == {*names, REFERENCE}
    with pytest.raises(ValueError, match="unique"):
        NamedAdapters(tiny_random_model()[0], LoraSettings(r=2, alpha=4), ("twin", "twin"))
    with pytest.raises(ValueError, match="reference"):
        NamedAdapters(tiny_random_model()[0], LoraSettings(r=2, alpha=4), ("policy", REFERENCE))


def test_adapter_views_switch_the_active_adapter_per_call():
    vlm = _vlm()
    adapters = NamedAdapters(vlm.model, LoraSettings(r=2, alpha=4), ("first", "second"))
    vlm = HFVLM(adapters.module, vlm.processor, vlm.profile, batch_size=8)
    for p in adapters.parameters("second"):
        torch.nn.init.normal_(p, std=0.5)
    (example,) = _examples(1)
    ids = [vlm.answer_ids(example.answer)]

    def logp(view):
        return view.logprobs([example.image], [example.prompt], ids)[0]

    a, b, ref = adapters.view(vlm, "first"), adapters.view(vlm, "second"), adapters.view(vlm, REFERENCE)
    first_a = logp(a)
    assert not torch.allclose(first_a, logp(b))
    torch.testing.assert_close(logp(a), first_a)
    torch.testing.assert_close(logp(ref), first_a)  # "first" is untrained (LoRA B = 0): equal to the base
    with pytest.raises(KeyError, match="no adapter named 'c'"):
        adapters.view(vlm, "c")


def test_a_never_trained_adapter_runs_as_the_base_until_its_tensors_change():
    vlm = _vlm()
    adapters = NamedAdapters(vlm.model, LoraSettings(r=2, alpha=4), ("locator", "describer"))
    vlm = HFVLM(adapters.module, vlm.processor, vlm.profile, batch_size=8)
    view = adapters.view(vlm, "locator")
    (example,) = _examples(1)
    ids = [vlm.answer_ids(example.answer)]
    assert adapters.is_identity("locator") and adapters.is_identity("describer")
    lora_calls = []
    lora_layer = next(m for n, m in adapters.module.named_modules() if hasattr(m, "lora_A") and "locator" in m.lora_A)
    hook = lora_layer.lora_A["locator"].register_forward_hook(lambda *a: lora_calls.append(1))
    untrained = view.logprobs([example.image], [example.prompt], ids)[0]
    view.generate([example.image], [example.prompt])
    assert not lora_calls  # no LoRA matmul ran
    with adapters.peft.disable_adapter():
        assert torch.equal(untrained, vlm.logprobs([example.image], [example.prompt], ids)[0])  # bit for bit the base
    # A training forward uses the adapter (gradients reach it) ...
    loss = answer_nll(view, [example.image], [example.prompt], ids)
    assert lora_calls
    loss.backward()
    torch.optim.SGD(adapters.parameters("locator"), lr=1.0).step()
    # ... and once its tensors changed, every call does.
    assert not adapters.is_identity("locator") and adapters.is_identity("describer")
    lora_calls.clear()
    assert not torch.equal(view.logprobs([example.image], [example.prompt], ids)[0], untrained)
    assert lora_calls
    hook.remove()


def test_step_seeds_are_named_streams():
    assert step_seed(2, 5, "batch") != step_seed(2, 5, "mix")
    assert step_seed(2, 5, "torch", rank=1) != step_seed(2, 5, "torch", rank=0)
    with pytest.raises(ValueError, match="unknown seed stream"):
        step_seed(0, 0, "dropout")


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("a: [1, 2", [], "not valid YAML"),
        ("!!python/object/apply:os.system ['true']", [], "not valid YAML"),
        ("- 1\n- 2\n", [], "expected a mapping"),
        ("lr: 0.1\n", ["lr.inner=3"], "lr in .* is not a mapping"),
        ("lr: 0.1\n", ["novalue"], "key=value"),
        ("lr: 0.1\n", ["lr=[1"], "not valid YAML"),
        ("batch_size: 0\n", [], "batch_size"),
        ("bogus: 1\n", [], "bogus"),
    ],
)
def test_recipe_errors_are_clear_messages(tmp_path, text, overrides, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RefloopError, match=message):
        load_recipe(SFTConfig, path, overrides)


def test_recipe_overrides_reach_nested_fields(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.1, "lora": {"r": 4}}))
    cfg = load_recipe(SFTConfig, path, ["lora.alpha=16", "epochs=3"])
    assert (cfg.lr, cfg.lora.r, cfg.lora.alpha, cfg.epochs) == (0.1, 4, 16, 3)
    with pytest.raises(RefloopError, match="recipe not found"):
        load_recipe(SFTConfig, tmp_path / "missing.yaml")
