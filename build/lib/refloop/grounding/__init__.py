"""Grounders: images + phrases -> boxes, labels, scores (SVP's feedback g(z_p, c)), behind one
interface, and the grounding written as prompt context."""

from refloop.grounding.base import Grounder, Grounding
from refloop.grounding.context import NormalisedXYXY, grounding_context, parse_grounding_context
from refloop.grounding.detectors import HFGroundingDINO, HFOwlV2
from refloop.grounding.oracle import SceneOracle, scene_objects, scene_record
from refloop.grounding.phrases import Vocabulary, category_phrases, phrases_from_caption, shapes_vocabulary, singular
from refloop.grounding.vlm import Florence2Grounder, VLMGrounder, parse_phrase_grounding

__all__ = [
    "Florence2Grounder",
    "Grounder",
    "Grounding",
    "HFGroundingDINO",
    "HFOwlV2",
    "NormalisedXYXY",
    "SceneOracle",
    "VLMGrounder",
    "Vocabulary",
    "category_phrases",
    "grounding_context",
    "parse_grounding_context",
    "parse_phrase_grounding",
    "phrases_from_caption",
    "scene_objects",
    "scene_record",
    "shapes_vocabulary",
    "singular",
]
