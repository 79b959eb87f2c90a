"""refloop-tiny, registered with transformers' Auto classes so it loads like any checkpoint."""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from refloop.models.tiny.configuration import RefloopTinyConfig
from refloop.models.tiny.modeling import RefloopTinyForConditionalGeneration
from refloop.models.tiny.processing import RefloopTinyProcessor, build_tokenizer, cell_token, coord_token

AutoConfig.register(RefloopTinyConfig.model_type, RefloopTinyConfig, exist_ok=True)
AutoModelForImageTextToText.register(RefloopTinyConfig, RefloopTinyForConditionalGeneration, exist_ok=True)
AutoProcessor.register(RefloopTinyConfig, RefloopTinyProcessor, exist_ok=True)

__all__ = [
    "RefloopTinyConfig",
    "RefloopTinyForConditionalGeneration",
    "RefloopTinyProcessor",
    "build_tokenizer",
    "cell_token",
    "coord_token",
]
