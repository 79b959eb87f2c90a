"""Relations between shapes-world objects, read off their boxes: the Visual Genome triplets
(subject - predicate - object) the shapes world lacks, so Pink's relation tasks (Sec. 3.2) run
on the embedded default.

Only predicates that a box pair settles without judgement are produced: "left of" means the
whole subject lies left of the whole object (their x-ranges do not overlap), and "larger than"
means at least twice the area, so two annotators (or two code paths) cannot disagree. Scene
objects never overlap, so every ordered pair has at least one spatial predicate.
"""

from __future__ import annotations

from refloop.boxes import Box
from refloop.world.scene import Scene

# In the order a pair's predicates are listed.
PREDICATES = ("left of", "right of", "above", "below", "larger than", "smaller than")
# "larger than" needs this area ratio: the shapes world's size classes overlap in area below it (wild).
SIZE_RATIO = 2.0


def box_predicates(subject: Box, object_: Box) -> list[str]:
    """Every predicate p for which 'subject p object' holds, in PREDICATES order."""
    holds = {
        "left of": subject.x2 <= object_.x1,
        "right of": subject.x1 >= object_.x2,
        "above": subject.y2 <= object_.y1,
        "below": subject.y1 >= object_.y2,
        "larger than": subject.area >= SIZE_RATIO * object_.area,
        "smaller than": object_.area >= SIZE_RATIO * subject.area,
    }
    return [p for p in PREDICATES if holds[p]]


def scene_relations(scene: Scene) -> list[tuple[int, str, int]]:
    """(subject index, predicate, object index) for every ordered pair of the scene's objects:
    complete, so "all objects the subject is left of" can be answered from the list."""
    out = []
    for i, subject in enumerate(scene.objects):
        for j, object_ in enumerate(scene.objects):
            if i != j:
                out += [(i, p, j) for p in box_predicates(subject.box, object_.box)]
    return out
