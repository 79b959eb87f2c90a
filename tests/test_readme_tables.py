"""README's result tables are generated from the committed benchmark JSONs: each table under a
`<!-- NAME: python benchmarks/readme_tables.py NAME -->` marker must equal what the script prints
now, so a re-measured JSON cannot leave a stale table behind."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^( *)<!-- (\w+): python benchmarks/readme_tables\.py \2 -->$", re.MULTILINE)


def _tables_module():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _markers() -> list[tuple[str, str]]:
    """(marker name, the README text that follows it, unindented as far as the marker is): a
    generated block may hold several tables, and one inside a list item is indented."""
    text = (ROOT / "README.md").read_text()
    found = []
    for m in MARKER.finditer(text):
        indent = m.group(1)
        lines = text[m.end() + 1 :].splitlines()
        found.append((m.group(2), "\n".join(line.removeprefix(indent) for line in lines)))
    return found


def _readme_tables() -> dict[str, str]:
    return dict(_markers())


def test_every_generated_table_is_in_the_readme_once():
    names = [name for name, _ in _markers()]
    text = (ROOT / "README.md").read_text()
    loose = re.findall(r"<!--[^>]*readme_tables", text)
    assert len(names) == len(loose), "a readme_tables marker is malformed (its two names differ, or it has trailing text)"
    assert len(names) == len(set(names)), "a table appears under two markers"
    assert set(names) == set(_tables_module().TABLES)


@pytest.mark.parametrize("name", sorted(_readme_tables()))
def test_readme_table_matches_its_results_json(name):
    generated = _tables_module().TABLES[name]()
    following = _readme_tables()[name]
    stale = f"README's {name} table differs from its JSON: python benchmarks/readme_tables.py {name}"
    assert following.startswith(generated + "\n"), stale
    assert not following[len(generated) + 1 :].startswith("|"), stale + " (the README has an extra row)"
