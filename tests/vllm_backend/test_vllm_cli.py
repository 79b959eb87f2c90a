"""`--backend vllm` on the inference commands: the same outputs as `--backend hf` (greedy, fp32),
in the same formats; refused cleanly where vLLM cannot serve a model."""

from __future__ import annotations

import json

import families
import pytest
from typer.testing import CliRunner

from refloop.cli import app
from refloop.models.processors import save_processor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, processor = families.qwen2_vl(head_dim=32)
    directory = tmp_path_factory.mktemp("qwen2_vl")
    model.save_pretrained(directory)
    save_processor(processor, directory)
    return directory


def _run(args):
    from vllm.distributed import cleanup_dist_env_and_memory

    result = CliRunner().invoke(app, args)
    cleanup_dist_env_and_memory()  # each command started its own engine in this process
    return result


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bootstrap_eval_caption_match_the_hf_backend(checkpoint, tmp_path):
    common = ["--model", str(checkpoint), "--device", "cpu", "--dtype", "fp32", "--batch-size", "8"]
    runs = {
        # describe + re-locate, as `consistency` and `eval reg` also run (one engine start each is ~20 s here)
        "bootstrap": (["bootstrap", "--data", "in-domain", "--num-images", "3", "--no-report"], "candidates.jsonl"),
        "rec": (["eval", "rec", "--data", "in-domain", "--limit", "4"], "rec_samples.jsonl"),
        "caption": (["caption", "--data", "in-domain", "--num-images", "2"], "captions.jsonl"),
    }
    for name, (args, samples) in runs.items():
        outputs = {}
        for backend in ("hf", "vllm"):
            out = tmp_path / f"{name}-{backend}"
            result = _run([*args, "--out", str(out), *common, "--backend", backend])
            assert result.exit_code == 0, f"{name} --backend {backend}: {result.output}"
            outputs[backend] = _lines(out / samples)
        assert outputs["vllm"] == outputs["hf"], name
        assert outputs["hf"], name


def test_an_unservable_head_size_is_refused_before_the_engine_starts(tmp_path, capsys):
    from helpers import run_cli

    model, processor = families.qwen2_vl()  # attention heads of 16
    model.save_pretrained(tmp_path / "m")
    save_processor(processor, tmp_path / "m")
    args = ["eval", "rec", "--data", "in-domain", "--limit", "2", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "m")]
    code, _, err = run_cli([*args, "--device", "cpu", "--backend", "vllm"], capsys)
    assert code == 2
    assert "error: vLLM's CPU backend cannot run attention heads of size 16" in err and "--backend hf" in err


def test_a_model_vllm_does_not_implement_is_refused_cleanly(tmp_path, capsys):
    from helpers import run_cli, save_tiny_random

    model = save_tiny_random(tmp_path / "tiny", hidden=64)  # refloop-tiny's architecture, heads of 32
    args = ["eval", "rec", "--data", "in-domain", "--limit", "2", "--out", str(tmp_path / "o"), "--model", str(model)]
    code, _, err = run_cli([*args, "--device", "cpu", "--backend", "vllm"], capsys)
    assert code == 2
    assert "error: refloop-tiny is not an architecture vLLM serves; use --backend hf" in err  # said before the engine starts
