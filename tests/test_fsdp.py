"""FSDP2 through accelerate with two CPU processes (gloo), from the shipped 8-GPU config file.

Tolerances: the locator phase is deterministic (greedy captions, equal-length box answers), so
two FSDP processes on half batches must give one process's adapters up to float summation
order (measured max |diff| 3e-7; asserted 1e-5). PPO samples with per-process seeds, so the
describer is compared with two plain data-parallel processes on the same shards (measured 0).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import refloop.models.tiny  # noqa: F401  (registers refloop-tiny with the Auto classes)
from refloop.errors import RefloopError
from refloop.training import distributed

HERE = Path(__file__).parent
CONFIGS = HERE.parent / "src" / "refloop" / "recipes" / "accelerate"
WORKER = HERE / "dist_fsdp_worker.py"
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def _cpu_config(tmp: Path) -> Path:
    """The shipped FULL_SHARD config, on two CPU processes in full precision."""
    cfg = yaml.safe_load((CONFIGS / "fsdp2-8gpu.yaml").read_text())
    cfg |= {"num_processes": 2, "use_cpu": True, "mixed_precision": "no"}
    path = tmp / "fsdp-cpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(args: list[str], port: int, config: Path | None = None) -> subprocess.CompletedProcess:
    if config is None:  # plain data parallel: the trainer's own gradient all-reduce
        head = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        head = ["--config_file", str(config)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *head, "--main_process_port", str(port), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)


def _worker(out: Path, tune: str, model: str, port: int, config: Path | None, stop_at: int | None = None) -> dict:
    args = [str(WORKER), str(out), tune, model] + ([str(stop_at)] if stop_at else [])
    proc = _launch(args, port, config)
    if stop_at is None:
        assert proc.returncode == 0, proc.stderr[-3000:]
        return load_file(out / "adapters.safetensors")
    assert proc.returncode != 0
    return {}


def _lora_b(tensors: dict, role: str) -> float:
    return sum(float(v.abs().sum()) for k, v in tensors.items() if k.startswith(f"{role}/") and "lora_B" in k)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return _cpu_config(tmp_path_factory.mktemp("accelerate"))


@pytest.fixture(scope="module")
def describer_fsdp(tmp_path_factory, config):
    """refloop-tiny's describer tuned by PPO (2 phases x 2 steps) under FSDP, two processes."""
    return _worker(tmp_path_factory.mktemp("fsdp-describer"), "describer", "packaged", 29641, config)


@pytest.mark.distributed
def test_fsdp_locator_equals_one_process(tmp_path, config):
    sharded = _worker(tmp_path / "fsdp", "locator", "random", 29642, config)
    one_process = [sys.executable, str(WORKER), str(tmp_path / "one"), "locator", "random"]
    single = subprocess.run(one_process, capture_output=True, text=True, env=ENV)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "sharded False" in single.stdout
    one = load_file(tmp_path / "one" / "adapters.safetensors")
    assert _max_diff(sharded, one) < 1e-5
    assert _lora_b(sharded, "locator") > 0  # trained ...
    assert _lora_b(sharded, "describer") == 0  # ... and only the active adapter


@pytest.mark.distributed
def test_fsdp_describer_equals_data_parallel(tmp_path, describer_fsdp):
    plain = _worker(tmp_path / "dp", "describer", "packaged", 29643, None)
    assert _max_diff(describer_fsdp, plain) < 1e-6
    assert _lora_b(describer_fsdp, "describer") > 0
    assert _lora_b(describer_fsdp, "locator") == 0


@pytest.mark.distributed
def test_fsdp_resume_after_a_crash_ends_where_an_uninterrupted_run_ends(tmp_path, config, describer_fsdp):
    """Killed after step 3 (checkpoint at step 2: gathered adapters and AdamW states), relaunched."""
    _worker(tmp_path, "describer", "packaged", 29644, config, stop_at=3)
    assert (tmp_path / "train" / "checkpoint" / "state.json").exists()
    resumed = _worker(tmp_path, "describer", "packaged", 29644, config)
    assert _max_diff(describer_fsdp, resumed) == 0
    rows = (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4 and '"phase": 1,' in rows[-1]  # integer stats stay integers across processes


@pytest.mark.distributed
def test_sctune_cli_under_fsdp_exports_and_evaluates(tmp_path, config):
    """`accelerate launch --config_file fsdp... -m refloop.cli sctune`: adapters and merged model
    from the gathered copy, base and tuned evaluation sharded over both processes."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "train_data": "crowded",
                "train_images": 8,
                "eval_data": ["in-domain"],
                "eval_boxes": 8,
                "device": "cpu",
                "threads": 1,
                "sctune": {
                    "phases": 2,
                    "describer_steps": 1,
                    "locator_steps": 1,
                    "batch_size": 2,
                    "baseline": "group",
                    "group_size": 2,
                    "max_new_tokens": 8,
                    "lora": {"r": 4, "alpha": 8},
                    "generation_batch_size": 8,
                },
            }
        )
    )
    out = tmp_path / "run"
    proc = _launch(["-m", "refloop.cli", "sctune", "--config", str(recipe), "--out", str(out)], 29645, config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    results = json.loads((out / "results.json").read_text())
    assert results["processes"] == 2 and set(results["tuned"]) == {"in-domain"}
    assert (out / "adapters" / "describer" / "adapter_model.safetensors").exists()
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(out / "merged")
    assert not any(isinstance(p, torch.distributed.tensor.DTensor) for p in merged.parameters())


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / name))
    assert cfg.distributed_type == "FSDP" and cfg.fsdp_config["fsdp_version"] == 2
    assert cfg.num_processes == 8 * cfg.num_machines


def test_unsupported_launch_configs_are_refused_with_the_way_out(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(RefloopError, match="fsdp_version: 2"):
        distributed.check_engine()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(RefloopError, match="ZeRO stage 3.*FSDP2"):
        distributed.check_engine()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert distributed.engine() is None
    distributed.check_engine()


def test_training_commands_refuse_deepspeed_before_loading_anything(tmp_path, monkeypatch, capsys):
    from helpers import run_cli

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train_data: crowded\ntrain_images: 2\neval_data: []\n")
    code, _, err = run_cli(["sctune", "--config", str(recipe), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "ZeRO stage 2" in err and "fsdp2-8gpu.yaml" in err
    assert not (tmp_path / "run").exists()
