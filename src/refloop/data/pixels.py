"""Pixels for a batch of items, under the failure policy: an image that cannot be decoded stops
the run (`on_error="fail"`) or drops its item, counted (`on_error="skip"`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from PIL import Image

from refloop.errors import DataError

T = TypeVar("T")


def readable(
    items: Sequence[T], load: Callable[[T], Image.Image], on_error: str, skipped: list[DataError]
) -> tuple[list[T], list[Image.Image]]:
    """The items whose image decodes, and their images; errors of skipped items go to `skipped`."""
    kept, images = [], []
    for item in items:
        try:
            image = load(item)
        except DataError as err:
            if on_error != "skip":
                raise
            skipped.append(err)
            continue
        kept.append(item)
        images.append(image)
    return kept, images
