"""POPE (Li et al. 2023): balanced yes/no existence questions and their scores.

POPE asks "is there a <object>?" about present objects (answer yes) and as many absent ones
(answer no) per image; absent objects are drawn uniformly (random), taken from the dataset's most
frequent objects (popular), or from those that co-occur most with the image's objects
(adversarial).

An answer is read under one of two rules (`RULES`):
- "reference" (the default, what published tables compare to): the POPE release's evaluate.py.
  Only the text before the first "." is read, commas dropped, split on spaces; the answer is "no"
  when one of those words is exactly "No", "no" or "not", otherwise "yes" - so an answer saying
  neither ("I don't know", "There is a cat", an empty answer) counts as YES, and so do "NO" and
  "No!" (not the exact words). lmms-eval's POPE task instead compares the stripped, lower-cased
  answer with the label; that is not offered.
- "refloop": the first whole word that is "yes" or "no", any case (`parse_yes_no`); an answer with
  neither is unparsed and counts as "no".
Both rules report `unparsed`, the answers that say neither yes nor no as a word.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from itertools import combinations

import numpy as np

from refloop.data.records import ImageRecord
from refloop.errors import RefloopError
from refloop.evaluation.synonyms import SynonymTable

STRATEGIES = ("random", "popular", "adversarial")
RULES = ("reference", "refloop")
_YES_NO = re.compile(r"[a-z]+")


def parse_yes_no(text: str | None) -> str | None:
    """refloop's reading: the first word of an answer that is "yes" or "no" (case-insensitive, whole
    words: "Yes, a dog." -> yes, "There is no dog." -> no, "NO" -> no, "Not sure" -> None). None:
    the answer says neither."""
    for word in _YES_NO.findall((text or "").lower()):
        if word in ("yes", "no"):
            return word
    return None


def _image_rng(seed: int, image_id: object, strategy: str) -> np.random.Generator:
    """One generator per image, so an image's questions do not depend on the other images."""
    return np.random.default_rng([seed, zlib.crc32(f"{strategy}:{image_id}".encode())])


def build_pope_questions(
    records: Sequence[ImageRecord],
    gt_objects: Sequence[AbstractSet[str]],
    strategy: str = "random",
    per_image: int = 3,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    table: SynonymTable | None = None,
) -> list[dict]:
    """Yes/no questions, balanced per image: n present objects (label "yes") and n absent ones
    (label "no"), n = min(per_image, present, absent); an image without objects gets none.

    Absent objects come from `categories` (default: every object of `gt_objects`):
    random: uniformly; popular: the objects in most images of the dataset; adversarial: the
    objects in most images together with the image's objects (summed over them). Ties go to the
    more frequent object, then the name. Present objects are drawn uniformly. Same seed, same
    questions; `table` adds the question text.
    """
    if strategy not in STRATEGIES:
        raise RefloopError(f"unknown POPE strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if per_image < 1:
        raise RefloopError(f"POPE asks at least one question per image, not {per_image}")
    if len(records) != len(gt_objects):
        raise ValueError(f"{len(records)} records for {len(gt_objects)} ground-truth object sets")
    universe = sorted(set(categories) if categories is not None else set().union(*gt_objects))
    frequency = Counter(obj for gt in gt_objects for obj in gt)
    together: Counter = Counter()
    for gt in gt_objects:
        for a, b in combinations(sorted(gt), 2):
            together[a, b] += 1
            together[b, a] += 1
    questions = []
    for rec, gt in zip(records, gt_objects, strict=True):
        present = sorted(gt)
        absent = [c for c in universe if c not in gt]
        n = min(per_image, len(present), len(absent))
        if n == 0:
            continue
        rng = _image_rng(seed, rec.image_id, strategy)
        yes = [present[i] for i in sorted(rng.choice(len(present), n, replace=False))]
        if strategy == "random":
            no = [absent[i] for i in sorted(rng.choice(len(absent), n, replace=False))]
        elif strategy == "popular":
            no = sorted(absent, key=lambda c: (-frequency[c], c))[:n]
        else:
            no = sorted(absent, key=lambda c: (-sum(together[p, c] for p in present), -frequency[c], c))[:n]
        for k, (obj, label) in enumerate([(o, "yes") for o in yes] + [(o, "no") for o in no]):
            row = {"id": f"{rec.image_id}:{k}", "image_id": rec.image_id, "image": str(rec.path), "object": obj, "label": label}
            if table is not None:
                row["question"] = table.question_for(obj)
            questions.append(row)
    return questions


def reference_reading(text: str | None) -> str:
    """The POPE release's reading of an answer: "no" when its first sentence holds the word "No",
    "no" or "not" (split on single spaces, commas dropped), else "yes". None reads as ""."""
    first = (text or "").split(".")[0].replace(",", "")
    return "no" if {"No", "no", "not"} & set(first.split(" ")) else "yes"


def read_answer(text: str | None, rule: str = "reference") -> str:
    """ "yes" or "no" under `rule` (see the module docstring)."""
    if rule == "reference":
        return reference_reading(text)
    if rule == "refloop":
        return parse_yes_no(text) or "no"
    raise ValueError(f"unknown POPE rule {rule!r}; choose one of {', '.join(RULES)}")


def pope_metrics(answers: Sequence[str | None], labels: Sequence[str], rule: str = "reference") -> dict:
    """Accuracy, precision, recall and F1 with "yes" as the positive class, the share of yes
    predictions, and `unparsed` (answers saying neither yes nor no as a word), under `rule`.
    Per-question rows under "samples". Precision or recall with an empty denominator is 0.0 (the
    release divides by zero there)."""
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers for {len(labels)} labels")
    bad = sorted({label for label in labels if label not in ("yes", "no")})
    if bad:
        raise ValueError(f"labels must be 'yes' or 'no', got {bad}")
    read_answer("", rule)  # refuses an unknown rule before any work
    rows = [
        {"answer": answer, "parsed": parse_yes_no(answer), "prediction": read_answer(answer, rule), "label": label}
        for answer, label in zip(answers, labels, strict=True)
    ]
    tp = sum(r["prediction"] == "yes" and r["label"] == "yes" for r in rows)
    fp = sum(r["prediction"] == "yes" and r["label"] == "no" for r in rows)
    tn = sum(r["prediction"] == "no" and r["label"] == "no" for r in rows)
    fn = sum(r["prediction"] == "no" and r["label"] == "yes" for r in rows)
    num = len(rows)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / num if num else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / num if num else 0.0,
        "unparsed": sum(r["parsed"] is None for r in rows),
        "rule": rule,
        "num": num,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "samples": rows,
    }
