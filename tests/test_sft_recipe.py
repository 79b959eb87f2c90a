"""`refloop sft`: the recipe job end to end on a tiny random model, resume, vocabulary extension and
vision-tower LoRA placement."""

import json
import re

import pytest
import torch
import yaml
from helpers import run_cli, save_tiny_random, tiny_random_model
from safetensors.torch import load_file
from typer.testing import CliRunner

from refloop.cli import app
from refloop.data.rc import build_rc_data, load_rc_annotations
from refloop.errors import RefloopError
from refloop.methods.sft_recipe import SFTRecipe, run_sft, unknown_words
from refloop.models.lora import VISION_MODULE, language_model_targets, vision_targets
from refloop.training.adapters import LoraSettings, NamedAdapters

SFT_SMALL = {"epochs": 1, "batch_size": 4, "lr": 1e-3, "lora": {"r": 4, "alpha": 8}, "checkpoint_every": 1, "generation_batch_size": 8}


@pytest.fixture(scope="module")
def rc_file(tmp_path_factory):
    """RC samples on two shapes scenes (every task), about a dozen lines."""
    path = tmp_path_factory.mktemp("rc") / "rc.jsonl"
    records, relations, _ = load_rc_annotations("crowded", num_images=2)
    build_rc_data(records, path, None, "refloop-tiny", 0, 1, relations)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_random(tmp_path_factory.mktemp("tiny") / "model")


def write_recipe(tmp_path, model_dir, rc_file, **fields) -> str:
    data = {"model": str(model_dir), "train_data": str(rc_file), "device": "cpu", "dtype": "fp32", "threads": 1, "sft": SFT_SMALL} | fields
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_cli_trains_and_exports_adapter_and_merged_checkpoint_that_loads(tmp_path, model_dir, rc_file):
    from refloop.models import load_vlm

    recipe = write_recipe(tmp_path, model_dir, rc_file, vision_lora=True)
    result = CliRunner().invoke(app, ["sft", "--config", recipe, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["examples"] == len(rc_file.read_text().splitlines()) and results["steps"] >= 1
    assert results["added_words"], "rc-data prompts use words refloop-tiny's tokenizer lacks"
    assert (run / "curves.png").exists()
    adapter = run / "adapters" / "sft"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert any("vision" in k and "lora_A" in k for k in tensors)
    assert any("trainable_tokens_delta" in k for k in tensors)
    vlm = load_vlm(str(run / "merged"), device="cpu", dtype="fp32")
    tok = vlm.processor.tokenizer
    assert all(tok.convert_tokens_to_ids(w) != tok.unk_token_id for w in results["added_words"])
    assert vlm.model.get_input_embeddings().weight.shape[0] == len(tok)
    assert not unknown_words(tok, [json.loads(line)["prompt"] for line in rc_file.read_text().splitlines()])
    from PIL import Image

    out = vlm.generate([Image.new("RGB", (112, 112))], ["<image> describe this image ."])
    assert isinstance(out[0][0].text, str)
    # the adapter's card, run as written in a fresh interpreter, loads it (the base's embeddings resized
    # to the extended vocabulary first: PeftModel raised IndexError without) and equals merged/
    import subprocess
    import sys

    card = (adapter / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0].replace("path/to/this/folder", str(adapter))
    check = (
        "\nmerged = model.merge_and_unload()\n"
        f"reference = AutoModelForImageTextToText.from_pretrained({str(run / 'merged')!r})\n"
        "ours, theirs = merged.state_dict(), reference.state_dict()\n"
        "print(max(float((ours[k] - theirs[k]).abs().max()) for k in theirs))"
    )
    done = subprocess.run([sys.executable, "-c", snippet + check], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 1e-5


def test_interrupted_run_resumes_to_identical_adapters(tmp_path, model_dir, rc_file, caplog):
    def recipe():
        return SFTRecipe.model_validate(
            {"model": str(model_dir), "train_data": str(rc_file), "device": "cpu", "dtype": "fp32", "sft": SFT_SMALL | {"epochs": 2}}
        )

    straight = run_sft(recipe(), tmp_path / "straight")
    assert straight["steps"] >= 3

    class Interrupt(Exception):
        pass

    def stop_at_two(row):
        if row["step"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_sft(recipe(), tmp_path / "killed", progress=stop_at_two)
    assert not (tmp_path / "killed" / "results.json").exists()
    with caplog.at_level("INFO", logger="refloop"):
        resumed = run_sft(recipe(), tmp_path / "killed")
    assert straight["resumed_from_step"] == 0 and resumed["resumed_from_step"] > 0  # wall_seconds is this invocation's
    assert f"resuming at step {resumed['resumed_from_step']} of {straight['steps']}" in caplog.text  # said, as the sharded passes say it
    for rel in ("train/checkpoint/weights.safetensors", "adapters/sft/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "straight" / rel), load_file(tmp_path / "killed" / rel)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (rel, key)


def _changed(before: dict, model) -> set[str]:
    return {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("vision", [False, True])
def test_vision_lora_adapts_only_the_intended_modules(vision):
    model, _ = tiny_random_model()
    names = vision_targets(model)
    assert names and all(VISION_MODULE.search(n) for n in names)
    kinds = {type(m) for n, m in model.named_modules() if n in names}
    assert kinds == {torch.nn.Linear, torch.nn.Conv2d}
    lm = language_model_targets(model)
    assert not any(re.fullmatch(lm, n) for n in names), "auto stays language-model only"
    adapters = NamedAdapters(model, LoraSettings(r=2, alpha=4, vision_tower=vision), ["sft"])
    trainable = adapters.parameters("sft")
    adapters.use("sft", trainable=True)
    assert {id(p) for p in adapters.module.parameters() if p.requires_grad} == {id(p) for p in trainable}
    adapted = {n.split(".lora_")[0].removesuffix(".base_layer") for n, _ in adapters.module.named_parameters() if ".lora_A." in n}
    vision_adapted = {n for n in adapted if VISION_MODULE.search(n)}
    assert vision_adapted == (set(names) if vision else set())
    assert adapted - vision_adapted and all(re.fullmatch(lm, n) for n in adapted - vision_adapted)
    # One optimizer step on a loss through the vision tower: only LoRA tensors move, never a base weight.
    before = {n: p.detach().clone() for n, p in adapters.module.named_parameters()}
    for p in trainable:
        p.data.add_(0.01)  # LoRA B starts at zero; move it so every LoRA tensor gets a gradient
    opt = torch.optim.SGD(trainable, lr=0.1)
    pixels = torch.randn(1, 3, 112, 112)
    feats = adapters.module.vision(pixels)[0]
    ids = torch.tensor([[1, 2, 3]])
    loss = feats.square().mean() + adapters.module.embed_tokens(ids).square().mean()
    for layer in adapters.module.layers:
        loss = loss + layer.mlp.up_proj(feats).square().mean()
    loss.backward()
    opt.step()
    changed = _changed(before, adapters.module)
    assert changed and all("lora_" in n for n in changed)
    assert any(VISION_MODULE.search(n) for n in changed) == vision


def test_unknown_words_are_refused_when_extension_is_off(tmp_path, model_dir, rc_file):
    recipe = SFTRecipe.model_validate(
        {"model": str(model_dir), "train_data": str(rc_file), "device": "cpu", "extend_vocabulary": False, "sft": SFT_SMALL}
    )
    with pytest.raises(RefloopError, match="maps to <unk>"):
        run_sft(recipe, tmp_path / "run")


@pytest.mark.parametrize(
    "text", ["train_data: [unclosed", "train_data: x.jsonl\nsft: {batch_size: 0, typo: 1}\nvision_lora: maybe", "model: m"]
)
def test_malformed_recipe_exits_2_naming_the_file(tmp_path, text, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, _, err = run_cli(["sft", "--config", str(path), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "bad.yaml" in err, err  # in this process: a traceback would have raised here
    assert not (tmp_path / "run" / "train").exists()


def test_images_root_rebases_relative_image_paths(tmp_path):
    from refloop.methods.sft_recipe import load_examples

    line = {"id": "a", "image": "img/0.png", "prompt": "<image> count .", "answer": "1", "profile": "refloop-tiny"}
    (tmp_path / "rc.jsonl").write_text(json.dumps(line) + "\n")
    recipe = SFTRecipe(train_data=str(tmp_path / "rc.jsonl"), images=str(tmp_path / "root"))
    assert [ex.image_path for ex in load_examples(recipe, None)] == [str(tmp_path / "root" / "img" / "0.png")]
    assert load_examples(SFTRecipe(train_data=str(tmp_path / "rc.jsonl")), None)[0].image_path == str(tmp_path / "img" / "0.png")
    # an absolute path is outside every root (issue 18: refused before anything is opened, never trained on)
    (tmp_path / "rc.jsonl").write_text(json.dumps(line) + "\n" + json.dumps(line | {"id": "b", "image": "/abs/1.png"}) + "\n")
    with pytest.raises(RefloopError, match=r"record line 2: image path '/abs/1.png' is absolute"):
        load_examples(recipe, None)
