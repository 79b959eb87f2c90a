"""Peer benchmark: refloop's SC-Tune describer phase (baseline: group) against TRL's GRPOTrainer
(trl 1.16.0) on the same work, one CPU thread each, each system in its own subprocess.

Reproduce (TRL lives in its own venv so the main one stays untouched):

    python3 -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0 \
        && .venv-trl/bin/pip install -e '.[peer]'
    OMP_NUM_THREADS=1 REFLOOP_THREADS=1 taskset -c 1 .venv-trl/bin/python benchmarks/peer_trl.py

Options: --model tiny|100m|both (default both), --steps N (timed steps, default 20), --warmup N
(untimed first steps, default 2), --boxes N (boxes a step; default 8 for tiny, 2 for 100m),
--out FILE (default benchmarks/results/peer_trl.json; models not run keep their entries there, each
entry records the run that measured it under "run"). The default run takes about 15 minutes on
one core (100m: about 4.5 minutes per system).

"Same work" means, on both sides:
- the same model: the packaged refloop-tiny (1.9M parameters) or the same architecture scaled to
  ~100M parameters (hidden 768, 14 layers, 12 heads) with seeded random weights, fp32 on CPU;
- the same boxes per step: `--boxes` shapes-world `crowded` boxes a step, drawn by SC-Tune's own
  seeded batch rule; TRL reads them in that order from its dataset (shuffle_dataset=False; the
  reward callable checks every batch against refloop's);
- the same prompts: the profile's REG prompt with the box (`TinyProfile.reg_prompt`); TRL gets it
  as a conversational prompt with an image part, rendered by a chat template to the same text and
  token ids (checked);
- the same reward, computed by the same refloop code: the frozen locator's IoU
  (`refloop.cycle.locate_boxes`: greedy REC on each caption, a query repeated on the same image
  answered once, IoU with the box). refloop's locator is its `locator` adapter (untrained, so
  equal to the base); TRL's reward callable runs it on the base model with TRL's adapter
  disabled; boxes reach it through a dataset column;
- the same GRPO/PPO update: group size G samples per box, advantage = IoU minus the group's mean
  IoU (TRL scale_rewards="none"; refloop baseline="group"), token-level clipped ratio with the same
  epsilon, loss averaged over the batch's completion tokens (TRL loss_type="dapo", its default),
  2 epochs over each rollout (refloop ppo_epochs=2, TRL num_iterations=2; old log-probs from a
  separate no-grad forward on both), one minibatch, no KL term (beta = kl_coef = 0), AdamW with the
  same learning rate, weight decay and gradient clipping, constant learning rate (each system's
  own AdamW: torch.optim.AdamW for refloop, TRL's default adamw_torch_fused);
- the same sampling: temperature 1, top-k, top-p, 12 new tokens at most, the same suppressed tokens;
- the same LoRA: r, alpha, dropout 0, the same target modules (every Linear of the decoder blocks);
- no gradient checkpointing, no bf16, one thread, no checkpoints written during the timed steps.

A step is one rollout (boxes x G completions) and its two optimizer updates (TRL: two global steps).
Reported per system: completions/s, s/step, completions per CPU second of its subprocess (the
contention-robust cost when other jobs share the core), peak RSS of its subprocess, the mean reward of the
last 5 steps, and where the time goes (generation, reward = locator, no-grad log-prob forward,
training forward, backward, other), measured by timers around those calls.
The random 100M model earns reward 0 on both sides (its captions do not locate anything): that
row measures cost, the tiny row also compares learning.

TRL needs two adapters to run refloop-tiny, both here (the library is unchanged): a ProcessorMixin
around refloop-tiny's processor with a chat template for {"type": "image"} parts (TRL takes a
model for a VLM only when its processing_class is a ProcessorMixin), and a backbone view
(`base_model(...).last_hidden_state`) for TRL's fused log-prob head. That head projects hidden
states through `lm_head.weight`, so for refloop-tiny's 49 pointer tokens (whose logits come from
a match with the image grid) TRL's log-probs are normalised slightly differently from the
distribution generate() samples from; `trl_vs_refloop_logprob_max_abs_diff` reports the gap on
sampled captions (it changes no cost).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TRL_VERSION = "1.16.0"

# The shared settings (both systems read them from here).
SETTINGS = {
    "group_size": 4,
    "max_new_tokens": 12,
    "temperature": 1.0,
    "top_k": 100,
    "top_p": 0.9,
    "ppo_epochs": 2,
    "clip_eps": 0.2,
    "beta": 0.0,
    "lr": 3e-4,
    "weight_decay": 0.0,
    "grad_clip": 1.0,
    "lora_r": 16,
    "lora_alpha": 32,
    "seed": 0,
    "train_scenes": 200,
    "domain": "crowded",
}
MODELS = {
    "tiny": {"desc": "refloop-tiny (packaged checkpoint)", "boxes": 8},
    "100m": {
        "desc": "refloop-tiny architecture, hidden 768, 14 layers, 12 heads, random init",
        "boxes": 2,
        "hidden": 768,
        "layers": 14,
        "heads": 12,
    },
}
CATEGORIES = ("generation", "reward_locator", "logprob_forward", "train_forward", "backward")


# ---- shared pieces -------------------------------------------------------------------------
def clock() -> tuple[float, float]:
    """(wall, process CPU) seconds."""
    return time.perf_counter(), time.process_time()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_model(name: str):
    """(model, processor, profile) in fp32 on CPU, eval mode, the same weights in every process."""
    import torch

    from refloop.models.profiles import TinyProfile

    if name == "tiny":
        from refloop.models import load_vlm

        vlm = load_vlm(device="cpu", dtype="fp32")
        return vlm.model, vlm.processor, vlm.profile
    from refloop.methods.pretrain import PretrainConfig, build_model

    spec = MODELS[name]
    model, processor = build_model(PretrainConfig(hidden_size=spec["hidden"], num_layers=spec["layers"], num_heads=spec["heads"], seed=0))
    model.to(torch.float32).eval()
    return model, processor, TinyProfile()


def train_items(n_scenes: int, domain: str):
    """Every object box of n seeded shapes-world scenes, images in memory."""
    from refloop.data.records import BoxItem
    from refloop.world import get_style, render, sample_scene

    out = []
    for i in range(n_scenes):
        scene = sample_scene(get_style(domain), 1, i)
        image = render(scene)
        out += [BoxItem("", o.box, image=image) for o in scene.objects]
    return out


def step_batch(items, seed: int, step: int, boxes: int):
    """The boxes of step `step`: SC-Tune's own rule (`SCTune.batch`), reproduced for TRL's dataset."""
    from refloop.seeding import step_seed

    rng = random.Random(step_seed(seed, step, "batch"))
    return [items[rng.randrange(len(items))] for _ in range(boxes)]


class Timers:
    """Wall time per category; the outermost timed call owns the time of the calls inside it (the
    locator's generate() counts as reward, not generation)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.active: str | None = None
        self.enabled = False
        self.vision_seconds = 0.0  # the image encoder, wherever it runs (overlaps the categories)
        self.vision_images = 0

    @contextmanager
    def timed(self, category: str):
        if self.active is not None or not self.enabled:
            yield
            return
        self.active = category
        self.calls[category] += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[category] += time.perf_counter() - t0
            self.active = None

    def wrap(self, owner, attr: str, category):
        """Time `owner.attr`; `category` is a name or a function of the call's (args, kwargs)."""
        original = getattr(owner, attr)
        timers = self

        def wrapper(*args, **kwargs):
            name = category(args, kwargs) if callable(category) else category
            with timers.timed(name):
                return original(*args, **kwargs)

        wrapper.__wrapped__ = original
        setattr(owner, attr, wrapper)


def instrument_common(timers: Timers) -> None:
    import torch
    from transformers.generation.utils import GenerationMixin

    from refloop.models.hf import HFVLM
    from refloop.models.tiny.modeling import VisionEncoder

    timers.wrap(GenerationMixin, "generate", "generation")
    timers.wrap(HFVLM, "locate", "reward_locator")
    timers.wrap(torch.Tensor, "backward", "backward")
    original = VisionEncoder.forward

    def vision_forward(self, pixel_values):  # counted inside the parts above, not exclusive
        t0 = time.perf_counter()
        try:
            return original(self, pixel_values)
        finally:
            if timers.enabled:
                timers.vision_seconds += time.perf_counter() - t0
                timers.vision_images += pixel_values.shape[0]

    VisionEncoder.forward = vision_forward


def summarize(
    name: str,
    system: str,
    step_ends: list[tuple[float, float]],
    rewards: list[float],
    warmup: int,
    completions_per_step: int,
    timers,
    setup_rss: float,
    extra: dict,
) -> dict:
    intervals = [b[0] - a[0] for a, b in zip(step_ends[:-1], step_ends[1:])]
    timed = intervals[warmup:]
    total = sum(timed)
    cpu = step_ends[-1][1] - step_ends[warmup][1]
    breakdown = {k: round(timers.seconds.get(k, 0.0) / len(timed), 4) for k in CATEGORIES}
    breakdown["other"] = round(total / len(timed) - sum(breakdown.values()), 4)
    return {
        "system": system,
        "model": name,
        "timed_steps": len(timed),
        "warmup_steps": warmup,
        "completions_per_step": completions_per_step,
        "seconds_per_step": round(total / len(timed), 4),
        "samples_per_second": round(completions_per_step * len(timed) / total, 3),
        # CPU time of the process over the timed steps: what a step costs, whatever else ran on the core.
        "cpu_seconds_per_step": round(cpu / len(timed), 4),
        "samples_per_cpu_second": round(completions_per_step * len(timed) / cpu, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_after_setup_mb": round(setup_rss, 1),
        "final_reward": round(sum(rewards[-5:]) / len(rewards[-5:]), 4),
        "reward_per_step": [round(r, 4) for r in rewards],
        "step_seconds": [round(s, 4) for s in intervals],
        "seconds_per_step_by_part": breakdown,
        "calls_per_step_by_part": {k: round(timers.calls.get(k, 0) / len(timed), 2) for k in CATEGORIES},
        "image_encoder_seconds_per_step": round(timers.vision_seconds / len(timed), 4),
        "images_encoded_per_step": round(timers.vision_images / len(timed), 1),
        **extra,
    }


# ---- refloop -----------------------------------------------------------------------------------
def run_refloop(name: str, steps: int, warmup: int, boxes: int) -> dict:
    import torch

    from refloop.methods.sctune import SCTune, SCTuneConfig
    from refloop.models.hf import HFVLM
    from refloop.training.adapters import LoraSettings

    s = SETTINGS
    torch.set_num_threads(1)
    timers = Timers()
    instrument_common(timers)
    timers.wrap(HFVLM, "logprobs", lambda a, kw: "train_forward" if kw.get("grad") else "logprob_forward")
    model, processor, profile = load_model(name)
    total = warmup + steps
    group = s["group_size"]
    cfg = SCTuneConfig(
        phases=1,
        describer_steps=total,
        tune="describer",
        batch_size=boxes,
        describer_lr=s["lr"],
        weight_decay=s["weight_decay"],
        grad_clip=s["grad_clip"],
        kl_coef=s["beta"],
        clip_eps=s["clip_eps"],
        ppo_epochs=s["ppo_epochs"],
        minibatches=1,
        baseline="group",
        group_size=group,
        temperature=s["temperature"],
        top_k=s["top_k"],
        top_p=s["top_p"],
        max_new_tokens=s["max_new_tokens"],
        lora=LoraSettings(r=s["lora_r"], alpha=s["lora_alpha"]),
        seed=s["seed"],
        checkpoint_every=10**6,
        generation_batch_size=boxes * group,
    )
    items = train_items(s["train_scenes"], s["domain"])
    tuner = SCTune.from_base(HFVLM(model, processor, profile, batch_size=boxes * group), cfg, items)
    assert all(a is b for k in range(total) for a, b in zip(tuner.batch(k), step_batch(items, s["seed"], k, boxes)))
    setup_rss = peak_rss_mb()
    step_ends: list[tuple[float, float]] = []
    rewards: list[float] = []

    def progress(row: dict) -> None:
        step_ends.append(clock())
        rewards.append(row["reward"])
        if len(step_ends) == warmup + 1:
            timers.enabled = True

    os.environ.setdefault("REFLOOP_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory() as work:
        step_ends.append(clock())
        tuner.run(Path(work) / "train", progress)
    return summarize(name, "refloop", step_ends, rewards, warmup, boxes * group, timers, setup_rss, {})


# ---- TRL ---------------------------------------------------------------------------------------
# The chat template renders [{"type": "image"}, {"type": "text", "text": INSTRUCTION}] as refloop-tiny's prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<image> {% elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endfor -%}{%- if add_generation_prompt %} <sep>{% endif -%}"
)


def trl_processor(inner):
    """refloop-tiny's processor behind transformers' ProcessorMixin (TRL treats a model as a VLM
    only then): a chat template for image parts, `.tokenizer`, images as one list per prompt."""
    from transformers import ProcessorMixin

    class TinyTrlProcessor(ProcessorMixin):
        attributes: list = []

        def __init__(self, wrapped) -> None:  # ProcessorMixin.__init__ wants HF sub-processors
            self.wrapped = wrapped
            self.tokenizer = wrapped.tokenizer
            self.chat_template = CHAT_TEMPLATE
            self.audio_tokenizer = None

        def __call__(self, images=None, text=None, videos=None, **kwargs):
            if images is not None:
                flat = []
                for entry in images:
                    flat += list(entry) if isinstance(entry, (list, tuple)) else [entry]
                images = flat
            kwargs.pop("add_special_tokens", None)
            options = {k: v for k, v in kwargs.items() if k in ("padding", "return_tensors", "padding_side")}
            if options.get("return_tensors") is None:  # like HF processors: unpadded lists of ids
                options.update(return_tensors=None, padding=options.get("padding", False))
            return self.wrapped(images=images, text=text, **options)

    return TinyTrlProcessor(inner)


def trl_model(model):
    """refloop-tiny with a backbone view: TRL's fused log-prob head calls
    `model.base_model(...).last_hidden_state` and projects it through `lm_head.weight`. The view runs
    the model's own forward and returns the final-normed hidden states of every position."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    base_cls = type(model)

    class Backbone:
        def __init__(self, owner) -> None:
            self.owner = owner

        def __call__(self, *args, **kwargs):
            owner = self.owner
            captured = {}
            handle = owner.layers[-1].register_forward_hook(lambda mod, inp, out: captured.__setitem__("x", out))
            try:
                kwargs.pop("logits_to_keep", None)
                base_cls.forward(owner, *args, logits_to_keep=1, **kwargs)
            finally:
                handle.remove()
            return BaseModelOutputWithPast(last_hidden_state=owner.norm(captured["x"]))

    class TrlRefloopTiny(base_cls):
        @property
        def base_model(self):
            return Backbone(self)

    model.__class__ = TrlRefloopTiny
    return model


def fused_logprob_gap(trainer, vlm, rows: list[dict], profile) -> float:
    """Largest |log p| difference on sampled captions between TRL's fused log-prob head (hidden
    states x lm_head.weight) and refloop-tiny's own logits, whose 49 pointer tokens come from a
    match with the image grid instead of lm_head rows; before training, adapter still zero."""
    import torch

    from refloop.boxes import Box
    from refloop.models.base import GenerateOptions

    images = [r["image"] for r in rows]
    prompts = [profile.reg_prompt(Box(*r["box"]), r["image"].size) for r in rows]
    s = SETTINGS
    sampling = GenerateOptions(
        do_sample=True, temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], max_new_tokens=s["max_new_tokens"]
    )
    with trainer.model.disable_adapter(), torch.no_grad():
        ids = [list(g[0].token_ids) for g in vlm.generate(images, prompts, sampling)]
        ours = vlm.logprobs(images, prompts, ids)
        enc = vlm.processor(images=images, text=prompts, padding=True, return_tensors="pt", padding_side="left")
        width = max(len(c) for c in ids)
        comp = torch.tensor([c + [0] * (width - len(c)) for c in ids])
        comp_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in ids])
        input_ids = torch.cat([enc["input_ids"], comp], 1)
        mask = torch.cat([enc["attention_mask"], comp_mask], 1)
        labels = input_ids.masked_fill(mask == 0, -100)
        labels[:, :-width] = -100
        out = trainer.model(input_ids=input_ids, attention_mask=mask, pixel_values=enc["pixel_values"], labels=labels, fused_lm_head=True)
    theirs = out.log_probs[:, -width:]
    return round(max(float((theirs[i, : len(c)] - ours[i]).abs().max()) for i, c in enumerate(ids)), 5)


def run_trl(name: str, steps: int, warmup: int, boxes: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from refloop.boxes import Box
    from refloop.cycle import locate_boxes
    from refloop.models.hf import HFVLM
    from refloop.models.lora import language_model_targets

    s = SETTINGS
    torch.set_num_threads(1)
    timers = Timers()
    instrument_common(timers)
    timers.wrap(
        GRPOTrainer,
        "_get_per_token_logps_and_entropies",
        lambda a, kw: "train_forward" if torch.is_grad_enabled() else "logprob_forward",
    )
    model, processor, profile = load_model(name)
    suppress = HFVLM(model, processor, profile).suppress_tokens  # what refloop's generate() suppresses
    targets = language_model_targets(model)
    model = trl_model(model)
    proc = trl_processor(processor)
    total = warmup + steps
    group = s["group_size"]
    items = train_items(s["train_scenes"], s["domain"])
    rows = []
    for k in range(total):
        for it in step_batch(items, s["seed"], k, boxes):
            img = it.load_image()
            rows.append(
                {
                    "prompt": [{"role": "user", "content": profile.reg_instruction(it.box, img.size)}],
                    "image": img,
                    "box": [it.box.x1, it.box.y1, it.box.x2, it.box.y2],
                }
            )
    dataset = Dataset.from_list(rows)
    # The rendered prompt must be refloop's REG prompt, token for token.
    first = rows[0]
    box0 = Box(*first["box"])
    rendered = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": first["prompt"][0]["content"]}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert rendered == profile.reg_prompt(box0, first["image"].size), (rendered, profile.reg_prompt(box0, first["image"].size))

    locator = HFVLM(model, processor, profile, batch_size=boxes * group)
    holder: dict = {}
    rewards: list[float] = []

    expected = [[b for it in step_batch(items, s["seed"], k, boxes) for b in [it.box] * group] for k in range(total)]

    def iou_reward(prompts, completions, box, image, **kwargs):
        # The same boxes as refloop's step, each repeated G times (TRL's group), in the same order.
        assert [Box(*b) for b in box] == expected[len(rewards)], "TRL's batch differs from refloop's"
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        expressions = [profile.read_expression(t) for t in texts]
        # The dataset hands every row its own decoded copy of the image; rows of one scene share
        # one object again, as in refloop's rollout, so refloop's reward code treats them alike.
        by_pixels: dict = {}
        images = [by_pixels.setdefault((im.size, im.mode, im.tobytes()), im) for im in image]
        with holder["trainer"].model.disable_adapter(), torch.no_grad():
            _, iou = locate_boxes(locator, images, expressions, [Box(*b) for b in box])  # refloop's reward code
        rewards.append(float(iou.mean()))
        return [float(v) for v in iou]

    iou_reward.__name__ = "locator_iou"
    step_ends: list[tuple[float, float]] = []
    updates = s["ppo_epochs"]

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            step_ends.append(clock())

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % updates == 0:
                step_ends.append(clock())
                if len(step_ends) == warmup + 1:
                    timers.enabled = True

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=boxes * group,
            gradient_accumulation_steps=1,
            num_generations=group,
            max_completion_length=s["max_new_tokens"],
            temperature=s["temperature"],
            top_k=s["top_k"],
            top_p=s["top_p"],
            generation_kwargs={"suppress_tokens": suppress},
            num_iterations=s["ppo_epochs"],
            epsilon=s["clip_eps"],
            beta=s["beta"],
            scale_rewards="none",
            learning_rate=s["lr"],
            weight_decay=s["weight_decay"],
            max_grad_norm=s["grad_clip"],
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_steps=total * updates,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            shuffle_dataset=False,
            seed=s["seed"],
            report_to="none",
            save_strategy="no",
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        peft_config = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0, target_modules=targets)
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=iou_reward,
            args=args,
            train_dataset=dataset,
            processing_class=proc,
            peft_config=peft_config,
            callbacks=[StepClock()],
        )
        holder["trainer"] = trainer
        fused_gap = fused_logprob_gap(trainer, locator, rows[:boxes], profile)
        setup_rss = peak_rss_mb()
        trainer.train()
    extra = {
        "trl_version": TRL_VERSION,
        "trl_optimizer": getattr(args.optim, "value", str(args.optim)),
        "trl_vs_refloop_logprob_max_abs_diff": fused_gap,
    }
    return summarize(name, "trl", step_ends, rewards, warmup, boxes * group, timers, setup_rss, extra)


# ---- driver ------------------------------------------------------------------------------------
def child(system: str, name: str, steps: int, warmup: int, boxes: int) -> dict:
    run = run_refloop if system == "refloop" else run_trl
    return run(name, steps, warmup, boxes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="both", choices=["tiny", "100m", "both"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps (rollout + 2 updates) per system")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--boxes", type=int, default=None, help="boxes per step (default: 8 for tiny, 2 for 100m)")
    parser.add_argument("--out", default=str(RESULTS / "peer_trl.json"))
    parser.add_argument("--child", nargs=2, metavar=("SYSTEM", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        system, name = args.child
        boxes = args.boxes or MODELS[name]["boxes"]
        print("RESULT " + json.dumps(child(system, name, args.steps, args.warmup, boxes)), flush=True)
        return
    names = ["tiny", "100m"] if args.model == "both" else [args.model]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REFLOOP_THREADS": "1", "REFLOOP_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs: dict = {}
    for name in names:
        boxes = args.boxes or MODELS[name]["boxes"]
        for system in ("refloop", "trl"):  # back to back, each in a fresh process
            cmd = [
                sys.executable,
                __file__,
                "--child",
                system,
                name,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--boxes",
                str(boxes),
            ]
            t0 = time.perf_counter()
            with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
                child_proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
                _, status, usage = os.wait4(child_proc.pid, 0)  # this child's own rusage
                child_proc.returncode = os.waitstatus_to_exitcode(status)
                out.seek(0)
                err.seek(0)
                stdout, stderr = out.read(), err.read()
            if child_proc.returncode != 0:
                sys.stderr.write(stderr[-5000:])
                raise SystemExit(f"{system} on {name} failed (exit {child_proc.returncode})")
            line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
            result = json.loads(line[len("RESULT ") :])
            result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # ru_maxrss of the child (KiB on Linux)
            result["process_seconds"] = round(time.perf_counter() - t0, 1)
            # CPU time over wall time: about 1 when the child had its core to itself (one thread).
            result["cpu_share"] = round((usage.ru_utime + usage.ru_stime) / result["process_seconds"], 3)
            runs.setdefault(name, {})[system] = result
            print(
                f"{name:5s} {system:8s} {result['samples_per_second']:8.2f} completions/s  {result['seconds_per_step']:.3f} s/step  "
                f"peak {result['peak_rss_mb']:.0f} MB  reward {result['final_reward']:.3f}",
                flush=True,
            )
    write(runs, args)


def analyse(r: dict, t: dict) -> dict:
    """Where each system spends its step, and the differences, from the measured parts."""
    rp, tp = r["seconds_per_step_by_part"], t["seconds_per_step_by_part"]
    rc, tc = r["calls_per_step_by_part"], t["calls_per_step_by_part"]
    unique = r["completions_per_step"] // SETTINGS["group_size"]
    return {
        "refloop_minus_trl_seconds_per_step_by_part": {k: round(rp[k] - tp[k], 4) for k in rp},
        "share_of_step": {
            "refloop": {k: round(v / r["seconds_per_step"], 3) for k, v in rp.items()},
            "trl": {k: round(v / t["seconds_per_step"], 3) for k, v in tp.items()},
        },
        "notes": [
            f"no-grad log-prob forwards: refloop {rp['logprob_forward']:.3f} s/step in {rc['logprob_forward']:g} calls, TRL "
            f"{tp['logprob_forward']:.3f} s in {tc['logprob_forward']:g} (the old policy's log-probs; with beta = 0 neither needs the "
            "reference's)",
            f"reward (locator): refloop {rp['reward_locator']:.3f} s/step vs TRL {tp['reward_locator']:.3f}: the same refloop code "
            "(locate_boxes) on each side's captions; refloop's locator runs through its `locator` LoRA adapter (untrained, zero B, "
            "so equal to the base), TRL's reward callable runs the base with the adapter disabled",
            f"image encoder: refloop encodes {r['images_encoded_per_step']:g} images a step ({r['image_encoder_seconds_per_step']:.3f} s), "
            f"TRL {t['images_encoded_per_step']:g} ({t['image_encoder_seconds_per_step']:.3f} s), for {unique} boxes with "
            f"G = {SETTINGS['group_size']} completions each: TRL's processor contract is one pixel_values row per completion in every "
            "pass (generation, log-prob and training forwards), so each image is encoded once per completion; refloop-tiny's "
            "processor encodes each distinct image once. Both still compute the image tokens' decoder states once per completion",
            f"training forward + backward: refloop {rp['train_forward'] + rp['backward']:.3f} s/step vs TRL "
            f"{tp['train_forward'] + tp['backward']:.3f} (refloop: log_softmax over the vocabulary at the completion positions; TRL: "
            "its fused chunked log-prob head, which also computes the entropy)",
            f"generation: refloop {rp['generation']:.3f} s/step vs TRL {tp['generation']:.3f}, both transformers' generate() with the "
            "same settings; other (data, losses, optimizer, logging): refloop "
            f"{rp['other']:.3f} vs TRL {tp['other']:.3f}",
            f"memory: after setup (imports, model, data) refloop {r['rss_after_setup_mb']:.0f} MB, TRL {t['rss_after_setup_mb']:.0f} MB "
            "(TRL also imports datasets, pandas and pyarrow); peak refloop "
            f"{r['peak_rss_mb']:.0f} MB, TRL {t['peak_rss_mb']:.0f} MB",
        ],
    }


def source_revision() -> dict:
    """The commit of the refloop code that ran, and whether its src/ differed from it."""
    import refloop

    root = Path(refloop.__file__).resolve().parents[2]

    def git(*cmd: str) -> str:
        out = subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None, "src_modified": bool(git("status", "--porcelain", "src"))}


def write(runs: dict, args) -> None:
    import platform

    import torch
    import transformers

    out = {
        "benchmark": "peer_trl",
        "settings": SETTINGS,
        "command": "OMP_NUM_THREADS=1 REFLOOP_THREADS=1 taskset -c 1 .venv-trl/bin/python " + " ".join(sys.argv),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "refloop_source": source_revision(),
        "threads": 1,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": TRL_VERSION,
        "python": platform.python_version(),
        "models": {},
    }
    # A run of some models keeps the others' entries, each with the run that measured it.
    run_keys = ("command", "cpu_affinity", "refloop_source", "torch", "transformers", "trl", "python")
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    for name, entry in previous.get("models", {}).items():
        if name not in runs:
            entry.setdefault("run", {k: previous.get(k) for k in run_keys})
            out["models"][name] = entry
    for name, pair in runs.items():
        r, t = pair["refloop"], pair["trl"]
        out["models"][name] = {
            "description": MODELS[name]["desc"],
            "run": {k: out[k] for k in run_keys},
            "refloop": r,
            "trl": t,
            "ratio_samples_per_second": round(r["samples_per_second"] / t["samples_per_second"], 3),
            "ratio_samples_per_cpu_second": round(r["samples_per_cpu_second"] / t["samples_per_cpu_second"], 3),
            "ratio_peak_rss": round(r["peak_rss_mb"] / t["peak_rss_mb"], 3),
            "goal_met": r["samples_per_second"] >= 1.5 * t["samples_per_second"] and r["peak_rss_mb"] <= t["peak_rss_mb"],
            "analysis": analyse(r, t),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'model':6s} {'system':8s} {'compl/s':>8s} {'s/step':>8s} {'peak MB':>8s} {'reward':>7s}")
    for name, m in out["models"].items():
        for system in ("refloop", "trl"):
            x = m[system]
            rate, step, peak, reward = x["samples_per_second"], x["seconds_per_step"], x["peak_rss_mb"], x["final_reward"]
            print(f"{name:6s} {system:8s} {rate:8.2f} {step:8.3f} {peak:8.0f} {reward:7.3f}")
        per_cpu = f" ({m['ratio_samples_per_cpu_second']:.2f}x per CPU second)" if "ratio_samples_per_cpu_second" in m else ""
        print(f"{name:6s} refloop/TRL: {m['ratio_samples_per_second']:.2f}x completions/s{per_cpu}, {m['ratio_peak_rss']:.2f}x peak RSS")


if __name__ == "__main__":
    main()
