"""The synthetic shapes world: refloop's offline stand-in for COCO, Objects365 and OpenImages."""

from refloop.world.domains import DOMAINS, IN_DOMAIN, STYLES, get_style
from refloop.world.grammar import canonical_expression, caption, existence_question, referring_expressions, vocabulary
from refloop.world.render import render
from refloop.world.scene import COLOURS, IMAGE_SIZE, SHAPES, SIZES, Scene, ShapeObject, sample_scene

# Seeds of the standard splits; training never touches the evaluation seed.
TRAIN_SEED = 0
EVAL_SEED = 1

__all__ = [
    "COLOURS",
    "DOMAINS",
    "EVAL_SEED",
    "IMAGE_SIZE",
    "IN_DOMAIN",
    "SHAPES",
    "SIZES",
    "STYLES",
    "TRAIN_SEED",
    "Scene",
    "ShapeObject",
    "canonical_expression",
    "caption",
    "existence_question",
    "get_style",
    "referring_expressions",
    "render",
    "sample_scene",
    "vocabulary",
]
