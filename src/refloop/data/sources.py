"""Resolve a `--data` argument to records: a shapes-world domain, a COCO-style JSON, a
referring JSONL, or a parquet dataset (referring or detection rows, `refloop.data.parquet`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from refloop.data.loaders import LoadReport, OnError, load_coco, load_referring
from refloop.data.records import ImageRecord
from refloop.data.vocabulary import Vocabulary, shapes_vocabulary
from refloop.errors import RefloopError
from refloop.parallel import is_main_process
from refloop.world import DOMAINS, EVAL_SEED, TRAIN_SEED
from refloop.world.export import COCO_FILE, REFS_FILE, export_split

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    base = os.environ.get("REFLOOP_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "refloop")
    return Path(base)


def world_split_dir(domain: str, num_images: int, seed: int = EVAL_SEED) -> Path:
    """Export (once) and return the directory of a shapes-world evaluation split."""
    return export_split(domain, cache_dir() / "world" / f"{domain}-seed{seed}-n{num_images}", num_images, seed)


def load_data(
    spec: str,
    images: str | Path | None = None,
    on_error: OnError = "fail",
    num_images: int = 1000,
    seed: int = EVAL_SEED,
    verify_images: bool = True,
) -> tuple[list[ImageRecord], LoadReport]:
    """Records from a domain name (exported to the cache, then read by the referring loader, so
    the real loader is what runs), a *.json COCO file, a *.jsonl referring file or a *.parquet dataset.

    Its callers (consistency, eval, SC-Tune's supervised and evaluation data, the demo) read
    pixels, so the images are checked here, one header read per file: a missing or mismatched
    image is named before any model is loaded. `verify_images=False` (scoring a captions file,
    which needs annotations only) reads a .json / .jsonl file's annotations alone."""
    if spec in DOMAINS:
        return load_referring(world_split_dir(spec, num_images, seed) / REFS_FILE, on_error=on_error, verify_images=True)
    path = Path(spec)
    if path.suffix == ".json":
        return load_coco(path, images, on_error=on_error, verify_images=verify_images)
    if path.suffix == ".jsonl":
        return load_referring(path, images, on_error=on_error, verify_images=verify_images)
    if path.suffix == ".parquet":
        from refloop.data.parquet import load_parquet

        return load_parquet(path, images, on_error=on_error)
    if path.is_dir():
        raise RefloopError(f"--data {spec!r} is a directory: give its annotation file (a .json COCO or .jsonl referring file)")
    csv = (
        "; an OpenImages .csv is read by refloop.data.formats.load_openimages in Python (write its records out, e.g. as COCO)"
        if path.suffix.lower() == ".csv"
        else ""
    )
    raise RefloopError(
        f"--data {spec!r} is neither a shapes-world domain ({', '.join(DOMAINS)}) nor a .json (COCO) / .jsonl (referring) "
        f"/ .parquet (Hugging Face dataset) file{csv}"
    )


@dataclass(frozen=True)
class Detections:
    """Images with every annotated box (bootstrapping's and SVP's input), the root their file
    names are relative to, and whether the objects carry referring expressions (for a domain: the
    shapes grammar's unique ones), and the data's closed vocabulary when it has one (a domain:
    the shapes world's; free-text data: None)."""

    records: list[ImageRecord]
    report: LoadReport
    image_root: Path
    expressions: bool
    vocabulary: Vocabulary | None = None
    # every category the file names, over all its images (before a num_images cut): the label set a
    # detector run over the dataset is asked for (a domain: its vocabulary's categories instead)
    categories: tuple[str, ...] = ()


def first_images(records: list[ImageRecord], num_images: int | None, data: str, how: str) -> list[ImageRecord]:
    """A data file's first `num_images` records (all without a limit), said when the file holds more
    (from the main process): "DATA: its first N of M images HOW"."""
    if not num_images or len(records) <= num_images:
        return records
    if is_main_process():
        log.warning(f"{data}: its first {num_images} of {len(records)} images {how}")
    return records[:num_images]


def load_detections(
    data: str,
    images: str | Path | None = None,
    on_error: OnError = "fail",
    num_images: int | None = None,
    scene_seed: int = TRAIN_SEED,
    limit: str = "num_images; --num-images on the command line",
) -> Detections:
    """Every box of a detection file (COCO / Objects365 .json, referring .jsonl) or of a
    shapes-world domain. A domain is read from its COCO export (all boxes, not only those the
    grammar can refer to), with the grammar's expressions of each object from its refs export;
    its scenes are the training ones (seed TRAIN_SEED) unless `scene_seed` says otherwise. A file
    cut to its first `num_images` says so, naming the setting as `limit` spells it."""
    if data in DOMAINS:
        root = world_split_dir(data, num_images or 1000, scene_seed)
        records, report = load_coco(root / COCO_FILE, root, on_error=on_error, verify_images=True)
        refs, _ = load_referring(root / REFS_FILE, root)
        grammar = {(r.image_id, o.ann_id): o.expressions for r in refs for o in r.objects}
        records = [
            replace(r, objects=tuple(replace(o, expressions=grammar.get((r.image_id, o.ann_id), ())) for o in r.objects)) for r in records
        ]
        return Detections(records, report, root.resolve(), True, shapes_vocabulary())
    records, report = load_data(data, images, on_error=on_error)
    categories = tuple(sorted({o.category for r in records for o in r.objects if o.category}))
    records = first_images(records, num_images, data, f"are used ({limit})")
    root = Path(images if images is not None else Path(data).parent).resolve()
    return Detections(records, report, root, any(o.expressions for r in records for o in r.objects), categories=categories)
