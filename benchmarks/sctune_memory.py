"""Peak memory of SC-Tune's roles: LoRA adapters on one base (refloop) vs three full copies (the
authors' release: trained describer, frozen locator, frozen reference), same model and batch.

    python benchmarks/sctune_memory.py [--hidden 768 --layers 16 --batch 8]

Each measurement is a fresh process reading its own peak RSS. The model is the refloop-tiny
architecture scaled up with random weights, so weights dominate. Workloads:
- rollout (inference): SC-Tune's describer rollout - sample captions, re-locate them, the
  reference's greedy caption re-located, old and reference log-probs - on
  single: one model playing every role (the floor), adapters: refloop's roles, copies: three models;
- train step: the rollout plus 2 PPO epochs; adapters: AdamW on LoRA tensors (also with
  micro_batch_size=1: one sequence per forward+backward, gradients accumulated); copies: AdamW on
  the full describer copy (the authors' full-parameter design).
Writes benchmarks/results/sctune_memory.json.
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
MODES = ("single", "adapters", "copies", "adapters_train", "adapters_train_micro1", "copies_train")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, hidden: int, layers: int, batch: int) -> dict:
    import torch

    from refloop.data.records import BoxItem
    from refloop.methods.pretrain import PretrainConfig, build_model
    from refloop.methods.sctune import SCTune, SCTuneConfig
    from refloop.models.base import GenerateOptions
    from refloop.models.hf import HFVLM
    from refloop.models.profiles import TinyProfile
    from refloop.training.adapters import LoraSettings
    from refloop.training.ppo import clipped_policy_loss, pad_rows
    from refloop.world import get_style, render, sample_scene

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, processor = build_model(PretrainConfig(hidden_size=hidden, num_layers=layers, num_heads=16))
    model.eval()
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    scenes = [sample_scene(get_style("crowded"), 0, i) for i in range(batch)]
    images = [render(s) for s in scenes]
    boxes = [s.objects[0].box for s in scenes]
    profile = TinyProfile()
    prompts = [profile.reg_prompt(b, img.size) for b, img in zip(boxes, images)]
    sampling = GenerateOptions(do_sample=True, top_k=100, top_p=0.9, max_new_tokens=8)
    started = time.perf_counter()
    if mode in ("adapters", "adapters_train", "adapters_train_micro1"):
        cfg = SCTuneConfig(
            phases=1,
            describer_steps=1,
            batch_size=batch,
            describer_lr=1e-4,
            max_new_tokens=8,
            lora=LoraSettings(r=16, alpha=32),
            generation_batch_size=batch,
            top_p=0.9,
            micro_batch_size=1 if mode == "adapters_train_micro1" else None,
        )
        tuner = SCTune.from_base(
            HFVLM(model, processor, profile, batch_size=batch), cfg, [BoxItem("", b, image=img) for b, img in zip(boxes, images)]
        )
        if mode in ("adapters_train", "adapters_train_micro1"):
            tuner.describer_step(tuner.batch(0))
        else:
            describer, locator, reference = tuner.describer, tuner.locator, tuner.reference
            samples = [c[0] for c in describer.generate(images, prompts, sampling)]
            ids = [c.token_ids for c in samples]
            locator.locate(images, [profile.read_expression(c.text) for c in samples])
            greedy = reference.describe(images, boxes)
            reference.logprobs(images, prompts, ids)
            locator.locate(images, greedy)
            describer.logprobs(images, prompts, ids)
    else:
        describer = HFVLM(model, processor, profile, batch_size=batch)
        locator = reference = describer
        if mode in ("copies", "copies_train"):
            locator = HFVLM(copy.deepcopy(model), processor, profile, batch_size=batch)
            reference = HFVLM(copy.deepcopy(model), processor, profile, batch_size=batch)
        samples = [c[0] for c in describer.generate(images, prompts, sampling)]
        ids = [c.token_ids for c in samples]
        locator.locate(images, [profile.read_expression(c.text) for c in samples])
        locator.locate(images, reference.describe(images, boxes))
        old, mask = pad_rows(describer.logprobs(images, prompts, ids))
        reference.logprobs(images, prompts, ids)
        if mode == "copies_train":
            params = [p for p in model.parameters()]
            optimizer = torch.optim.AdamW(params, lr=1e-6)
            for _ in range(2):
                new, _ = pad_rows(describer.logprobs(images, prompts, ids, grad=True))
                loss, _ = clipped_policy_loss(new, old, torch.ones_like(old), mask, 0.2)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return {
        "mode": mode,
        "peak_mb": round(peak_mb(), 1),
        "weights_mb": round(weights_mb, 1),
        "seconds": round(time.perf_counter() - started, 2),
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.hidden, args.layers, args.batch)))
        return
    runs = {}
    for mode in MODES:
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
    single = runs["single"]["peak_mb"]
    result = {
        "benchmark": "sctune_memory",
        "model": f"refloop-tiny architecture, hidden {args.hidden}, {args.layers} layers, random weights",
        "params": runs["single"]["params"],
        "weights_mb": runs["single"]["weights_mb"],
        "batch": args.batch,
        "workload": "SC-Tune describer rollout: sample, re-locate, reference greedy caption re-located, old and reference log-probs",
        "single_model_peak_mb": single,
        "adapter_roles_peak_mb": runs["adapters"]["peak_mb"],
        "three_copies_peak_mb": runs["copies"]["peak_mb"],
        "adapter_over_single": round(runs["adapters"]["peak_mb"] / single, 3),
        "copies_over_single": round(runs["copies"]["peak_mb"] / single, 3),
        "train_step": {
            "adapter_roles_peak_mb": runs["adapters_train"]["peak_mb"],
            "adapter_roles_micro_batch_1_peak_mb": runs["adapters_train_micro1"]["peak_mb"],
            "adapter_roles_micro_batch_1_seconds": runs["adapters_train_micro1"]["seconds"],
            "adapter_roles_seconds": runs["adapters_train"]["seconds"],
            "three_copies_full_parameter_peak_mb": runs["copies_train"]["peak_mb"],
            "note": "rollout + 2 PPO epochs; beyond weights: backprop activations (both), full gradients + AdamW state (copies)",
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sctune_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
