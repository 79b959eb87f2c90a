"""Pixels for a batch of items, under the failure policy: an image that cannot be decoded stops
the run (`on_error="fail"`) or drops its item, counted (`on_error="skip"`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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


def pending_batches(
    items: Sequence[T],
    done: set,
    key: Callable[[T], object],
    load: Callable[[T], Image.Image],
    batch_size: int,
    on_error: str,
    skipped: list[DataError],
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[list[T], list[Image.Image]]]:
    """The resumable loop of every batched job: items whose key is not in `done` (a JsonlWriter's
    keys), `batch_size` at a time, with their decoded images under the failure policy. Progress
    counts finished, skipped and already-done items."""
    todo = [item for item in items if key(item) not in done]
    if progress:
        progress(len(items) - len(todo))
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        kept, images = readable(batch, load, on_error, skipped)
        if kept:
            yield kept, images
        if progress:
            progress(len(batch))
