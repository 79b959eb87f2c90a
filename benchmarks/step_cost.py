"""Step cost model (issue 12, item 2): a step's wall time against its pure model passes.

    python benchmarks/step_cost.py [--batch 64] [--group 4] [--threads 1]
    python benchmarks/step_cost.py --b0-lever     # only the A/B of the LoRA-B=0 lever, merged into the JSON
    python benchmarks/step_cost.py --prefill-lever  # only the A/B of the shared prompt prefill, merged likewise

`--b0-lever` (issue 22, item 4): the frozen, never-trained locator of a describer phase has LoRA
B = 0, and such an adapter now runs as the base (no LoRA matmuls, same outputs bit for bit). The
describer step and the locator's greedy answers alone are timed with the lever on and off,
alternating within one process (so a busy machine slows both arms alike), and written under
"b0_lever" into the existing JSON, whose other numbers are kept.

`--prefill-lever` (issue 22, item 4): the K samples of a box share one prompt prefill (exact), the
frozen locator's queries on one image share its image tokens' prefill (SC-Tune's
share_image_states; equal up to float rounding), and the cache is preallocated (exact). The
describer's sampling, the locator's answers and the describer step are timed in three arms (off,
prefill only, both), alternating within one process, and written under "prefill_lever" (with each
repeat's ratio, so the spread shows).

Writes benchmarks/results/step_cost.json. Three units of work on refloop-tiny (crowded scenes):
an SC-Tune describer step (group baseline: K samples per box, the frozen locator re-locating every
sample, old and reference log-probs, 2 PPO epochs), a locator step (greedy captions, one MLE
update) and a consistency batch (greedy REG then REC).

How a pure pass is measured: while the unit runs, every call into the model (`generate`, a
forward outside generate, `backward`, the optimizer's `step`) is recorded with its exact tensor
inputs; afterwards each recorded call is replayed alone, on the same tensors, with the same
seed, and timed. `overhead = unit time - sum(replays)`: what refloop spends outside the model
(tokenising, padding, image decoding and preprocessing, parsing, rewards, Python). A forward
that ran with gradients is replayed as forward + backward of its logits' sum (the same graph).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import time
from pathlib import Path

import torch

from refloop.data.records import BoxItem
from refloop.methods.sctune import SCTune, SCTuneConfig
from refloop.models import load_vlm
from refloop.models.base import GenerateOptions
from refloop.models.hf import GENERATE_HOOKS
from refloop.training.adapters import LoraSettings
from refloop.world import get_style, render, sample_scene

RESULTS = Path(__file__).parent / "results"


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


class Recorder:
    """Records the model calls of a unit of work (see the module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.calls, self._inside = model, [], 0
        self._generate, self._forward = model.generate, model.forward
        self._backward = torch.Tensor.backward

    def __enter__(self):
        rec = self

        @functools.wraps(self._generate)
        def generate(*args, **kwargs):
            # generate()'s steps that refloop's `lean_generate` hooks for this call replay with it
            hooks = {h: self.model.__dict__[h] for h in GENERATE_HOOKS if h in self.model.__dict__}
            rec.calls.append(("generate", _detach(kwargs), (torch.random.get_rng_state(), hooks)))
            rec._inside += 1
            try:
                return rec._generate(*args, **kwargs)
            finally:
                rec._inside -= 1

        @functools.wraps(self._forward)  # generate() validates its kwargs against this signature
        def forward(*args, **kwargs):
            if not rec._inside:
                kind = "forward_backward" if torch.is_grad_enabled() else "forward"
                rec.calls.append((kind, _detach(kwargs), None))
            return rec._forward(*args, **kwargs)

        def backward(tensor, *args, **kwargs):
            rec.calls.append(("backward_counted_in_forward", {}, None))
            return rec._backward(tensor, *args, **kwargs)

        self.model.generate, self.model.forward = generate, forward
        torch.Tensor.backward = backward
        return self

    def __exit__(self, *exc):
        self.model.generate, self.model.forward = self._generate, self._forward
        torch.Tensor.backward = self._backward

    def replay(self) -> dict[str, float]:
        """Seconds per kind of call, each call replayed alone."""
        seconds: dict[str, float] = {}
        for kind, kwargs, state in self.calls:
            if kind == "backward_counted_in_forward":
                continue
            if state is not None:
                torch.random.set_rng_state(state[0])
            t0 = time.perf_counter()
            if kind == "generate":
                self.model.__dict__.update(state[1])
                try:
                    with torch.no_grad():
                        self._generate(**kwargs)
                finally:
                    for hook in state[1]:
                        del self.model.__dict__[hook]
            elif kind == "forward":
                with torch.no_grad():
                    self._forward(**kwargs)
            else:
                out = self._forward(**kwargs)
                out.logits.float().sum().backward()
                self.model.zero_grad(set_to_none=True)
            seconds[kind] = seconds.get(kind, 0.0) + time.perf_counter() - t0
        return seconds


def _items(n: int, seed: int = 0) -> list[BoxItem]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = sample_scene(get_style("crowded"), 0, i)
        image = render(scene)
        obj = scene.objects[rng.randrange(len(scene.objects))]
        out.append(BoxItem("", obj.box, image=image))
    return out


def measure(name: str, model: torch.nn.Module, unit, repeats: int) -> dict:
    unit()  # warm-up
    totals, passes = [], {}
    for _ in range(repeats):
        with Recorder(model) as rec:
            t0 = time.perf_counter()
            unit()
            totals.append(time.perf_counter() - t0)
        for kind, s in rec.replay().items():
            passes[kind] = passes.get(kind, 0.0) + s
    total = sum(totals) / repeats
    passes = {k: v / repeats for k, v in passes.items()}
    pure = sum(passes.values())
    row = {
        "unit": name,
        "seconds": round(total, 3),
        "pure_passes_seconds": {k: round(v, 3) for k, v in passes.items()},
        "pure_seconds": round(pure, 3),
        "overhead_seconds": round(total - pure, 3),
        "overhead_share_of_pure": round((total - pure) / pure, 3),
    }
    print(json.dumps(row), flush=True)
    return row


def b0_lever(tuner: SCTune, items: list[BoxItem], repeats: int) -> dict:
    """Describer step and the frozen locator's greedy answers, lever on and off, alternating."""
    from refloop.cycle import describe_then_locate

    images, boxes = [it.load_image() for it in items], [it.box for it in items]
    sampling = GenerateOptions(do_sample=True, top_k=100, top_p=0.9, max_new_tokens=12, num_return_sequences=tuner.cfg.group_size)
    expressions = describe_then_locate(tuner.describer, tuner.locator, images, boxes, sampling).expressions
    r_images = [img for img in images for _ in range(tuner.cfg.group_size)]
    assert not tuner.adapters.is_identity("describer") and tuner.adapters.is_identity("locator")
    lever_on = tuner.adapters.is_identity
    times: dict[str, dict[str, list[float]]] = {"describer_step": {"on": [], "off": []}, "locator_answers": {"on": [], "off": []}}
    same = None
    for _ in range(repeats):
        for arm in ("on", "off"):
            tuner.adapters.is_identity = lever_on if arm == "on" else (lambda name: False)
            t0 = time.perf_counter()
            located = tuner.locator.locate(r_images, expressions)
            times["locator_answers"][arm].append(time.perf_counter() - t0)
            same = located if same is None else same
            assert located == same  # the lever changes no answer
            t0 = time.perf_counter()
            tuner.describer_step(items)
            times["describer_step"][arm].append(time.perf_counter() - t0)
    tuner.adapters.is_identity = lever_on
    out = {}
    for unit, arms in times.items():
        on, off = (sum(arms[a]) / len(arms[a]) for a in ("on", "off"))
        out[unit] = {"lever_on_seconds": round(on, 3), "lever_off_seconds": round(off, 3), "speedup": round(off / on, 3)}
    out["locator_answers"]["queries"] = len(expressions)
    out["identical_outputs"] = True
    print(json.dumps(out), flush=True)
    return out


PREFILL_ARMS = {  # arm -> (shared_prefill, preallocated_cache)
    "off": (False, False),
    "prefill": (True, False),
    "on": (True, True),
}


def prefill_lever(tuner: SCTune, items: list[BoxItem], repeats: int) -> dict:
    """The leaner generate() (issue 22, item 4, lever 2) in three arms alternating in one process:
    "off" (transformers' generate() as it is), "prefill" (one prompt prefill shared by a box's K
    samples; the frozen locator's queries on one image share its image tokens' prefill) and "on"
    (that and the preallocated cache). Timed: the describer's K samples of each box, the locator's
    greedy answers (K queries per image) and the whole describer step. Every arm runs the first
    lever (LoRA B = 0 as the base)."""
    from refloop.cycle import describe_then_locate

    images, boxes = [it.load_image() for it in items], [it.box for it in items]
    k = tuner.cfg.group_size
    sampling = GenerateOptions(do_sample=True, top_k=100, top_p=0.9, max_new_tokens=12, num_return_sequences=k)
    expressions = describe_then_locate(tuner.describer, tuner.locator, images, boxes, sampling).expressions
    r_images = [img for img in images for _ in range(k)]
    prompts = [tuner.vlm.profile.reg_prompt(b, img.size) for img, b in zip(images, boxes)]
    units = ("describer_sampling", "locator_answers", "describer_step")
    times: dict[str, dict[str, list[float]]] = {u: {a: [] for a in PREFILL_ARMS} for u in units}
    identical, differing = True, 0

    def use(arm: str) -> None:
        tuner.vlm.shared_prefill, tuner.vlm.preallocated_cache = PREFILL_ARMS[arm]

    for repeat in range(repeats):
        # The describer is trained by each step: every arm samples and answers first, then every
        # arm steps; the arms' order rotates between repeats.
        arms = list(PREFILL_ARMS)
        order = arms[repeat % 3 :] + arms[: repeat % 3]
        outputs = {}
        for arm in order:
            use(arm)
            torch.manual_seed(1)
            t0 = time.perf_counter()
            sampled = [[c.token_ids for c in g] for g in tuner.describer.generate(images, prompts, sampling)]
            times["describer_sampling"][arm].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            located = [loc.text for loc in tuner.locator.locate(r_images, expressions)]
            times["locator_answers"][arm].append(time.perf_counter() - t0)
            outputs[arm] = sampled, located
        identical &= all(outputs[a][0] == outputs["off"][0] for a in arms)
        differing += sum(a != b for arm in arms for a, b in zip(outputs[arm][1], outputs["off"][1]))
        for arm in order:
            use(arm)
            t0 = time.perf_counter()
            tuner.describer_step(items)
            times["describer_step"][arm].append(time.perf_counter() - t0)
    use("on")
    out: dict = {}
    for unit, arms_times in times.items():
        off = arms_times["off"]
        row = {f"{arm}_seconds": round(sum(t) / len(t), 3) for arm, t in arms_times.items()}
        for arm in ("prefill", "on"):
            ratios = [b / a for a, b in zip(arms_times[arm], off)]
            row[f"speedup_{arm}"] = round(sum(off) / sum(arms_times[arm]), 3)
            row[f"speedup_{arm}_per_repeat"] = [round(r, 3) for r in ratios]
        out[unit] = row
    out["describer_sampling"]["samples"] = len(prompts) * k
    out["locator_answers"]["queries"] = len(expressions)
    # K samples: token for token given the seed; the locator's answers: equal up to float
    # rounding by construction (the image tokens' states computed once per image), compared here.
    out["identical_samples_given_seed"] = identical
    out["locator_answers_differing"] = differing
    out["locator_answers_compared"] = len(expressions) * repeats * 2
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="boxes per step / batch")
    parser.add_argument("--group", type=int, default=4, help="samples per box (group baseline)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "step_cost.json")
    parser.add_argument("--b0-lever", action="store_true", help="only the A/B of the LoRA-B=0 lever, merged into --out")
    parser.add_argument("--prefill-lever", action="store_true", help="only the A/B of the shared prompt prefill, merged into --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["REFLOOP_NO_PROGRESS"] = "1"
    vlm = load_vlm(None, device="cpu", dtype="fp32", batch_size=args.batch * args.group)
    cfg = SCTuneConfig(
        phases=2,
        describer_steps=10,
        locator_steps=10,
        batch_size=args.batch,
        baseline="group",
        group_size=args.group,
        describer_lr=3e-4,
        locator_lr=2e-4,
        top_p=0.9,
        max_new_tokens=12,
        lora=LoraSettings(r=16, alpha=32),
        generation_batch_size=args.batch * args.group,
    )
    items = _items(args.batch)
    tuner = SCTune.from_base(vlm, cfg, items)
    model = tuner.vlm.model
    if args.b0_lever or args.prefill_lever:
        tuner.describer_step(items)  # warm-up; the describer is trained from here on, the locator is not
        key, lever = ("b0_lever", b0_lever) if args.b0_lever else ("prefill_lever", prefill_lever)
        result = json.loads(args.out.read_text()) if args.out.exists() else {}
        result[key] = {"threads": args.threads, "batch": args.batch, "group": args.group, **lever(tuner, items, args.repeats)}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        return
    rows = [
        measure("describer_step", model, lambda: tuner.describer_step(items), args.repeats),
        measure("locator_step", model, lambda: tuner.locator_step(items, step=cfg.describer_steps), args.repeats),
    ]
    images, boxes = [it.load_image() for it in items], [it.box for it in items]
    from refloop.cycle import describe_then_locate

    greedy = GenerateOptions(max_new_tokens=cfg.max_new_tokens)
    rows.append(measure("consistency_batch", model, lambda: describe_then_locate(vlm, vlm, images, boxes, greedy), args.repeats))
    result = {
        "benchmark": "step_cost",
        "model": "refloop-tiny",
        "device": "cpu",
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "batch": args.batch,
        "group": args.group,
        "goal": "overhead <= 30% of the pure passes",
        "units": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
