"""The one HTML page skeleton every refloop report is written in (consistency, bootstrapping,
SVP, the demo): a self-contained page, no scripts, images beside it or inline."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image


def html_page(title: str, body: str, max_width: int = 1200, style: str = "") -> str:
    """A page titled `title` around `body` (HTML), its text at most `max_width` pixels wide and its
    images scaled down to fit it; `style`: the page's own CSS rules after the shared ones."""
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
        f"<style>body{{font-family:sans-serif;margin:2em;max-width:{max_width}px}}img{{max-width:100%;height:auto}}{style}</style>"
        "</head><body>\n"
        f"{body}\n</body></html>"
    )


def write_page(path: Path, title: str, body: str, max_width: int = 1200, style: str = "") -> Path:
    """`html_page` written to `path`; returns `path`."""
    path.write_text(html_page(title, body, max_width, style))
    return path


def image_data_uri(image: Image.Image, side: int | None = None) -> str:
    """`image` as a PNG data URI (at most `side` pixels a side), so the page shows it wherever the
    page is copied: a report must not point into a cache or a dataset folder."""
    if side is not None:
        image = image.copy()
        image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
