"""Self-consistency evaluation throughput: boxes/s batched vs batch size 1.

    python benchmarks/consistency_throughput.py [--model DIR] [--boxes N]

Writes benchmarks/results/consistency_throughput.json. Each box costs three generations
(REG, REC on the caption, REC on the reference expression), as `refloop consistency` runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from refloop.data.sources import load_data
from refloop.evaluation.consistency import ConsistencyConfig, evaluate_consistency, sample_boxes
from refloop.models import load_vlm

RESULTS = Path(__file__).parent / "results"


def measure(vlm, samples, batch_size: int) -> dict:
    vlm.batch_size = batch_size
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        metrics = evaluate_consistency(vlm, samples, Path(tmp), ConsistencyConfig(num_boxes=len(samples), batch_size=batch_size))
        seconds = time.perf_counter() - started
    return {
        "batch_size": batch_size,
        "boxes": len(samples),
        "seconds": round(seconds, 2),
        "boxes_per_second": round(len(samples) / seconds, 2),
        "consistency_rate": metrics["consistency_rate"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="model directory (default: refloop-tiny)")
    parser.add_argument("--boxes", type=int, default=256, help="boxes for the batched run")
    parser.add_argument("--boxes-single", type=int, default=64, help="boxes for the batch-size-1 run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["REFLOOP_NO_PROGRESS"] = "1"
    vlm = load_vlm(args.model, device="cpu", dtype="fp32")
    records, _ = load_data("in-domain", num_images=args.boxes)
    samples = sample_boxes(records, args.boxes)
    measure(vlm, samples[:8], args.batch_size)  # warm-up
    batched = measure(vlm, samples, args.batch_size)
    single = measure(vlm, samples[: args.boxes_single], 1)
    result = {
        "benchmark": "consistency_throughput",
        "model": vlm.name if args.model else "refloop-tiny",
        "device": "cpu",
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "batched": batched,
        "batch_size_1": single,
        "speedup": round(batched["boxes_per_second"] / single["boxes_per_second"], 2),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "consistency_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
