"""Evaluation apart from training: self-consistency (Pr@0.5), REC accuracy, REG and caption metrics,
CHAIR, object recall and POPE. The metric functions are importable from here (loaded on first use):

    from refloop.evaluation import caption_metrics, chair, object_recall, pope_metrics, rec_accuracy
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "caption_metrics": "captions",
    "chair": "object_metrics",
    "object_recall": "object_metrics",
    "chair_from_rows": "object_metrics",
    "recall_from_rows": "object_metrics",
    "PROTOCOLS": "object_metrics",
    "pope_metrics": "pope",
    "build_pope_questions": "pope",
    "parse_yes_no": "pope",
    "reference_reading": "pope",
    "RULES": "pope",
    "rec_accuracy": "referring",
    "coco_table": "synonyms",
    "shapes_table": "synonyms",
    "chair_words": "chair_words",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
