"""GPU check: SC-Tune and bootstrapping on real-size models, HF vs vLLM backend, on one CUDA GPU.

Run by hand on a CUDA machine (it cannot run on the project's CPU machines):

    python3 -m venv .venv && .venv/bin/pip install torch -e '.[dev,vllm]'   # README "Generation backends"
    .venv/bin/python benchmarks/gpu_check.py [--sizes 0.5b,3b] [--out benchmarks/results/gpu_check.json]

About 10 minutes on one H100 (most of it building and saving the random 3B checkpoint). What it does,
for each size:
- builds a random-weight Qwen2.5-VL (the real transformers class and processor; the tests' tiny
  BPE tokenizer, so the vocabulary is 420 tokens and the embedding and LM head are small: the
  parameter counts below are those of the blocks) at ~0.5B (Qwen2.5-0.5B's language model shape:
  24 blocks, hidden 896, 14 heads of 64, 2 KV heads) or ~3B (Qwen2.5-VL-3B's: 36 blocks, hidden
  2048, 16 heads of 128, 2 KV heads; the vision tower of the released models at 3B, a smaller one
  at 0.5B), bf16, saved to a temporary directory;
- bootstrapping (`refloop.methods.pink.bootstrap`, Pink's rule) of --images crowded shapes-world
  scenes with the HF backend, then with the vLLM backend: boxes/s and `identical_greedy_outputs`
  (in bf16 the two backends' kernels round differently, so this may be false: it is reported as
  measured);
- SC-Tune (group baseline, 4 samples a box, 30 new tokens, KL 0.01, 2 PPO epochs), describer and
  locator steps, with generation by transformers and then by a vLLM engine colocated in the same
  process (30% of the GPU's memory; roles as LoRA adapters pushed after every step): s/step,
  completions/s, and the GPU memory in use (torch's peak allocation; the vLLM engine's reserved
  pool comes on top of it and is reported from the device's free memory).
Writes one JSON file; prints each row as it is measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # the tests' family builders
sys.path.insert(0, str(Path(__file__).parent))  # backends.py: the bootstrap run shared with the CPU benchmark

RESULTS = Path(__file__).parent / "results"
# Language model and vision tower shapes (Qwen2.5-0.5B / Qwen2.5-VL-3B configs).
SIZES = {
    "0.5b": {
        "text": {"head_dim": 64, "heads": 14, "kv_heads": 2, "layers": 24, "hidden": 896, "intermediate": 4864},
        "vision": {"depth": 8, "hidden_size": 640, "intermediate_size": 1728, "num_heads": 10},
    },
    "3b": {
        "text": {"head_dim": 128, "heads": 16, "kv_heads": 2, "layers": 36, "hidden": 2048, "intermediate": 11008},
        "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16},
    },
}


def build(size: str, directory: Path) -> int:
    """A random-weight Qwen2.5-VL of `size`, saved in bf16; returns its parameter count."""
    import families
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    from refloop.models.processors import save_processor

    shape = SIZES[size]
    t, v = shape["text"], shape["vision"]
    d = t["head_dim"]
    text = {
        "head_dim": d,
        "mrope_section": (d // 8, 3 * d // 16, 3 * d // 16),
        "lm": {
            "hidden_size": t["hidden"],
            "intermediate_size": t["intermediate"],
            "num_attention_heads": t["heads"],
            "num_key_value_heads": t["kv_heads"],
            "num_hidden_layers": t["layers"],
        },
    }
    vision = {
        **v,
        "out_hidden_size": t["hidden"],
        "window_size": 112,
        "fullatt_block_indexes": [v["depth"] // 4 * i - 1 for i in (1, 2, 3, 4)],
    }
    torch.set_default_device("cuda")  # random init on the GPU: seconds instead of minutes
    try:
        model, processor = families._qwen_family(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, text, vision)
    finally:
        torch.set_default_device(None)
    model.to(torch.bfloat16).save_pretrained(directory)
    save_processor(processor, directory)
    count = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return count


def _gpu_used_gb() -> float:
    free, total = torch.cuda.mem_get_info()
    return round((total - free) / 2**30, 2)


def sctune(path: str, items, engine, steps: int, boxes: int) -> dict:
    """Describer then locator steps (the first of each untimed); per phase s/step and peak memory."""
    from refloop.methods.sctune import SCTune, SCTuneConfig
    from refloop.models.hf import HFVLM

    base = HFVLM.from_pretrained(path, device="cuda", dtype="bf16", batch_size=64)
    cfg = SCTuneConfig(
        phases=2, describer_steps=steps + 1, locator_steps=steps + 1, batch_size=boxes, baseline="group", group_size=4,
        max_new_tokens=30, kl_coef=0.01, generation_batch_size=128, checkpoint_every=10_000, reset_optimizer_on_switch=True,
    )  # fmt: skip
    tuner = SCTune.from_base(base, cfg, items, engine=engine)
    out = {}
    for role, first in (("describer", 0), ("locator", steps + 1)):
        times = []
        torch.cuda.reset_peak_memory_stats()
        for step in range(first, first + steps + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            tuner.step(step)
            torch.cuda.synchronize()
            if step > first:
                times.append(time.perf_counter() - start)
        per_step = sum(times) / len(times)
        row = {"seconds_per_step": round(per_step, 3), "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        if role == "describer":
            row["completions_per_second"] = round(boxes * cfg.group_size / per_step, 2)
        else:
            row["boxes_per_second"] = round(boxes / per_step, 2)
        row["gpu_in_use_gb"] = _gpu_used_gb()
        out[role] = row
    del tuner, base
    torch.cuda.empty_cache()
    return out


def check(size: str, work: Path, images: int, steps: int, boxes: int) -> dict:
    from backends import bootstrap_run
    from vllm.distributed import cleanup_dist_env_and_memory

    from refloop.data.items import detection_items
    from refloop.data.sources import load_detections
    from refloop.models.hf import HFVLM
    from refloop.models.vllm import VLLMVLM, VLLMEngine

    path = work / size
    start = time.perf_counter()
    params = build(size, path)
    row = {"parameters": params, "shape": SIZES[size], "dtype": "bf16", "build_seconds": round(time.perf_counter() - start, 1)}
    records = load_detections("crowded", None, "fail", images, 1).records
    items, _ = detection_items("crowded", None, 500, 0.5, 0.02)

    hf = HFVLM.from_pretrained(str(path), device="cuda", dtype="bf16", batch_size=128)
    torch.cuda.reset_peak_memory_stats()
    hf_seconds, hf_rows = bootstrap_run(hf, records, work / f"{size}-boot-hf")
    hf_peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    boxes_described = sum(1 for r in hf_rows if r.get("expression") is not None)
    suppress = hf.suppress_tokens
    processor, profile = hf.processor, hf.profile
    del hf
    torch.cuda.empty_cache()
    row["sctune_hf"] = sctune(str(path), items, None, steps, boxes)
    print(size, "sctune hf", json.dumps(row["sctune_hf"]), flush=True)

    start = time.perf_counter()
    engine = VLLMEngine(str(path), device="cuda", dtype="bf16", lora_rank=16, max_loras=2, gpu_memory_utilization=0.3)
    row["vllm_engine_start_seconds"] = round(time.perf_counter() - start, 1)
    served = VLLMVLM(engine, processor, profile, name=str(path), batch_size=128, suppress_tokens=suppress)
    vllm_seconds, vllm_rows = bootstrap_run(served, records, work / f"{size}-boot-vllm")
    same = [(r["expression"], r["located_text"]) for r in hf_rows] == [(r["expression"], r["located_text"]) for r in vllm_rows]
    row["bootstrap"] = {
        "images": images,
        "boxes_described": boxes_described,
        "hf": {"boxes_per_second": round(boxes_described / hf_seconds, 2), "peak_allocated_gb": hf_peak},
        "vllm": {"boxes_per_second": round(boxes_described / vllm_seconds, 2), "gpu_in_use_gb": _gpu_used_gb()},
        "vllm_speedup": round(hf_seconds / vllm_seconds, 2),
        "identical_greedy_outputs": same,
    }
    print(size, "bootstrap", json.dumps(row["bootstrap"]), flush=True)
    row["sctune_vllm"] = sctune(str(path), items, engine, steps, boxes)
    print(size, "sctune vllm", json.dumps(row["sctune_vllm"]), flush=True)
    row["sctune_vllm_speedup"] = {
        "describer": round(row["sctune_hf"]["describer"]["seconds_per_step"] / row["sctune_vllm"]["describer"]["seconds_per_step"], 2),
        "locator": round(row["sctune_hf"]["locator"]["seconds_per_step"] / row["sctune_vllm"]["locator"]["seconds_per_step"], 2),
    }
    engine.close()
    del engine, served
    cleanup_dist_env_and_memory()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="0.5b,3b", help="comma-separated: 0.5b, 3b")
    parser.add_argument("--images", type=int, default=64, help="crowded scenes bootstrapped per size")
    parser.add_argument("--steps", type=int, default=2, help="timed SC-Tune steps per phase (after one untimed)")
    parser.add_argument("--boxes", type=int, default=32, help="boxes per SC-Tune step")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks/gpu_check.py needs a CUDA GPU (torch sees none here)")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"error: unknown size(s) {unknown}; choose from {', '.join(SIZES)}")

    from refloop.models.vllm import check_install

    result = {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "torch": torch.__version__,
        "vllm": check_install(),
        "machine": platform.machine(),
        "command": "python " + " ".join(sys.argv),
        "sizes": {},
    }
    work = Path(tempfile.mkdtemp(prefix="refloop-gpu-check-"))
    for size in sizes:
        result["sizes"][size] = check(size, work, args.images, args.steps, args.boxes)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # written after each size: a late failure keeps the first
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
