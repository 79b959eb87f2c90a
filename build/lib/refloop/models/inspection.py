"""`refloop inspect`: what refloop will do with a checkpoint, without loading its weights.

Reads the config and processor, picks the prompt profile, builds the model skeleton on the meta
device (no memory) to list the LoRA targets, and renders the prompts for an example box, so a
user can check a checkpoint before spending GPU hours on it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

import refloop.models.tiny  # noqa: F401  (registers refloop-tiny with the Auto classes)
from refloop.boxes import Box
from refloop.models.hf import load_parts
from refloop.models.lora import VISION_MODULE, language_model_targets

EXAMPLE_SIZE = (640, 480)
EXAMPLE_BOX = Box(64, 48, 320, 240)
EXAMPLE_EXPRESSION = "the red mug on the left"


def inspect_checkpoint(
    path: str | Path, profile: str | None = None, processor_options: dict | None = None, trust_remote_code: bool = False
) -> dict:
    path = str(path)
    config, processor, chosen = load_parts(path, profile, processor_options, trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = language_model_targets(model)
    adapted = [n for n in linear if re.fullmatch(targets, n)]
    codec = chosen.codec
    return {
        "model": path,
        "model_type": config.model_type,
        "profile": chosen.name,
        "profile_chosen_by": "argument" if profile else "config.model_type",
        "encoder_decoder": bool(getattr(config, "is_encoder_decoder", False)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "processor": type(processor).__name__,
        "image_processor": type(processor.image_processor).__name__ if getattr(processor, "image_processor", None) else None,
        "codec": codec.name,
        "codec_options": chosen.frame,
        "example": {
            "image_size": list(EXAMPLE_SIZE),
            "box_xyxy": EXAMPLE_BOX.as_list(),
            "reg_prompt": chosen.reg_prompt(EXAMPLE_BOX, EXAMPLE_SIZE),
            "rec_prompt": chosen.rec_prompt(EXAMPLE_EXPRESSION),
            "rec_answer": chosen.rec_answer(EXAMPLE_BOX, EXAMPLE_SIZE, EXAMPLE_EXPRESSION),
            "caption_prompt": chosen.caption_prompt(),
        },
        "lora": {
            "target_modules": targets,
            "adapted_linear_layers": len(adapted),
            "linear_layers": len(linear),
            "adapted_outside_language_model": [n for n in adapted if VISION_MODULE.search(n)],
        },
    }
