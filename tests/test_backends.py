"""Choosing a generation backend in the main venv (no vLLM here): recipes and run fingerprints
unchanged for the default, clear refusals, and the torchvision shim the vLLM venv relies on."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
from helpers import run_cli

from refloop.models.spec import ModelSpec


def test_the_default_backend_is_left_out_of_recorded_recipes():
    assert "generation_backend" not in ModelSpec().model_dump()  # fingerprints of earlier runs still match
    assert ModelSpec(generation_backend="vllm").model_dump()["generation_backend"] == "vllm"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_backend_vllm_without_vllm_is_refused_with_the_install(tmp_path, capsys):
    code, _, err = run_cli(["eval", "rec", "--data", "in-domain", "--limit", "2", "--out", str(tmp_path), "--backend", "vllm"], capsys)
    assert code == 2
    assert "error: the vLLM backend needs the vllm package" in err and ".ci/install-vllm" in err


def test_recipes_that_do_not_serve_roles_from_vllm_refuse_it(tmp_path, capsys):
    from refloop.models import packaged_model_path

    recipes = packaged_model_path("refloop-tiny").parent.parent / "recipes"
    for command, recipe in (("sft", "sft-shapes.yaml"), ("svp", "svp-shapes.yaml")):
        args = [command, "--config", str(recipes / recipe), "--set", "generation_backend=vllm", "--out", str(tmp_path / command)]
        code, _, err = run_cli(args, capsys)
        assert code == 2 and f"{command} recipes generate with hf" in err


def test_a_torchvision_whose_operators_cannot_load_imports_after_the_declaration(tmp_path):
    """A stand-in for PyPI's CUDA torchvision on a CPU torch: its operator library does not load,
    and its meta registrations name an operator nobody declared (as torchvision 0.28 does)."""
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "_C.so").write_bytes(b"not a shared library")
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            import torch
            try:
                torch.ops.load_library(__path__[0] + "/_C.so")
            except OSError:
                pass

            @torch.library.register_fake("torchvision::nms")
            def meta_nms(dets, scores, iou_threshold):
                return dets.new_empty(0, dtype=torch.long)
            """
        )
    )

    script = textwrap.dedent(
        """
        try:
            import torchvision
        except RuntimeError as exc:
            print("plain import failed:", "torchvision::nms" in str(exc))
        import refloop.torchvision_ops as t
        t.install_import_hook()
        import torchvision
        print("hooked import ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["plain import failed: True", "hooked import ok"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_an_sctune_recipe_asking_vllm_is_refused_before_the_base_evaluation(tmp_path, capsys):
    """The base evaluation takes hours at GPU sizes: what would stop the engine is said first, and
    the corrected rerun needs no --overwrite."""
    args = ["sctune", "--config", "sctune-shapes", "--set", "generation_backend=vllm", "--out", str(tmp_path / "run")]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "the vLLM backend needs the vllm package" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_an_engine_backed_models_dtype_is_in_the_run_fingerprint(tmp_path):
    """A vLLM run's fingerprint held no dtype, so a bf16 rerun resumed an fp32 run's rows (a
    first-contact helper's finding): the engine's weights dtype is recorded as the HF model's is."""
    import torch

    from refloop.runs import model_fingerprint

    class EngineBacked:
        name, backend, profile = str(tmp_path), "vllm", None

        def __init__(self, dtype):
            self.weights_dtype = dtype

    fp32, bf16 = (model_fingerprint(EngineBacked(d)) for d in (torch.float32, torch.bfloat16))
    assert fp32["dtype"] == "torch.float32" and bf16["dtype"] == "torch.bfloat16" and fp32 != bf16


def test_a_refusal_names_the_default_backend_rather_than_none():
    """HF runs leave the backend out of their fingerprint (so older runs match): a refusal between
    the backends read "'vllm' -> None"."""
    from refloop.runs import _differences

    old, new = {"model": {"backend": "vllm", "name": "m"}}, {"model": {"name": "m", "dtype": "torch.float32"}}
    assert _differences(old, new) == ["model.backend: 'vllm' -> 'hf'", "model.dtype: (not set) -> 'torch.float32'"]
