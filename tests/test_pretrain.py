import math

import pytest
import torch
from safetensors.torch import load_file

from refloop.errors import RefloopError
from refloop.methods.pretrain import PretrainConfig, lr_at, pretrain, run_pretrain_tiny

SMALL = dict(
    steps=5,
    batch_scenes=2,
    queries_per_scene=2,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    warmup_steps=2,
    curriculum_steps=2,
    eval_every=1000,
    eval_scenes=4,
    checkpoint_every=2,
    threads=1,
)


class Killed(Exception):
    pass


def test_killed_then_resumed_run_ends_with_the_same_weights(tmp_path):
    cfg = PretrainConfig(**SMALL)
    pretrain(cfg, tmp_path / "straight", export_dir=tmp_path / "straight-out")

    def kill_at_step_3(record):
        if record["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        pretrain(cfg, tmp_path / "resumed", progress=kill_at_step_3)
    # Simulate a kill inside the checkpoint swap: only checkpoint.old is left.
    (tmp_path / "resumed" / "checkpoint").rename(tmp_path / "resumed" / "checkpoint.old")
    pretrain(cfg, tmp_path / "resumed", export_dir=tmp_path / "resumed-out")
    a = load_file(tmp_path / "straight-out" / "model.safetensors")
    b = load_file(tmp_path / "resumed-out" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resuming_with_another_config_is_refused(tmp_path):
    pretrain(PretrainConfig(**(SMALL | {"steps": 1})), tmp_path / "run")
    with pytest.raises(RefloopError, match="another config"):
        pretrain(PretrainConfig(**(SMALL | {"steps": 1, "lr": 1e-4})), tmp_path / "run")


def test_the_exported_model_records_its_recipe_and_another_recipe_needs_overwrite(tmp_path):
    """Pretraining runs through the one recipe wrapper: the exported model folder holds recipe.json
    (its provenance) and no results.json or model card; another recipe is refused before any
    step unless --overwrite, which replaces refloop's files and keeps the user's (a hand-written
    README.md)."""
    cfg, other = PretrainConfig(**(SMALL | {"steps": 1})), PretrainConfig(**(SMALL | {"steps": 1, "lr": 1e-4}))
    out = tmp_path / "model"
    run_pretrain_tiny(cfg, out, tmp_path / "work")
    assert PretrainConfig.model_validate_json((out / "recipe.json").read_text()) == cfg
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "training_log.jsonl", "learning_curves.png"} <= files
    assert not {"results.json", "README.md"} & files
    (out / "README.md").write_text("hand-written")
    weights = (out / "model.safetensors").read_bytes()
    run_pretrain_tiny(cfg, out, tmp_path / "work")  # the same recipe: resumes (finished: nothing to do)
    with pytest.raises(RefloopError, match="holds outputs of another run.*--overwrite"):
        run_pretrain_tiny(other, out, tmp_path / "work-other")
    assert not (tmp_path / "work-other").exists()  # refused before the first step
    assert (out / "model.safetensors").read_bytes() == weights
    assert PretrainConfig.model_validate_json((out / "recipe.json").read_text()) == cfg
    run_pretrain_tiny(other, out, tmp_path / "work-other", overwrite=True)
    assert PretrainConfig.model_validate_json((out / "recipe.json").read_text()) == other
    assert (out / "model.safetensors").read_bytes() != weights
    assert (out / "README.md").read_text() == "hand-written"


def test_unknown_config_field_is_an_error():
    with pytest.raises(ValueError, match="extra"):
        PretrainConfig(stepz=3)


def test_lr_schedule_warmup_cosine_then_cooldown_to_the_floor():
    cfg = PretrainConfig(lr=1.0, warmup_steps=10, steps=100, cosine_steps=200, cooldown_steps=20, min_lr_ratio=0.1)

    def cosine(step):  # the decay laid out over 200 steps, after 10 of warm-up
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 190))

    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(50, cfg) == pytest.approx(cosine(50))
    assert lr_at(80, cfg) == pytest.approx(cosine(80))  # the cooldown starts here
    assert lr_at(90, cfg) == pytest.approx(cosine(90) + (0.1 - cosine(90)) * 0.5)
    assert lr_at(100, cfg) == pytest.approx(0.1)
