"""CHAIR (Rohrbach et al. 2018) and object recall of captions, under two protocols.

- `protocol="original"` (the default, what published tables report): the original `chair.py`.
  With the COCO reader (`chair_words`, the default table) objects are read as that release reads
  them; every mention counts, so "three zebras" written three times in a caption without a zebra
  is 3 hallucinated mentions; the ground truth is the annotated objects plus, when `references`
  are given, the objects named in the image's reference captions.
- `protocol="refloop"`: refloop's reading (`synonyms.coco_table` by default: longest phrase first,
  plurals, "orange" the colour is no fruit), each object counted once per caption, ground truth =
  annotations only (`references` extend it only when passed).

Either way, per caption:
- CHAIR_i = hallucinated mentions / mentions, summed over captions (per caption 0.0 when nothing
  is named; over a corpus that names nothing, None: undefined, see `undefined_metrics`);
- CHAIR_s = captions with at least one hallucinated mention / captions;
- object recall = ground-truth objects named (each once) / ground-truth objects, summed over images
  (None when there is no ground-truth object).

A `table` (a `synonyms.SynonymTable` such as the shapes world's, or `chair_words.ChairWords`)
replaces the reader; the protocol still decides how mentions count.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import Protocol

from refloop.evaluation.chair_words import chair_words
from refloop.evaluation.synonyms import coco_table

PROTOCOLS = ("original", "refloop")


class ObjectReader(Protocol):
    """What CHAIR needs of a table: its name and every (surface word, object) mention in order."""

    name: str

    def matches(self, text: str) -> list[tuple[str, str]]: ...


def default_table(protocol: str) -> ObjectReader:
    """COCO's 80 objects as the protocol reads them."""
    _check(protocol)
    return chair_words() if protocol == "original" else coco_table()


def _check(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown CHAIR protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def object_mentions(text: str, table: ObjectReader) -> set[str]:
    """The objects a caption names."""
    return {obj for _, obj in table.matches(text)}


def reference_objects(references: Sequence[str], table: ObjectReader) -> set[str]:
    """The objects named in an image's reference captions (the original protocol adds them to the ground truth)."""
    return {obj for ref in references for _, obj in table.matches(ref)}


def caption_objects(
    text: str,
    gt_objects: AbstractSet[str],
    table: ObjectReader,
    protocol: str = "refloop",
    references: Sequence[str] = (),
) -> dict:
    """One caption's row: the words read and the objects they name (every mention under
    "original", each object once under "refloop"), which of those are absent (hallucinated), which
    ground-truth objects it names (recalled) and misses, and its own CHAIR_i, CHAIR_s and recall."""
    _check(protocol)
    found = table.matches(text)
    mentioned = [obj for _, obj in found]
    if protocol == "refloop":
        mentioned = list(dict.fromkeys(mentioned))  # each object once
    gt = set(gt_objects) | reference_objects(references, table)
    hallucinated = [obj for obj in mentioned if obj not in gt]
    recalled = sorted(set(mentioned) & gt)
    return {
        "caption": text,
        "words": [word for word, _ in found],
        "mentioned": mentioned if protocol == "original" else sorted(mentioned),
        "hallucinated": hallucinated if protocol == "original" else sorted(hallucinated),
        "recalled": recalled,
        "missed": sorted(gt - set(mentioned)),
        "gt_objects": sorted(gt),
        "chair_i": len(hallucinated) / len(mentioned) if mentioned else 0.0,
        "chair_s": int(bool(hallucinated)),
        "recall": len(recalled) / len(gt) if gt else None,
    }


def caption_rows(
    captions: Sequence[str],
    ground_truth: Sequence[AbstractSet[str]],
    table: ObjectReader | None = None,
    protocol: str = "original",
    references: Sequence[Sequence[str]] | None = None,
) -> list[dict]:
    """`caption_objects` rows of aligned captions and ground-truth sets (and reference captions)."""
    if len(captions) != len(ground_truth):
        raise ValueError(f"{len(captions)} captions for {len(ground_truth)} ground-truth object sets")
    if references is not None and len(references) != len(captions):
        raise ValueError(f"{len(captions)} captions for {len(references)} reference lists")
    table = table if table is not None else default_table(protocol)
    refs = references if references is not None else [()] * len(captions)
    return [caption_objects(c, g, table, protocol, r) for c, g, r in zip(captions, ground_truth, refs, strict=True)]


def chair_from_rows(rows: Sequence[dict]) -> dict:
    """CHAIR_i and CHAIR_s from `caption_objects` rows (None, undefined, when nothing is
    mentioned or there is no caption; `undefined_metrics` says why)."""
    mentions = sum(len(r["mentioned"]) for r in rows)
    hallucinated = sum(len(r["hallucinated"]) for r in rows)
    hallucinating = sum(bool(r["hallucinated"]) for r in rows)
    return {
        "chair_i": hallucinated / mentions if mentions else None,
        "chair_s": hallucinating / len(rows) if rows else None,
        "mentions": mentions,
        "hallucinated_mentions": hallucinated,
        "captions": len(rows),
        "hallucinating_captions": hallucinating,
    }


def recall_from_rows(rows: Sequence[dict]) -> dict:
    """Object recall from `caption_objects` rows, over all ground-truth objects (None, undefined,
    when there are none)."""
    gt = sum(len(r["gt_objects"]) for r in rows)
    recalled = sum(len(r["recalled"]) for r in rows)
    return {"object_recall": recalled / gt if gt else None, "recalled_objects": recalled, "gt_objects": gt}


def undefined_metrics(metrics: dict, table: str) -> dict[str, str]:
    """Why each CHAIR / recall value of `metrics` is None (for the metrics file, beside the nulls)."""
    reasons = {
        "object_recall": f"no image has a ground-truth object named in the {table} category table",
        "chair_i": f"no caption mentions an object of the {table} category table",
        "chair_s": "no caption was scored",
    }
    return {k: why for k, why in reasons.items() if k in metrics and metrics[k] is None}


def chair(
    captions: Sequence[str],
    ground_truth: Sequence[AbstractSet[str]],
    table: ObjectReader | None = None,
    protocol: str = "original",
    references: Sequence[Sequence[str]] | None = None,
) -> dict:
    """CHAIR_i, CHAIR_s and their counts, with per-caption rows under "samples" (the mentioned and
    hallucinated objects, repeats included under "original"). `table=None`: COCO's 80 objects as
    the protocol reads them."""
    rows = caption_rows(captions, ground_truth, table, protocol, references)
    return chair_from_rows(rows) | {"protocol": protocol, "samples": rows}


def object_recall(
    captions: Sequence[str],
    ground_truth: Sequence[AbstractSet[str]],
    table: ObjectReader | None = None,
    protocol: str = "original",
    references: Sequence[Sequence[str]] | None = None,
) -> dict:
    """Ground-truth objects named / ground-truth objects, with per-caption rows under "samples"."""
    rows = caption_rows(captions, ground_truth, table, protocol, references)
    return recall_from_rows(rows) | {"protocol": protocol, "samples": rows}
