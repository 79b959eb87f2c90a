"""The one resumable, sharded pass of every long job (evaluation, captioning, bootstrapping, SVP
sampling) over a list of items into one JSONL output.

- Batch b holds items b*B .. (b+1)*B - 1 of ALL items, whatever is already done, so a batch (and a
  sampling seed derived from b) is the same in every run, resumed or not, and for any number of
  processes.
- Under `accelerate launch` batch b runs on process b mod P. Each process appends the records of
  its batches to its own shard, `<output stem>.shards/<rank>.jsonl` (one process: rank 0's), one
  fsynced write per batch; a torn last line (a kill mid-write) is dropped by the one JSONL reader.
- A batch with any item not yet written runs whole, so its records are an uninterrupted run's,
  and only the missing records are appended. Every process counts as done the records of the
  output and of all shards.
- `finish` (every process): the main process streams the output and the shards in item order into
  the output, written aside and renamed (exactly the file one process writes), and the shards go.

Open it inside `runs.shared_run_directory`: the run directory's lock is the only lock.
"""

from __future__ import annotations

import logging
import os
import shutil
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
from PIL import Image

from refloop.data.jsonl import JsonlWriter, complete_lines, iter_records, parse_line, replaced_whole
from refloop.errors import DataError

T = TypeVar("T")

log = logging.getLogger(__name__)


def readable(
    items: Sequence[T], load: Callable[[T], Image.Image], on_error: str, skipped: list[DataError]
) -> tuple[list[T], list[Image.Image]]:
    """The items whose image decodes, and their images, under the failure policy: an image that
    does not decode stops the run (`on_error="fail"`) or drops its item into `skipped` ("skip")."""
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


def batch_ranges(num_items: int, batch_size: int, rank: int = 0, world: int = 1) -> list[tuple[int, range]]:
    """(batch number, item indices) of the batches process `rank` of `world` runs: b mod world == rank."""
    starts = range(rank * batch_size, num_items, batch_size * world)
    return [(s // batch_size, range(s, min(s + batch_size, num_items))) for s in starts]


def share(num_items: int, batch_size: int, rank: int | None = None, world: int | None = None) -> int:
    """Items in the batches of process `rank` of `world` (its progress bar's total); by default
    this process's under the current launch (all of them in a single process)."""
    if rank is None or world is None:
        from accelerate import PartialState

        state = PartialState()
        rank, world = state.process_index, state.num_processes
    return sum(len(indices) for _, indices in batch_ranges(num_items, batch_size, rank, world))


@dataclass
class Batch(Generic[T]):
    """Batch `number` (its seed's stream), its items (undecodable ones dropped when images were
    asked for) and their images."""

    number: int
    items: list[T]
    images: list[Image.Image] = field(default_factory=list)


class ShardedRun(Generic[T]):
    """A resumable pass over `items` into `output` (JSONL, one record per item, found by the
    record's `field`, which equals `key(item)`), shared by the processes of `state` (a PartialState;
    default: the current one)."""

    def __init__(
        self, output: Path, items: Sequence[T], key: Callable[[T], object], batch_size: int, field: str = "id", state=None
    ) -> None:
        if state is None:
            from accelerate import PartialState

            state = PartialState()
        self.output, self.items, self.key, self.batch_size, self.field = Path(output), list(items), key, batch_size, field
        self.state, self.rank, self.world = state, state.process_index, state.num_processes
        self.index: dict[object, int] = {}
        for i, item in enumerate(self.items):
            self.index.setdefault(key(item), i)
        self.shards = self.output.with_name(self.output.stem + ".shards")
        self.shards.mkdir(parents=True, exist_ok=True)
        own = self.shards / f"{self.rank:03d}.jsonl"
        self.writer = JsonlWriter(own, key=field)
        others = [self.output, *(p for p in sorted(self.shards.glob("*.jsonl")) if p != own)]
        self.done = self.writer.done | {r[field] for p in others for r in iter_records(p) if field in r}
        self.writer.done = self.done  # records written here join the shared set
        self.skipped: list[DataError] = []
        if state.is_main_process and (resumed := len(self.done & self.index.keys())):
            finished = "all written already" if resumed == len(self.index) else f"resuming after {resumed} of {len(self.index)}"
            log.info(f"{self.output}: {finished} (an earlier run of the same command)")

    def batches(
        self,
        load: Callable[[T], Image.Image] | None = None,
        on_error: str = "fail",
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Batch[T]]:
        """This process's batches with an item not yet written; with `load`, their decodable items
        and images (undecodable ones counted in `skipped`; a batch with none is not yielded).
        `progress` counts this process's items, done or run."""
        for number, indices in batch_ranges(len(self.items), self.batch_size, self.rank, self.world):
            chunk = [self.items[i] for i in indices]
            if any(self.key(item) not in self.done for item in chunk):
                batch = Batch(number, chunk)
                if load is not None:
                    batch.items, batch.images = readable(chunk, load, on_error, self.skipped)
                if batch.items:
                    yield batch
            if progress:
                progress(len(chunk))

    def write(self, records) -> None:
        """Append the records not yet written (a rerun batch's others are already in some file)."""
        self.writer.write_many([r for r in records if r.get(self.field) not in self.done])

    def total(self, count: int) -> int:
        """`count` summed over the processes (every process calls it)."""
        if self.world == 1:
            return count
        from accelerate.utils import gather_object

        return sum(gather_object([count]))

    def finish(self) -> int:
        """Every process, after its batches: the main process merges the shards into the output;
        returns the items skipped (undecodable) by all processes."""
        self.writer.close()
        if self.skipped:  # each process names the images it could not decode (the count alone named none)
            shown = "; ".join(str(err) for err in self.skipped[:3]) + (f"; +{len(self.skipped) - 3} more" if len(self.skipped) > 3 else "")
            log.warning(f"{self.output.name}: {len(self.skipped)} items skipped under --on-error skip: {shown}")
        skipped = self.total(len(self.skipped))
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            merge(self.output, self.shards, self.index, self.field)
        self.state.wait_for_everyone()
        return skipped

    def rows(self) -> list[dict]:
        """The merged output's records of this run's items, in item order (after `finish`)."""
        return [r for r in iter_records(self.output) if r.get(self.field) in self.index]


def merge(output: Path, shards: Path, index: dict[object, int], field: str) -> None:
    """Write `output` anew from itself and the shard files in `shards`: each record once (the first
    found), in item order (`index`: key -> position; records of other keys follow in file order),
    byte for byte as written. Streams: only (position, file, offset) per record is held."""
    sources = sorted(shards.glob("*.jsonl")) if shards.is_dir() else []
    if not sources and output.exists():
        shutil.rmtree(shards, ignore_errors=True)
        return
    sources = ([output] if output.exists() else []) + sources
    position, source, offset = array("q"), array("H"), array("q")
    extra = len(index)
    for s, path in enumerate(sources):
        for number, (where, raw) in enumerate(complete_lines(path), start=1):
            if not raw.strip():
                continue
            found = index.get(parse_line(path, number, raw).get(field))
            if found is None:
                found, extra = extra, extra + 1
            position.append(found)
            source.append(s)
            offset.append(where)
    order = np.argsort(np.frombuffer(position, dtype=np.int64), kind="stable").tolist() if position else []
    handles = [open(p, "rb") for p in sources]
    try:
        with replaced_whole(output) as tmp, open(tmp, "wb") as out:
            last = -1
            for k in order:
                if position[k] == last:
                    continue
                last = position[k]
                handles[source[k]].seek(offset[k])
                out.write(handles[source[k]].readline())
            out.flush()
            os.fsync(out.fileno())
    finally:
        for handle in handles:
            handle.close()
    shutil.rmtree(shards, ignore_errors=True)
