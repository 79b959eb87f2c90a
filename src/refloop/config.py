"""YAML recipes into pydantic configs, with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from refloop.errors import RefloopError

T = TypeVar("T", bound=BaseModel)


def load_yaml_model(model: type[T], path: Path) -> T:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise RefloopError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise RefloopError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RefloopError(f"{path}: expected a mapping of {model.__name__} fields")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RefloopError(f"{path}: {exc}") from None
