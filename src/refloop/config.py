"""Recipes: YAML files into pydantic models, with `--set` overrides and clear errors, and the data
fields recipes share. A leaf: the model fields every recipe inherits are `refloop.models.spec.ModelSpec`,
the tracker fields `refloop.training.trackers.TrackingSpec`."""

from __future__ import annotations

from difflib import get_close_matches
from pathlib import Path
from typing import TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from refloop.errors import RefloopError
from refloop.limits import MAX_RECIPE_NODES

T = TypeVar("T", bound=BaseModel)


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


MAX_RECIPE_BYTES = 1 << 20


def check_size(data: object, source: str, limit: int = MAX_RECIPE_NODES) -> None:
    """Refuse a recipe whose values, with YAML aliases expanded, number more than `limit`: nested
    anchors (an alias bomb) load as a small graph but expand exponentially in validation and
    fingerprints, and a self-referencing anchor never ends. Stops counting at the limit."""
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > limit:
            raise RefloopError(f"{source}: more than {limit} values once YAML aliases are expanded (an alias bomb?); write the recipe out")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def load_recipe(model: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """A recipe of type `model` from a YAML file (or none: the defaults) plus `--set` overrides.
    Missing files, YAML errors, unsafe tags, non-mapping files and invalid fields are RefloopErrors
    naming the file."""
    source = str(path) if path is not None else "recipe"
    data: object = {}
    if path is not None:
        try:
            text = Path(path).read_text()
            if len(text) > MAX_RECIPE_BYTES:
                raise RefloopError(f"{path}: {len(text)} characters; a recipe is at most {MAX_RECIPE_BYTES}")
            data = yaml.safe_load(text) or {}
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
    check_size(data, source)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        set_keys = [item.partition("=")[0] for item in overrides]
        raise RefloopError(validation_message(model, exc, source, set_keys)) from None


def _fields_at(model: type[BaseModel], loc: tuple) -> dict | None:
    """The fields of the (nested) config model that holds the value at `loc[:-1]`, if one does."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        candidates = [field.annotation, *get_args(field.annotation)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model.model_fields


def validation_message(model: type[BaseModel], exc: ValidationError, source: str, set_keys: list[str] = ()) -> str:
    """One line for every invalid field, blamed on the `--set` that gave it when one did, with the
    nearest field name for an unknown key: `--set sft.epoch: unknown field (did you mean epochs?)`."""
    problems = []
    for error in exc.errors():
        loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        dotted = ".".join(str(p) for p in loc)
        given = next((k for k in set_keys if dotted == k or dotted.startswith(k + ".")), None)
        where = f"--set {dotted}" if given else f"{source}: {dotted or 'recipe'}"
        if error["type"] == "extra_forbidden":
            known = _fields_at(model, loc) or {}
            near = get_close_matches(str(loc[-1]), list(known), n=1)
            problems.append(f"{where}: unknown field" + (f" (did you mean {near[0]}?)" if near else ""))
        elif error["type"] == "missing":
            problems.append(f"{where}: required, not given")
        else:
            message = error["msg"].removeprefix("Value error, ")
            shown = "" if error["type"] == "value_error" or "input" not in error else f" (got {error['input']!r:.80})"
            problems.append(f"{where}: {message}{shown}")
    return f"invalid {model.__name__}: " + "; ".join(problems)
