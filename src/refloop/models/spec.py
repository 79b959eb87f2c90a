"""The model fields every recipe inherits, and how they load the model (HF backend; a vLLM
engine for generation when the recipe asks for it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from refloop.errors import RefloopError
from refloop.limits import Threads


class ModelSpec(BaseModel):
    """Which model a recipe runs and how it is loaded; every method's recipe inherits these fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(None, description="base model directory or hub id (default: refloop-tiny)")
    profile: str | None = Field(None, description="prompt profile name (default: chosen from the model's config)")
    trust_remote_code: bool = Field(False, description="allow the checkpoint's own modelling code")
    processor_options: dict = Field(default_factory=dict, description="processor settings, e.g. image size limits {max_pixels: ...}")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto, cpu, cuda, cuda:N, mps")
    dtype: Literal["auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"] = Field("auto", description="auto, fp32, bf16, fp16")
    threads: Threads | None = Field(None, description="torch CPU threads (default: torch's choice)")
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

    def check_generation_backend(self, vision_tower: bool = False) -> None:
        """With generation_backend vllm, what would stop the engine is refused before any data or
        weights load: vLLM missing, a model it cannot serve here, adapters in the vision tower."""
        if self.generation_backend != "vllm":
            return
        from transformers import AutoConfig

        from refloop.models import resolve_model
        from refloop.models.hf import select_device
        from refloop.models.vllm import check_install, check_model

        check_install()
        if vision_tower:
            raise RefloopError("generation_backend vllm serves language-model LoRA adapters only: --set sctune.lora.vision_tower=false")
        config = AutoConfig.from_pretrained(str(resolve_model(self.model)), trust_remote_code=self.trust_remote_code)
        check_model(config, select_device(self.device), way_out="use --set generation_backend=hf")

    def check_device(self, option: str = "--set device=") -> None:
        """A device this machine lacks is refused before any data or weights load; `option` is
        how the user sets the device (`--device ` on commands, `--set device=` on recipes)."""
        import torch

        way_out = f"use {option}cpu or {option}auto"
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RefloopError(f"device {self.device!r} asked for, but torch sees no CUDA device here ({way_out})")
            index = int(self.device.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise RefloopError(f"device {self.device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s) here")
        if self.device == "mps" and not torch.backends.mps.is_available():
            raise RefloopError(f"device 'mps' asked for, but torch sees no Apple GPU here ({way_out})")

    def process_state(self):
        """The process group of an `accelerate launch` (one process otherwise), set up before any
        weights load so that every process takes its own device."""
        import torch
        from accelerate import PartialState

        return PartialState(cpu=self.device == "cpu" or not torch.cuda.is_available())

    def load_profile(self):
        """The prompt profile this spec's model takes (with its pixel frame), read from the
        checkpoint's config and processor: no weights load."""
        from refloop.models import resolve_model
        from refloop.models.hf import load_parts

        return load_parts(str(resolve_model(self.model)), self.profile, self.processor_options, self.trust_remote_code)[2]

    def load_vlm(self, batch_size: int = 32, generation: bool = False):
        """The model behind the VLM interface, with this spec's settings. A device this machine
        lacks is refused before any weights load. With `generation` (inference-only commands) and
        generation_backend vllm, a vLLM engine serves it; training always loads the HF backend."""
        import torch

        from refloop.models import load_vlm, resolve_model

        self.check_device()
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
