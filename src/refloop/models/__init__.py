"""Model layer: the VLM interface, the Hugging Face backend, prompt profiles, refloop-tiny."""

from importlib.resources import files
from pathlib import Path

from refloop.models.base import GREEDY, VLM, Completion, GenerateOptions, Located
from refloop.models.profiles import PromptProfile, TinyProfile, profile_for_config


def default_model_path() -> Path:
    """The committed refloop-tiny checkpoint inside the package."""
    return Path(str(files("refloop") / "assets" / "refloop-tiny"))


def load_vlm(
    model: str | Path | None = None, device: str = "auto", dtype: str = "auto", batch_size: int = 32, trust_remote_code: bool = False
):
    from refloop.models.hf import HFVLM

    return HFVLM.from_pretrained(
        model or default_model_path(), device=device, dtype=dtype, batch_size=batch_size, trust_remote_code=trust_remote_code
    )


__all__ = [
    "GREEDY",
    "Completion",
    "GenerateOptions",
    "Located",
    "PromptProfile",
    "TinyProfile",
    "VLM",
    "default_model_path",
    "load_vlm",
    "profile_for_config",
]
