"""refloop's layers only point down (DESIGN.md "One core, thin methods"): a module imports from its
own layer or below, never above. Read from the source with `ast`, so no module is imported."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "refloop"

# Lowest first; the first component under refloop/ names a module's layer.
LAYERS: list[set[str]] = [
    {"boxes", "errors", "progress", "limits", "seeding", "parallel", "runs", "config", "torchvision_ops"},  # base
    {"codecs", "world"},
    {"data"},
    {"models"},
    {"training", "grounding"},
    {"report"},
    {"cycle", "evaluation"},
    {"methods"},
    {"cli", "demo", "__main__"},
]

# No known exception: refloop-tiny's pretraining is a recipe in methods/, its image augmentation in world/.
KNOWN: set[str] = set()


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "refloop" or len(parts) < 2:
        return None
    return next((i for i, names in enumerate(LAYERS) if parts[1] in names), None)


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every refloop module `tree` imports, at any depth (function-level imports count too)."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from refloop import x` / `from . import x` name submodules
            out += [f"{base}.{a.name}" for a in node.names] if base == "refloop" or not node.module else [base]
    return out


def upward_imports() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        module = module_name(path)
        mine = layer_of(module)
        if module == "refloop" or module in KNOWN:
            continue
        assert mine is not None, f"{module} is in no layer of LAYERS; add it where it belongs"
        for target in imported(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            if target == "refloop":
                found.append(f"{module} imports the refloop package itself")
            elif (theirs := layer_of(target)) is not None and theirs > mine:
                found.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    return found


def test_imports_only_point_down_the_layers():
    assert upward_imports() == []


def test_the_layer_check_sees_an_upward_import():
    tree = ast.parse("def f():\n    from refloop.training import trainer\n")
    targets = imported(tree, "refloop.data.loaders", False)
    assert targets == ["refloop.training"]
    assert layer_of(targets[0]) > layer_of("refloop.data.loaders")
    relative = imported(ast.parse("from ..models import hf\nfrom . import records\n"), "refloop.data.loaders", False)
    assert relative == ["refloop.models", "refloop.data.records"]
