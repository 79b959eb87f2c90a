"""Loading processors, including on machines without torchvision.

transformers 5.x builds every sub-processor a processor class names, and video processors
need torchvision; so `AutoProcessor` fails for Qwen2/2.5/3-VL and InternVL on an image-only,
torchvision-free install (huggingface/transformers#48558). refloop only feeds images, so it
falls back to the same processor class without its video processor.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import transformers
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES


@functools.cache
def _image_only_class(cls: type) -> type:
    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    return type(cls.__name__, (cls,), {"check_argument_for_proper_class": check_argument_for_proper_class, "__module__": cls.__module__})


def image_only_processor(cls: type, **parts):
    """An instance of processor class `cls` built from `parts` with no video processor."""
    return _image_only_class(cls)(video_processor=None, **parts)


def _processor_class(path: str, config) -> type | None:
    """The processor class a checkpoint names (processor_config.json), else its model type's."""
    name = None
    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        candidate = Path(path) / file
        if candidate.is_file():
            name = json.loads(candidate.read_text()).get("processor_class")
            if name:
                break
    if name is None:
        name = PROCESSOR_MAPPING_NAMES.get(getattr(config, "model_type", ""))
    return getattr(transformers, name, None) if isinstance(name, str) else None


def _init_kwargs(path: str) -> dict:
    kwargs = {}
    candidate = Path(path) / "processor_config.json"
    if candidate.is_file():
        data = json.loads(candidate.read_text())
        kwargs = {k: v for k, v in data.items() if k not in ("processor_class", "image_processor", "video_processor", "auto_map")}
    template = Path(path) / "chat_template.jinja"
    if template.is_file():
        kwargs["chat_template"] = template.read_text()
    return kwargs


def load_processor(path: str, config, trust_remote_code: bool = False, **options):
    """`AutoProcessor.from_pretrained`, or, when that fails only because the processor's video
    half needs torchvision, the same class built from its tokenizer and image processor.
    `options` reach the image processor (e.g. Qwen's min_pixels / max_pixels)."""
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **options)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        cls = _processor_class(path, config)
        if cls is None or "video_processor" not in cls.get_attributes():
            raise
        first_error = exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **options)
        return image_only_processor(cls, image_processor=image_processor, tokenizer=tokenizer, **_init_kwargs(path))
    except Exception as exc:  # report the original failure, which names the real cause
        raise first_error from exc


def save_processor(processor, directory: str | Path) -> None:
    """`processor.save_pretrained`, skipping an absent video processor."""
    directory = Path(directory)
    if getattr(processor, "video_processor", True) is not None:
        processor.save_pretrained(directory)
        return
    processor.tokenizer.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    data = {"processor_class": type(processor).__name__}
    data.update(
        {k: v for k, v in processor.to_dict().items() if k not in ("tokenizer", "image_processor", "video_processor", "chat_template")}
    )
    (directory / "processor_config.json").write_text(json.dumps(data, indent=2, default=str))
