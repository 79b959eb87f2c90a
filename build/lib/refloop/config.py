"""Recipes: YAML files into pydantic models, with `--set` overrides and clear errors, and the data
fields recipes share. A leaf: the model fields every recipe inherits are `refloop.models.spec.ModelSpec`,
the tracker fields `refloop.training.trackers.TrackingSpec`."""

from __future__ import annotations

import os
from difflib import get_close_matches
from pathlib import Path
from types import UnionType
from typing import TypeVar, Union, get_args, get_origin

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


def packaged_recipes() -> dict[str, Path]:
    """The recipes installed with refloop (`src/refloop/recipes/*.yaml`), by name without `.yaml`."""
    from importlib.resources import files

    root = Path(str(files("refloop") / "recipes"))
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def resolve_recipe(path: str | Path) -> Path:
    """A recipe file: `path` when it exists, else a packaged recipe of that name (`sctune-shapes` or
    `sctune-shapes.yaml`; a pip-installed refloop has no `configs/` folder to point at)."""
    given = Path(path)
    text = str(path)  # as typed: pathlib would drop a leading "./"
    if given.exists() or "/" in text or os.sep in text or text.startswith("."):
        return given
    return packaged_recipes().get(text.removesuffix(".yaml"), given)


def load_recipe(model: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """A recipe of type `model` from a YAML file or a packaged recipe's name (or none: the defaults)
    plus `--set` overrides. Missing files, YAML errors, unsafe tags, non-mapping files and invalid
    fields are RefloopErrors naming the file."""
    source = str(path) if path is not None else "recipe"
    data: object = {}
    if path is not None:
        try:
            text = resolve_recipe(path).read_text()
            if len(text) > MAX_RECIPE_BYTES:
                raise RefloopError(f"{path}: {len(text)} characters; a recipe is at most {MAX_RECIPE_BYTES}")
            data = yaml.safe_load(text) or {}
        except FileNotFoundError:
            names = ", ".join(packaged_recipes())
            raise RefloopError(f"recipe not found: {path} (a YAML file, or a packaged recipe's name: {names})") from None
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
        message = validation_message(model, exc, source, set_keys)
        if path is None:  # no recipe named: the defaults alone did not validate
            kind = model.__name__.lower().removesuffix("recipe").removesuffix("config")  # SCTuneRecipe -> sctune-*.yaml
            names = [name for name in packaged_recipes() if name.startswith(kind + "-")]
            message += f" (no --config given: name a recipe{', e.g. ' + ', '.join(names) if names else ''}, or --set the fields)"
        raise RefloopError(message) from None


def _models_in(annotation: object) -> list[type[BaseModel]]:
    """The config models an annotation holds: itself, a union's members, a list's or dict's items."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _is_union(annotation: object) -> bool:
    return get_origin(annotation) in (Union, UnionType) and len([a for a in get_args(annotation) if a is not type(None)]) > 1


def _field_path(model: type[BaseModel], loc: tuple) -> tuple[tuple, dict | None]:
    """`loc` as the recipe spells it (the branch tag pydantic adds after a union field dropped;
    list indices and dict keys kept) and the fields of the model that should hold its last part
    (None when no model does)."""
    path: list = []
    fields: dict | None = model.model_fields  # where the next part is looked up
    holder: dict | None = fields
    branches: dict[str, type[BaseModel]] | None = None  # after a union field: its next part is a branch tag
    for part in loc:
        if branches is not None:
            fields, branches = (branches[part].model_fields if part in branches else None), None
            continue
        holder = fields
        path.append(part)
        field = fields.get(part) if fields is not None and isinstance(part, str) else None
        if field is None:  # a list index or dict key (the items' model, if one, stays), or an unknown key
            fields = fields if isinstance(part, int) else None
            continue
        models = _models_in(field.annotation)
        fields = models[0].model_fields if len(models) == 1 else None
        if _is_union(field.annotation):
            branches = {m.__name__: m for m in models}
    return tuple(path), holder


def validation_message(model: type[BaseModel], exc: ValidationError, source: str, set_keys: list[str] = ()) -> str:
    """One line for every invalid field, blamed on the `--set` that gave it when one did, with the
    nearest field name for an unknown key: `--set sft.epoch: unknown field (did you mean epochs?)`.
    A union's failed branches are one line."""
    problems: dict[str, list[str]] = {}
    for error in exc.errors():
        loc, holder = _field_path(model, tuple(error["loc"]))
        dotted = ".".join(str(p) for p in loc)
        given = next((k for k in set_keys if dotted and (dotted == k or dotted.startswith(k + ".") or k.startswith(dotted + "."))), None)
        where = f"--set {dotted}" if given else f"{source}: {dotted}" if dotted else source
        if error["type"] == "extra_forbidden":
            near = get_close_matches(str(loc[-1]), list(holder or {}), n=1)
            message = "unknown field" + (f" (did you mean {near[0]}?)" if near else "")
        elif error["type"] == "missing":
            message = "required, not given"
        else:
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] != "value_error" and "input" in error:
                message += f" (got {error['input']!r:.80})"
        if message not in problems.setdefault(where, []):
            problems[where].append(message)
    return f"invalid {model.__name__}: " + "; ".join(f"{where}: {' or '.join(messages)}" for where, messages in problems.items())
