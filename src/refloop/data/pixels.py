"""Pixels for a batch of items, under the failure policy: an image that cannot be decoded stops
the run (`on_error="fail"`) or drops its item, counted (`on_error="skip"`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from PIL import Image

from refloop.data.jsonl import ShardedJsonl, read_records
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
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[list[T], list[Image.Image]]]:
    """The resumable loop of every batched job: items whose key is not in `done` (a JsonlWriter's
    keys), `batch_size` at a time, with their decoded images under the failure policy. Progress
    counts finished, skipped and already-done items. With `world` processes (all holding the
    same `done`, see `ShardedJsonl`) process `rank` takes batches rank, rank + world, ..."""
    todo = [item for item in items if key(item) not in done]
    if progress:
        progress(len(items) - len(todo))
    for b, start in enumerate(range(0, len(todo), batch_size)):
        if b % world != rank:
            continue
        batch = todo[start : start + batch_size]
        kept, images = readable(batch, load, on_error, skipped)
        if kept:
            yield kept, images
        if progress:
            progress(len(batch))


class ShardedPass:
    """One resumable batched pass over items into a JSONL output, shared by every process of
    the run (`accelerate launch`; one process: a plain resumable pass). Process r runs every
    P-th pending batch into its shard; `finish` merges the shards (main process) into the
    output in the items' order and returns the rows every process then reads."""

    def __init__(self, path: Path, key: str, state) -> None:
        self.state, self.path, self.key = state, Path(path), key
        self.rank, self.world = state.process_index, state.num_processes
        self.out = ShardedJsonl(self.path, key, self.rank, self.world)
        self.skipped: list[DataError] = []

    def batches(
        self,
        items: Sequence[T],
        key: Callable[[T], object],
        load: Callable[[T], Image.Image],
        batch_size: int,
        on_error: str,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[list[T], list[Image.Image]]]:
        return pending_batches(items, self.out.done, key, load, batch_size, on_error, self.skipped, progress, self.rank, self.world)

    def write_many(self, records) -> None:
        self.out.write_many(records)

    def finish(self, order: Sequence[object]) -> tuple[list[dict], int]:
        """(rows of the merged output whose key is in `order`, in that order; images skipped by
        all processes)."""
        self.out.close()
        skipped = len(self.skipped)
        if self.world > 1:
            from accelerate.utils import gather_object

            skipped = sum(gather_object([skipped]))
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            self.out.merge(order)
        self.state.wait_for_everyone()
        wanted = set(order)
        return [r for r in read_records(self.path) if r.get(self.key) in wanted], skipped
