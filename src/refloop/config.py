"""Recipes: YAML files into pydantic models, with `--set` overrides and clear errors, and the
model fields every recipe shares."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from refloop.errors import RefloopError
from refloop.training.trackers import ReportTo, Tracking

T = TypeVar("T", bound=BaseModel)


class ModelSpec(BaseModel):
    """Which model a recipe runs and how it is loaded; every method's recipe inherits these fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(None, description="base model directory or hub id (default: refloop-tiny)")
    profile: str | None = Field(None, description="prompt profile name (default: chosen from the model's config)")
    trust_remote_code: bool = Field(False, description="allow the checkpoint's own modelling code")
    processor_options: dict = Field(default_factory=dict, description="processor settings, e.g. image size limits {max_pixels: ...}")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto, cpu, cuda, cuda:N, mps")
    dtype: Literal["auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"] = Field("auto", description="auto, fp32, bf16, fp16")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    generation_backend: Literal["hf", "vllm"] = Field(
        "hf", description="what generates: hf (transformers) or vllm (a vLLM engine, roles as LoRA adapters; training stays in HF)"
    )

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        # The default backend is left out, so runs recorded before the field existed keep their fingerprint.
        data = handler(self)
        if isinstance(data, dict) and data.get("generation_backend") == "hf":
            data.pop("generation_backend")
        return data

    def vllm_engine(self, lora_rank: int, adapters: int = 3):
        """With generation_backend vllm: a vLLM engine on this spec's model serving `adapters`
        LoRA adapters of rank <= `lora_rank` (training roles); else None."""
        if self.generation_backend != "vllm":
            return None
        from refloop.models import resolve_model
        from refloop.models.vllm import VLLMEngine

        return VLLMEngine(
            str(resolve_model(self.model)),
            device=self.device,
            dtype=self.dtype,
            processor_options=self.processor_options,
            trust_remote_code=self.trust_remote_code,
            lora_rank=lora_rank,
            max_loras=adapters,
            seed=0,
            gpu_memory_utilization=0.3,  # colocated with the training model (TRL's default for colocate)
            threads=self.threads,
        )

    def load_vlm(self, batch_size: int = 32, generation: bool = False):
        """The model behind the VLM interface, with this spec's settings. A device this machine
        lacks is refused before any weights load. With `generation` (inference-only commands) and
        generation_backend vllm, a vLLM engine serves it; training always loads the HF backend."""
        import torch

        from refloop.models import load_vlm, resolve_model

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RefloopError(f"device {self.device!r} asked for, but torch sees no CUDA device here (use --device cpu or auto)")
        if self.device == "mps" and not torch.backends.mps.is_available():
            raise RefloopError("device 'mps' asked for, but torch sees no Apple GPU here (use --device cpu or auto)")
        if self.threads:
            torch.set_num_threads(self.threads)
        if generation and self.generation_backend == "vllm":
            from refloop.models.vllm import VLLMVLM

            return VLLMVLM.from_pretrained(
                resolve_model(self.model),
                device=self.device,
                dtype=self.dtype,
                profile=self.profile,
                trust_remote_code=self.trust_remote_code,
                batch_size=batch_size,
                processor_options=self.processor_options,
                threads=self.threads,
            )
        return load_vlm(
            self.model,
            device=self.device,
            dtype=self.dtype,
            batch_size=batch_size,
            profile=self.profile,
            trust_remote_code=self.trust_remote_code,
            processor_options=self.processor_options,
        )


class TrackingSpec(BaseModel):
    """Where a training recipe reports its metrics besides metrics.jsonl; every training recipe
    inherits these fields. They do not change a run: a run resumes under another tracker."""

    report_to: ReportTo = Field("none", description="none, tensorboard (event files in the run's train/tensorboard), wandb or trackio")
    tracker_project: str = Field("refloop", min_length=1, description="wandb / Trackio project of the run")

    def tracking(self) -> Tracking:
        """The tracker settings, with this recipe as the run's logged config; an uninstalled
        tracker is refused here, before any model loads."""
        return Tracking(self.report_to, self.tracker_project, self.model_dump(mode="json"))


TRACKING_FIELDS = frozenset(TrackingSpec.model_fields)
"""Recipe fields left out of a run's fingerprint (resuming under another tracker is allowed)."""


class DataSpec(BaseModel):
    """A data source and the root its image paths resolve under (default: the file's directory)."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(..., description="shapes-world domain, COCO-style .json or referring .jsonl")
    images: str | None = Field(None, description="image root of the file's image paths")

    @classmethod
    def of(cls, value: str | dict | DataSpec) -> DataSpec:
        return value if isinstance(value, DataSpec) else cls(data=value) if isinstance(value, str) else cls.model_validate(value)


def apply_overrides(data: dict, overrides: list[str], source: str = "recipe") -> dict:
    """`key.sub=value` strings (value parsed as YAML) applied onto a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RefloopError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise RefloopError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RefloopError(f"--set {item!r}: {'.'.join(parts[: depth + 1])} in {source} is not a mapping")
        node[parts[-1]] = value
    return data


def load_recipe(model: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """A recipe of type `model` from a YAML file (or none: the defaults) plus `--set` overrides.
    Missing files, YAML errors, unsafe tags, non-mapping files and invalid fields are RefloopErrors
    naming the file."""
    source = str(path) if path is not None else "recipe"
    data: object = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise RefloopError(f"recipe not found: {path}") from None
        except IsADirectoryError:
            raise RefloopError(f"recipe {path} is a directory, not a YAML file") from None
        except UnicodeDecodeError as exc:
            raise RefloopError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
        except yaml.YAMLError as exc:
            raise RefloopError(f"{path}: not valid YAML (or a tag refloop refuses to load): {exc}") from None
    if not isinstance(data, dict):
        raise RefloopError(f"{source}: expected a mapping of {model.__name__} fields, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides), source)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RefloopError(f"{source}: {exc}") from None
