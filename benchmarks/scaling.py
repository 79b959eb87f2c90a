"""Scaling curves (issue 12, item 4).

    python benchmarks/scaling.py [--threads 2] [--sizes 256x8,512x12,768x16,1024x20,1280x24]

Writes benchmarks/results/scaling.json and scaling.png.
- Describer step time against batch size (boxes per step, 4 samples each, 12-token captions) and
  against caption length (32 boxes): an SC-Tune describer step (group baseline, 2 PPO epochs) on
  the refloop-tiny architecture with random weights, which never emits EOS, so every caption is
  exactly `max_new_tokens` long.
- Peak memory of one SC-Tune train step (rollout + 2 PPO epochs, batch 8) against model size,
  refloop's adapter roles on one base vs the authors' three full copies with full-parameter AdamW
  on the describer; random-init models of the refloop-tiny architecture from ~10M to ~500M
  parameters; each measurement a fresh process (`benchmarks/sctune_memory.py --child`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MEMORY = Path(__file__).parent / "sctune_memory.py"


def step_seconds(batch: int, new_tokens: int, repeats: int = 2) -> float:
    import torch

    from refloop.data.records import BoxItem
    from refloop.methods.pretrain import PretrainConfig, build_model
    from refloop.methods.sctune import SCTune, SCTuneConfig
    from refloop.models.hf import HFVLM
    from refloop.models.profiles import TinyProfile
    from refloop.training.adapters import LoraSettings
    from refloop.world import get_style, render, sample_scene

    torch.manual_seed(0)
    model, processor = build_model(PretrainConfig(hidden_size=160, num_layers=4, num_heads=4))
    model.eval()
    eos = processor.tokenizer.eos_token_id
    vlm = HFVLM(model, processor, TinyProfile(), batch_size=batch * 4)
    scenes = [sample_scene(get_style("crowded"), 0, i) for i in range(batch)]
    items = [BoxItem("", s.objects[0].box, image=render(s)) for s in scenes]
    cfg = SCTuneConfig(
        batch_size=batch,
        baseline="group",
        group_size=4,
        max_new_tokens=new_tokens,
        describer_lr=1e-4,
        lora=LoraSettings(r=16, alpha=32),
        generation_batch_size=batch * 4,
    )
    tuner = SCTune.from_base(vlm, cfg, items)
    tuner.vlm.suppress_tokens = sorted({*tuner.vlm.suppress_tokens, eos})  # fixed-length captions
    tuner.describer_step(items)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        tuner.describer_step(items)
    return (time.perf_counter() - t0) / repeats


def memory(hidden: int, layers: int, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(MEMORY), "--child", mode, "--hidden", str(hidden), "--layers", str(layers), "--batch", "8"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    b = result["step_vs_batch"]
    axes[0].plot([r["batch"] for r in b], [r["seconds"] for r in b], "o-")
    axes[0].set(xlabel="boxes per step (x4 samples)", ylabel="seconds per describer step", title="Step time vs batch (12-token captions)")
    axes[0].set_xscale("log", base=2)
    c = result["step_vs_caption_length"]
    axes[1].plot([r["tokens"] for r in c], [r["seconds"] for r in c], "o-")
    axes[1].set(xlabel="caption tokens", ylabel="seconds per describer step", title="Step time vs caption length (32 boxes)")
    m = result["memory_vs_size"]
    params = [r["params"] / 1e6 for r in m]
    axes[2].plot(params, [r["adapter_roles_peak_mb"] / 1024 for r in m], "o-", label="refloop: adapter roles on one base")
    axes[2].plot(params, [r["three_copies_peak_mb"] / 1024 for r in m], "s-", label="three full copies (authors)")
    axes[2].set(xlabel="parameters (M)", ylabel="peak RSS (GiB)", title="SC-Tune train step peak memory")
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="8,16,32,64,128")
    parser.add_argument("--lengths", default="4,8,16,32")
    parser.add_argument("--sizes", default="256x8,512x12,768x16,1024x20,1280x24", help="hidden x layers")
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    result: dict = {"benchmark": "scaling", "device": "cpu", "threads": args.threads, "step_vs_batch": [], "step_vs_caption_length": []}
    # Memory first: a child's peak RSS starts from its parent's (Linux keeps ru_maxrss across exec),
    # so the children are spawned while this process is still small.
    result["memory_vs_size"] = []
    for size in args.sizes.split(","):
        hidden, layers = map(int, size.split("x"))
        adapters, copies = memory(hidden, layers, "adapters_train"), memory(hidden, layers, "copies_train")
        row = {
            "hidden": hidden,
            "layers": layers,
            "params": adapters["params"],
            "weights_mb": adapters["weights_mb"],
            "adapter_roles_peak_mb": adapters["peak_mb"],
            "three_copies_peak_mb": copies["peak_mb"],
            "copies_over_adapters": round(copies["peak_mb"] / adapters["peak_mb"], 2),
            "adapter_roles_seconds": adapters["seconds"],
            "three_copies_seconds": copies["seconds"],
        }
        result["memory_vs_size"].append(row)
        print(row, flush=True)
    for batch in map(int, args.batches.split(",")):
        row = {"batch": batch, "tokens": 12, "seconds": round(step_seconds(batch, 12), 3)}
        row["samples_per_second"] = round(batch * 4 / row["seconds"], 1)
        result["step_vs_batch"].append(row)
        print(row, flush=True)
    for tokens in map(int, args.lengths.split(",")):
        row = {"batch": 32, "tokens": tokens, "seconds": round(step_seconds(32, tokens), 3)}
        result["step_vs_caption_length"].append(row)
        print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
