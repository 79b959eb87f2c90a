"""Does a grounding in the caption prompt help? Object recall and CHAIR of captions on shapes-world
images, without context (p(z | c)) and with the scene oracle's grounding as context (q(z | c, g)).

    python benchmarks/tiny_context.py [--model refloop-tiny] [--domain wild] [--images 200] [--scene-seed 7]

Two ways to choose what the oracle is asked: `prior` grounds the phrases of the model's own
caption (SVP's prior -> ground -> guided sampling, as iSVP does), `categories` asks for every
colour-shape pair of the shapes world (a detector run over a category list). How much a guided
caption follows its grounding: `in_grounding`, the share of the caption's objects that the
grounding names, and `grounding_used`, the share of the grounding's labels the caption names;
`reference` gives both for the grammar's caption of each scene, a caption that names exactly the
scene's objects (a caption copying the labels would score 100 on both, false positives
included). Scenes come from
`--scene-seed` (default the evaluation seed; 7 is the validation seed the SVP benchmark chose its
settings on). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from refloop.evaluation.hallucination import chair, object_recall, shapes_table
from refloop.evaluation.object_metrics import object_mentions
from refloop.grounding import Grounding, SceneOracle, grounding_context, phrases_from_caption, scene_record, shapes_vocabulary
from refloop.models import load_vlm
from refloop.models.base import GenerateOptions
from refloop.world import COLOURS, EVAL_SEED, SHAPES, caption, get_style, render, sample_scene

# every colour-shape pair of the shapes world: the oracle run as a detector over a category list
CATEGORIES = [f"{c} {s}" for c in COLOURS for s in SHAPES]


def grounding_use(captions: list[str], groundings: list[Grounding]) -> dict:
    """Shares (in %) of the captions' objects that their groundings name, and of the groundings'
    labels that the captions name, pooled over images."""
    table = shapes_table()
    named = in_grounding = labels_total = labels_used = 0
    for text, grounding in zip(captions, groundings, strict=True):
        mentioned = object_mentions(text, table)
        labels = object_mentions(" , ".join(grounding.labels), table)
        named += len(mentioned)
        in_grounding += len(mentioned & labels)
        labels_total += len(labels)
        labels_used += len(labels & mentioned)
    return {
        "in_grounding": round(100 * in_grounding / max(named, 1), 2),
        "grounding_used": round(100 * labels_used / max(labels_total, 1), 2),
    }


def caption_scores(captions: list[str], scenes, gt: list[frozenset[str]]) -> dict:
    table = shapes_table()
    h = chair(captions, gt, table, protocol="refloop")  # each object once per caption, as its recorded numbers
    return {
        "object_recall": round(100 * object_recall(captions, gt, table, protocol="refloop")["object_recall"], 2),
        "chair_i": round(100 * h["chair_i"], 2),
        "chair_s": round(100 * h["chair_s"], 2),
        "exact_caption": round(100 * sum(c == caption(s) for c, s in zip(captions, scenes, strict=True)) / len(scenes), 2),
    }


def ground_truth(scenes) -> list[frozenset[str]]:
    return [frozenset(f"{o.colour} {o.shape}" for o in s.objects) for s in scenes]


def guided_captions(vlm, images, groundings: list[Grounding], options: GenerateOptions) -> list[str]:
    """Greedy q(z | c, g): one caption per image, its grounding written into the caption prompt."""
    prompts = [
        vlm.profile.grounded_caption_prompt(grounding_context(g, img.size, codec=vlm.profile.codec))
        for g, img in zip(groundings, images, strict=True)
    ]
    return [vlm.profile.read_caption(group[0].text) for group in vlm.generate(images, prompts, options)]


def guided_scores(guided: list[str], scenes, groundings: list[Grounding]) -> dict:
    """Caption scores of the guided captions, how far they follow their groundings, and the same
    shares for the grammar's captions (`reference`)."""
    return (
        caption_scores(guided, scenes, ground_truth(scenes))
        | grounding_use(guided, groundings)
        | {"reference": grounding_use([caption(s) for s in scenes], groundings)}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="refloop-tiny")
    parser.add_argument("--domain", default="wild")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--miss-rate", type=float, default=0.1)
    parser.add_argument("--false-positive-rate", type=float, default=0.1)
    parser.add_argument("--jitter", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="the oracle's seed")
    parser.add_argument("--scene-seed", type=int, default=EVAL_SEED, help="scenes of this world seed (7: the SVP validation split)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("REFLOOP_THREADS", "1")))

    vlm = load_vlm(args.model, device="cpu", batch_size=50)
    scenes = [sample_scene(get_style(args.domain), args.scene_seed, i) for i in range(args.images)]
    images = [render(s) for s in scenes]
    records = [scene_record(s, img) for s, img in zip(scenes, images, strict=True)]
    oracle = SceneOracle(args.miss_rate, args.false_positive_rate, args.jitter, args.seed)
    options = GenerateOptions(max_new_tokens=40)

    prior = vlm.caption(images, options)
    result = {"model": args.model, "domain": args.domain, "scene_seed": args.scene_seed, "images": args.images, "grounder": oracle.name}
    result["no_context"] = caption_scores(prior, scenes, ground_truth(scenes))
    phrase_sources = {"prior": [phrases_from_caption(c, shapes_vocabulary()) for c in prior], "categories": [CATEGORIES] * len(scenes)}
    for source, phrases in phrase_sources.items():
        groundings = oracle.ground(images, phrases, records)
        guided = guided_captions(vlm, images, groundings, options)
        result[f"context_{source}"] = guided_scores(guided, scenes, groundings) | {
            "detections_per_image": round(sum(len(g) for g in groundings) / len(groundings), 2)
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
