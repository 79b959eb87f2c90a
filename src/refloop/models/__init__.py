"""Model layer: the VLM interface, the Hugging Face backend, prompt profiles, refloop-tiny."""

from importlib.resources import files
from pathlib import Path

from refloop.models.base import GREEDY, VLM, Completion, GenerateOptions, Located
from refloop.models.profiles import PROFILES, PromptProfile, TinyProfile, get_profile, profile_for_config


def default_model_path() -> Path:
    """The committed refloop-tiny checkpoint inside the package."""
    return Path(str(files("refloop") / "assets" / "refloop-tiny"))


def load_vlm(
    model: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 32,
    profile: str | None = None,
    trust_remote_code: bool = False,
    processor_options: dict | None = None,
):
    """A checkpoint (default: the embedded refloop-tiny) behind the VLM interface. `profile` names
    a prompt profile; by default it is chosen from the config's model_type."""
    from refloop.models.hf import HFVLM

    return HFVLM.from_pretrained(
        model or default_model_path(),
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        profile=profile,
        trust_remote_code=trust_remote_code,
        processor_options=processor_options,
    )


__all__ = [
    "GREEDY",
    "Completion",
    "GenerateOptions",
    "Located",
    "PROFILES",
    "PromptProfile",
    "TinyProfile",
    "VLM",
    "default_model_path",
    "get_profile",
    "load_vlm",
    "profile_for_config",
]
