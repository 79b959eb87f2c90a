"""Which part of the `wild` style makes captions hallucinate, and does a grounding in the prompt
help there? Held-out `wild` scenes rendered with one factor of the style taken away at a time
(textured background -> plain, outlines off, shade jitter off, all three; the same scenes in every
row, only their drawing differs), captioned without
context (p(z | c)) and with the scene oracle's grounding of every colour-shape pair
(q(z | c, g)); columns as benchmarks/tiny_context.py (object recall, CHAIR_i, the share of a
guided caption's objects its grounding names).

    python benchmarks/wild_factors.py [--model refloop-tiny] [--images 200] [--scene-seed 7]

Seed 7 is the SVP benchmark's validation split. Writes benchmarks/results/wild_factors.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch
from tiny_context import CATEGORIES, caption_scores, ground_truth, guided_captions, guided_scores

from refloop.grounding import SceneOracle, scene_record
from refloop.models import load_vlm
from refloop.models.base import GenerateOptions
from refloop.world import get_style, render, sample_scene
from refloop.world.scene import BASE_RGB

RESULTS = Path(__file__).parent / "results"
# name: (shade jitter kept, background, outline)
VARIANTS = {
    "wild": (True, "texture", True),
    "plain background": (True, "plain", True),
    "no outlines": (True, "texture", False),
    "no shade jitter": (False, "texture", True),
    "plain, no outlines, no jitter": (False, "plain", False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="refloop-tiny")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--scene-seed", type=int, default=7, help="world seed of the scenes (7: the SVP validation split)")
    parser.add_argument("--result", default=str(RESULTS / "wild_factors.json"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("REFLOOP_THREADS", "1")))
    vlm = load_vlm(args.model, device="cpu", batch_size=50)
    oracle = SceneOracle(0.1, 0.1, 0.05, 0)
    options = GenerateOptions(max_new_tokens=40)
    scenes = [sample_scene(get_style("wild"), args.scene_seed, i) for i in range(args.images)]
    # the same scenes with each object in its colour's base shade (sampling without jitter would
    # draw other scenes: the jitter takes random draws)
    unjittered = [dataclasses.replace(s, objects=tuple(dataclasses.replace(o, rgb=BASE_RGB[o.colour]) for o in s.objects)) for s in scenes]
    result = {"model": args.model, "scene_seed": args.scene_seed, "images": args.images, "grounder": oracle.name, "variants": {}}
    for name, (jitter, background, outline) in VARIANTS.items():
        drawn = scenes if jitter else unjittered
        images = [render(s, background, outline) for s in drawn]
        records = [scene_record(s, im) for s, im in zip(drawn, images, strict=True)]
        groundings = oracle.ground(images, [CATEGORIES] * len(images), records)
        prior = vlm.caption(images, options)
        guided = guided_captions(vlm, images, groundings, options)
        result["variants"][name] = {
            "no_context": caption_scores(prior, drawn, ground_truth(drawn)),
            "context": guided_scores(guided, drawn, groundings),
        }
        print(name, json.dumps(result["variants"][name]), flush=True)
    Path(args.result).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
