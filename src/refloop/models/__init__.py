"""Model layer: the VLM interface, the Hugging Face backend, prompt profiles, refloop-tiny."""

from importlib.resources import files
from pathlib import Path

from refloop.codecs.profiles import PROFILES, PromptProfile, TinyProfile, get_profile, profile_for_config
from refloop.models.base import GREEDY, VLM, Completion, GenerateOptions, Located
from refloop.torchvision_ops import declare_missing_operators

declare_missing_operators()  # before transformers imports torchvision (a CUDA build on a CPU torch: see the module)

import refloop.models.tiny  # noqa: E402, F401  (registers refloop-tiny with transformers' Auto classes)

# Checkpoints shipped inside the package, by the name `load_vlm` and --model accept: refloop-tiny,
# the one base model every method and benchmark runs (REG, REC, captions, yes/no, and captions that
# use a grounding written in the prompt; see its README.md).
PACKAGED_MODELS = ("refloop-tiny",)
# Names of earlier packaged models, now served by the one model that replaced them.
RETIRED_MODELS = {"refloop-tiny-context": "refloop-tiny"}


def packaged_model_path(name: str) -> Path:
    """The directory of a checkpoint shipped inside the package (one of PACKAGED_MODELS)."""
    name = RETIRED_MODELS.get(name, name)
    if name not in PACKAGED_MODELS:
        raise ValueError(f"no packaged model {name!r}; packaged: {', '.join(PACKAGED_MODELS)}")
    return Path(str(files("refloop") / "assets" / name))


def default_model_path() -> Path:
    """The committed refloop-tiny checkpoint inside the package."""
    return packaged_model_path("refloop-tiny")


def resolve_model(model: str | Path | None) -> str | Path:
    """None -> the embedded refloop-tiny; a packaged model's name (or a retired one's) -> its
    directory, unless a path of that name exists here (a user's own checkpoint directory wins);
    anything else unchanged."""
    if model is None:
        return default_model_path()
    if isinstance(model, str) and (model in PACKAGED_MODELS or model in RETIRED_MODELS) and not Path(model).exists():
        return packaged_model_path(model)
    return model


def checkpoint_profile(model: str | None, profile: str | None = None, trust_remote_code: bool = False) -> PromptProfile:
    """The prompt profile data is written for: `model`'s (its pixel frame read from its processor;
    no weights load), else the named one (default refloop-tiny, with its default pixel frame)."""
    if model is None:
        return get_profile(profile or "refloop-tiny")
    from refloop.models.hf import load_parts

    return load_parts(str(resolve_model(model)), profile, None, trust_remote_code)[2]


def load_vlm(
    model: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 32,
    profile: str | None = None,
    trust_remote_code: bool = False,
    processor_options: dict | None = None,
):
    """A checkpoint (default: the embedded refloop-tiny; a name of PACKAGED_MODELS: that packaged
    checkpoint) behind the VLM interface. `profile` names a prompt profile; by default it is
    chosen from the config's model_type."""
    from refloop.models.hf import HFVLM

    return HFVLM.from_pretrained(
        resolve_model(model),
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
    "PACKAGED_MODELS",
    "RETIRED_MODELS",
    "PROFILES",
    "PromptProfile",
    "TinyProfile",
    "VLM",
    "checkpoint_profile",
    "default_model_path",
    "get_profile",
    "load_vlm",
    "packaged_model_path",
    "profile_for_config",
    "resolve_model",
]
