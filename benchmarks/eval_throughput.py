"""Describe-then-locate throughput: refloop's batched cycle vs the per-box sequence of the Pink
release (issue 12, item 5).

    python benchmarks/eval_throughput.py [--boxes 256] [--threads 1]

Writes benchmarks/results/eval_throughput.json. Two workloads: `consistency` (one box per
image, SC-Tune's appendix-6 protocol) and `bootstrap` (every box of each image, as Pink
bootstraps detections). The same boxes go through three pipelines, each
doing the same work per box: one greedy REG generation (the box's description) and one greedy
REC generation on that description (the box found again), then IoU:

- `refloop_batched`: `refloop.cycle.describe_then_locate` on batches of `--batch-size` boxes
  (decoded images cached, left-padded prompts, one generate() per batch and direction);
- `refloop_batched_unshared`: the same with refloop-tiny's shared image encodings turned off
  (every prompt encodes its image; the boxes of one image no longer share one encoding);
- `refloop_batch_1`: the same call with one box per batch;
- `pink_release_emulation`: what the Pink release's bootstrapping loop does per box: open and
  decode the image file, run the processor on one prompt, `model.generate`, decode, parse;
  then the same for the REC prompt (two generate() calls per box, no batching, no cache).

All three must agree on every description and located box (checked; greedy decoding), so the
ratio is pure engineering. Timed after a warm-up, one process, `--threads` torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from PIL import Image

from refloop.boxes import paired_iou
from refloop.cycle import describe_then_locate
from refloop.data.sources import load_data
from refloop.evaluation.consistency import BoxSample, sample_boxes
from refloop.models import load_vlm
from refloop.models.base import GenerateOptions

RESULTS = Path(__file__).parent / "results"


def refloop_cycle(vlm, samples, batch_size: int, max_new_tokens: int) -> tuple[list, float]:
    vlm.batch_size = batch_size
    options = GenerateOptions(max_new_tokens=max_new_tokens)
    out = []
    started = time.perf_counter()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = [s.record.load_image() for s in chunk]
        cycle = describe_then_locate(vlm, vlm, images, [s.target.box for s in chunk], options)
        out += [(e, loc.box.as_list() if loc.box else None) for e, loc in zip(cycle.expressions, cycle.located)]
    return out, time.perf_counter() - started


@torch.no_grad()
def pink_release(vlm, samples, max_new_tokens: int) -> tuple[list, float]:
    """Per box: decode the file, one generate for the description, one for the box."""
    model, processor, profile, tok = vlm.model, vlm.processor, vlm.profile, vlm.tokenizer
    budget = vlm._locate_budget([])  # the REC budget refloop uses for these expressions

    def generate(image, prompt, new_tokens):
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        ids = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
        new = ids[0, inputs["input_ids"].shape[1] :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id) + 1]
        return profile.decode(tok, new)

    out = []
    started = time.perf_counter()
    for s in samples:
        image = Image.open(s.record.path).convert("RGB")
        expression = profile.read_expression(generate(image, profile.reg_prompt(s.target.box, image.size), max_new_tokens))
        box = profile.read_box(generate(image, profile.rec_prompt(expression), budget), image.size)
        paired_iou([s.target.box], [box])
        out.append((expression, box.as_list() if box else None))
    return out, time.perf_counter() - started


def unshared(vlm, run):
    """The shared-encoding lever off: one image encoding per prompt, as before it existed."""
    vlm.processor.supports_shared_images = False
    try:
        return run()
    finally:
        del vlm.processor.supports_shared_images  # back to the class's True


def pipelines(vlm, samples, batch_size: int, max_new_tokens: int) -> list:
    return [
        ("refloop_batched", lambda: refloop_cycle(vlm, samples, batch_size, max_new_tokens)),
        ("refloop_batched_unshared", lambda: unshared(vlm, lambda: refloop_cycle(vlm, samples, batch_size, max_new_tokens))),
        ("refloop_batch_1", lambda: refloop_cycle(vlm, samples, 1, max_new_tokens)),
        ("pink_release_emulation", lambda: pink_release(vlm, samples, max_new_tokens)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: refloop-tiny)")
    parser.add_argument("--boxes", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["REFLOOP_NO_PROGRESS"] = "1"
    vlm = load_vlm(args.model, device="cpu", dtype="fp32")
    records, _ = load_data("in-domain", num_images=args.boxes)
    workloads = {
        # SC-Tune's appendix 6 protocol: one box per image
        "consistency": sample_boxes(records, args.boxes),
        # Pink's bootstrapping: every box of each image
        "bootstrap": [BoxSample(f"{r.image_id}:{o.ann_id}", r, o) for r in records for o in r.objects][: args.boxes],
    }
    refloop_cycle(vlm, workloads["consistency"][:8], 8, args.max_new_tokens)  # warm-up
    pink_release(vlm, workloads["consistency"][:4], args.max_new_tokens)
    result = {
        "benchmark": "eval_throughput",
        "model": args.model or "refloop-tiny",
        "device": "cpu",
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "work_per_box": "greedy REG generation + greedy REC generation on its output, IoU",
    }
    for workload, samples in workloads.items():
        rows, outputs = {}, {}
        for name, run in pipelines(vlm, samples, args.batch_size, args.max_new_tokens):
            outputs[name], seconds = run()
            rows[name] = {"boxes": len(samples), "seconds": round(seconds, 2), "boxes_per_second": round(len(samples) / seconds, 2)}
            print(workload, name, rows[name], flush=True)
        reference = outputs["pink_release_emulation"]
        boxes_per_s = {name: row["boxes_per_second"] for name, row in rows.items()}
        result[workload] = {
            "images": len({s.record.image_id for s in samples}),
            "pipelines": rows,
            "same_outputs_as_emulation": {name: sum(a == b for a, b in zip(o, reference)) / len(reference) for name, o in outputs.items()},
            "speedup_vs_batch_1": round(boxes_per_s["refloop_batched"] / boxes_per_s["refloop_batch_1"], 2),
            "shared_encoding_speedup": round(boxes_per_s["refloop_batched"] / boxes_per_s["refloop_batched_unshared"], 2),
            "speedup_vs_pink_release": round(boxes_per_s["refloop_batched"] / boxes_per_s["pink_release_emulation"], 2),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({w: {k: v for k, v in result[w].items() if k != "pipelines"} for w in workloads}, indent=2))


if __name__ == "__main__":
    main()
