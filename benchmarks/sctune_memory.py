"""Peak memory of SC-Tune's roles: adapters on one base (refloop) vs three full copies (the
authors' release: policy, frozen partner and reference), same model and batch.

    python benchmarks/sctune_memory.py [--hidden 1024 --layers 16]

Each measurement runs in a fresh process and reads its peak RSS. The model is a refloop-tiny
architecture scaled up (random weights) so that weights dominate the footprint. Writes
benchmarks/results/sctune_memory.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, hidden: int, layers: int, batch: int) -> dict:
    import torch

    from refloop.methods.sctune import BoxItem, SCTune, SCTuneConfig
    from refloop.models.hf import HFVLM
    from refloop.models.profiles import TinyProfile
    from refloop.models.tiny.pretrain import PretrainConfig, build_model
    from refloop.training.roles import LoraSettings
    from refloop.world import get_style, render, sample_scene

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, processor = build_model(PretrainConfig(hidden_size=hidden, num_layers=layers, num_heads=16))
    model.eval()
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    scenes = [sample_scene(get_style("crowded"), 0, i) for i in range(batch)]
    images = [render(s) for s in scenes]
    boxes = [s.objects[0].box for s in scenes]
    vlm = HFVLM(model, processor, TinyProfile(), batch_size=batch)
    started = time.perf_counter()
    cfg = SCTuneConfig(
        phases=1,
        describer_steps=1,
        batch_size=batch,
        describer_lr=1e-4,
        max_new_tokens=8,
        lora=LoraSettings(r=16, alpha=32),
        generation_batch_size=batch,
    )
    if mode == "single":
        # One model, inference: describe then locate (the evaluation loop).
        captions = vlm.describe(images, boxes)
        vlm.locate(images, captions)
    elif mode == "adapters":
        # One base + describer/locator adapters, a full describer step (rollout, reference, PPO update).
        train = [BoxItem("", b, image=img) for b, img in zip(boxes, images)]
        tuner = SCTune.from_base(vlm, cfg, train)
        torch.manual_seed(0)
        tuner.describer_step(tuner._batch(0))
    elif mode == "copies":
        # The authors' layout: three full models (describer, frozen locator, frozen reference),
        # running the same rollout and scoring, without any optimizer state.
        locator = copy.deepcopy(model)
        reference = copy.deepcopy(model)
        captions = vlm.describe(images, boxes)
        HFVLM(locator, processor, TinyProfile(), batch_size=batch).locate(images, captions)
        HFVLM(reference, processor, TinyProfile(), batch_size=batch).describe(images, boxes)
    else:
        raise ValueError(mode)
    return {
        "mode": mode,
        "peak_mb": round(peak_mb(), 1),
        "weights_mb": round(weights_mb, 1),
        "seconds": round(time.perf_counter() - started, 2),
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.hidden, args.layers, args.batch)))
        return
    runs = {}
    for mode in ("single", "adapters", "copies"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--hidden",
                str(args.hidden),
                "--layers",
                str(args.layers),
                "--batch",
                str(args.batch),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(runs[mode], flush=True)
    result = {
        "benchmark": "sctune_memory",
        "model": f"refloop-tiny architecture, hidden {args.hidden}, {args.layers} layers, random weights",
        "params": runs["single"]["params"],
        "weights_mb": runs["single"]["weights_mb"],
        "batch": args.batch,
        "single_model_peak_mb": runs["single"]["peak_mb"],
        "adapter_roles_peak_mb": runs["adapters"]["peak_mb"],
        "three_copies_peak_mb": runs["copies"]["peak_mb"],
        "adapter_over_single": round(runs["adapters"]["peak_mb"] / runs["single"]["peak_mb"], 3),
        "copies_over_single": round(runs["copies"]["peak_mb"] / runs["single"]["peak_mb"], 3),
        "notes": "adapters: a full SC-Tune describer step (sampling, locator, reference, 2 PPO epochs with AdamW on adapters); "
        "copies: the same rollout on three full copies, no optimizer (a lower bound for the authors' full-parameter design)",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sctune_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
