"""The CLI stays thin (DESIGN.md: parse, build a config, call one function): every command's body is
at most 25 lines, so a job's logic lives in the layer it belongs to, where the library's users
reach it too. Read from the source with `ast`, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

CLI = Path(__file__).resolve().parents[1] / "src" / "refloop" / "cli.py"
MAX_BODY_LINES = 25


def command_bodies() -> dict[str, int]:
    """Lines of each `@app.command` function's body (docstring left out), by function name."""
    out = {}
    for node in ast.parse(CLI.read_text()).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        if not any(isinstance(d, ast.Call) and getattr(d.func, "attr", None) == "command" for d in node.decorator_list):
            continue
        body = node.body
        if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            body = body[1:]
        out[node.name] = body[-1].end_lineno - body[0].lineno + 1
    return out


def test_every_cli_command_body_is_at_most_25_lines():
    bodies = command_bodies()
    assert len(bodies) >= 14, sorted(bodies)  # the reader still finds the commands
    too_long = {name: lines for name, lines in bodies.items() if lines > MAX_BODY_LINES}
    assert not too_long, f"command bodies over {MAX_BODY_LINES} lines (move the job below the CLI): {too_long}"
