"""The one HTML page skeleton every refloop report is written in (consistency, bootstrapping,
SVP, the demo): a self-contained page, no scripts, images beside it or inline."""

from __future__ import annotations

import html
from pathlib import Path


def html_page(title: str, body: str, max_width: int = 1200, style: str = "") -> str:
    """A page titled `title` around `body` (HTML), its text at most `max_width` pixels wide;
    `style`: the page's own CSS rules after the shared ones."""
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
        f"<style>body{{font-family:sans-serif;margin:2em;max-width:{max_width}px}}{style}</style></head><body>\n"
        f"{body}\n</body></html>"
    )


def write_page(path: Path, title: str, body: str, max_width: int = 1200, style: str = "") -> Path:
    """`html_page` written to `path`; returns `path`."""
    path.write_text(html_page(title, body, max_width, style))
    return path
