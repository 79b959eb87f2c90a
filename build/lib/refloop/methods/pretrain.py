"""`refloop pretrain-tiny`: the recipe that trains refloop-tiny (architecture in `models/tiny`) on
shapes-world scenes, from scratch or continued from a checkpoint.

Multi-task: REG (box -> canonical expression), REC (expression -> pointer + box), captioning and
yes/no existence questions, the abilities SC-Tune, Pink and SVP assume a base LVLM has; and
captioning with a noisy grounding in the prompt (`context_caption`, SVP's q(z | c, g)), added by
continued pretraining from the committed checkpoint (`init_from`). Several
queries share each rendered scene (one encoder pass), coordinate targets are Gaussian-smoothed
over neighbouring bins, and a curriculum starts with few-object scenes. Deterministic by seed,
checkpointed atomically, resumable to the same weights.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors.torch import load_file

from refloop.boxes import Box
from refloop.cycle import SC_TUNE_CONSISTENCY, describe_then_locate, locate_boxes
from refloop.errors import RefloopError
from refloop.grounding.base import Grounding
from refloop.grounding.context import grounding_context
from refloop.grounding.oracle import FALSE_SCORES, TRUE_SCORES
from refloop.limits import BatchSize, Seed, Threads
from refloop.models.base import GenerateOptions
from refloop.models.hf import HFVLM
from refloop.models.profiles import TinyProfile
from refloop.models.tiny.configuration import RefloopTinyConfig
from refloop.models.tiny.modeling import RefloopTinyForConditionalGeneration
from refloop.models.tiny.processing import NUM_COORD_BINS, RefloopTinyProcessor, build_tokenizer
from refloop.training.schedules import warmup_cosine
from refloop.training.trackers import Tracking
from refloop.training.trainer import Trainer, step_seed
from refloop.world import (
    COLOURS,
    DOMAINS,
    EVAL_SEED,
    IN_DOMAIN,
    SHAPES,
    TRAIN_SEED,
    canonical_expression,
    caption,
    existence_question,
    get_style,
    referring_expressions,
    render,
    sample_scene,
)
from refloop.world.augment import colour_cast, degrade_image, outline_texture

TASKS = ("rec", "reg", "caption", "exist", "context_caption")
# context_caption: per query, the scene oracle's miss and false-positive rates and box jitter are
# drawn uniformly from these ranges, so the model meets groundings from clean to poor.
CONTEXT_MISS_RATE = (0.0, 0.4)
CONTEXT_FALSE_POSITIVE_RATE = (0.0, 0.3)
CONTEXT_JITTER = (0.0, 0.1)
# The benchmark's out-of-domain style: context_caption never trains on it.
HELD_OUT_CONTEXT_STYLE = "wild"
# context_caption scenes drawn apart from the batch's own (context_styles / degrade): scene indices
# are offset so an in-domain context scene is not the query scene's twin.
CONTEXT_SCENE_OFFSET = 5_000_000


class PretrainConfig(BaseModel):
    """Recipe of refloop-tiny; defaults are what the committed checkpoint was trained with."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    seed: Seed = Field(0, description="seed of weights, task sampling and scene order")
    steps: int = Field(5000, ge=1, description="optimizer steps")
    cosine_steps: int = Field(10000, ge=1, description="the cosine decay is laid out over this many steps")
    cooldown_steps: int = Field(1200, ge=0, description="last steps, where the LR falls linearly to its minimum")
    batch_scenes: BatchSize = Field(24, description="scenes rendered per step")
    queries_per_scene: BatchSize = Field(8, description="queries sharing one encoded scene")
    task_mix: dict[str, float] = Field(
        default_factory=lambda: {"rec": 0.45, "reg": 0.35, "caption": 0.1, "exist": 0.1},
        description="probability of each task per query",
    )
    lr: float = Field(1.5e-3, gt=0, description="peak AdamW learning rate")
    warmup_steps: int = Field(300, ge=0, description="linear warm-up steps")
    min_lr_ratio: float = Field(0.05, ge=0, le=1, description="final learning rate as a fraction of the peak (cosine)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    coord_sigma: float = Field(1.0, ge=0, description="std (in bins) of the Gaussian smoothing of coordinate targets")
    curriculum_steps: int = Field(1000, ge=0, description="steps during which scenes hold at most 3 objects")
    canonical_rec_prob: float = Field(
        0.5, ge=0, le=1, description="REC queries use the canonical expression with this probability, else another unique one"
    )
    hidden_size: int = Field(160, ge=8, le=4096, description="decoder width (refloop-tiny: a tiny model)")
    num_layers: int = Field(4, ge=1, le=64, description="decoder layers")
    num_heads: int = Field(4, ge=1, description="attention heads")
    eval_every: int = Field(1000, ge=1, description="steps between held-out evaluations")
    eval_scenes: int = Field(200, ge=1, description="held-out in-domain scenes per evaluation")
    checkpoint_every: int = Field(200, ge=1, description="steps between resumable checkpoints")
    threads: Threads = Field(2, description="torch CPU threads")
    init_from: str | None = Field(
        None, description="checkpoint directory to continue from ('packaged': the committed refloop-tiny); None: random weights"
    )
    context_styles: dict[str, float] | None = Field(
        None,
        description="context_caption images from these shapes-world styles (probability each), apart from the "
        "other tasks' in-domain scenes; None: the query's own in-domain scene (the v1 behaviour)",
    )
    context_degrade_prob: float = Field(0.0, ge=0, le=1, description="probability that a context_caption image is degraded (degrade_image)")
    context_colour_cast_prob: float = Field(
        0.0,
        ge=0,
        le=1,
        description="probability that a context_caption image's colours mislead (colour_cast: a strong cast or monochrome), "
        "after any degradation; the caption's colours then come from the grounding's labels",
    )
    context_outline_texture_prob: float = Field(
        0.0,
        ge=0,
        le=1,
        description="probability that a context_caption image is redrawn over a smooth colour field with dark object "
        "edges (outline_texture) instead of the context_degrade_prob path; this is close to how the held-out wild style "
        "looks, so wild is then a less unseen style for every benchmark",
    )
    context_outline_texture_frozen_vision: bool = Field(
        False,
        description="the outline_texture images' encodings carry no gradient into the vision encoder: those images "
        "train the decoder only (the encoder still trains on every other image), so the model may learn to follow "
        "the grounding on images its encoder reads badly without the encoder learning their look; needs "
        "context_outline_texture_prob > 0",
    )
    context_miss_rate: tuple[float, float] = Field(
        CONTEXT_MISS_RATE,
        description="range of the per-query miss rate of context_caption's noisy grounding (drawn uniformly): how often "
        "an object of the caption is absent from the grounding",
    )

    @field_validator("context_miss_rate")
    @classmethod
    def _rate_range(cls, rates: tuple[float, float]) -> tuple[float, float]:
        low, high = rates
        if not 0 <= low <= high <= 1:
            raise ValueError(f"context_miss_rate {list(rates)}: need 0 <= low <= high <= 1")
        return rates

    @field_validator("context_styles")
    @classmethod
    def _known_styles(cls, styles: dict[str, float] | None) -> dict[str, float] | None:
        if styles is None:
            return None
        unknown = sorted(set(styles) - set(DOMAINS))
        if unknown:
            raise ValueError(f"unknown style(s) {', '.join(unknown)}; known: {', '.join(DOMAINS)}")
        if HELD_OUT_CONTEXT_STYLE in styles:
            raise ValueError(f"{HELD_OUT_CONTEXT_STYLE!r} is the out-of-domain test of the context; it cannot be trained on")
        if any(p < 0 for p in styles.values()) or sum(styles.values()) <= 0:
            raise ValueError("style probabilities must be >= 0 with a positive sum")
        return styles

    @model_validator(mode="after")
    def _heads_divide_width(self) -> PretrainConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} must divide hidden_size {self.hidden_size} (each head takes an equal share)")
        return self

    @model_validator(mode="after")
    def _frozen_vision_needs_outline_texture(self) -> PretrainConfig:
        if self.context_outline_texture_frozen_vision and self.context_outline_texture_prob == 0:
            raise ValueError(
                "context_outline_texture_frozen_vision freezes the vision encoder on outline_texture images; "
                "set context_outline_texture_prob > 0"
            )
        return self

    @property
    def separate_context_images(self) -> bool:
        return (
            self.context_styles is not None
            or self.context_degrade_prob > 0
            or self.context_colour_cast_prob > 0
            or self.context_outline_texture_prob > 0
        )

    @field_validator("task_mix")
    @classmethod
    def _known_tasks(cls, mix: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(mix) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
        if any(p < 0 for p in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError("task probabilities must be >= 0 with a positive sum")
        return mix

    def options_at_default(self) -> frozenset[str]:
        """The grounded-caption options added after the recipe wrapper recorded runs
        (`context_colour_cast_prob`, `context_outline_texture_prob`, `context_outline_texture_frozen_vision`,
        `context_miss_rate`) that are at
        their defaults: left out of what identifies a run, so outputs and run directories written
        before they existed still match and resume."""
        at_default = set()
        if self.context_colour_cast_prob == 0:
            at_default.add("context_colour_cast_prob")
        if self.context_outline_texture_prob == 0:
            at_default.add("context_outline_texture_prob")
        if not self.context_outline_texture_frozen_vision:
            at_default.add("context_outline_texture_frozen_vision")
        if tuple(self.context_miss_rate) == CONTEXT_MISS_RATE:
            at_default.add("context_miss_rate")
        return frozenset(at_default)

    def trainer_config(self) -> dict:
        """The config a run directory is checked against on resume. Unset later fields
        (`init_from`, `context_styles`, `context_degrade_prob` and `options_at_default`) are left
        out, so runs of recipes written before they existed still resume."""
        exclude = set(self.options_at_default())
        if self.init_from is None:
            exclude.add("init_from")
        if self.context_styles is None:
            exclude.add("context_styles")
        if self.context_degrade_prob == 0:
            exclude.add("context_degrade_prob")
        return self.model_dump(mode="json", exclude=exclude)


def build_model(cfg: PretrainConfig) -> tuple[RefloopTinyForConditionalGeneration, RefloopTinyProcessor]:
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    config = RefloopTinyConfig(
        vocab_size=len(vocab),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.hidden_size * 8 / 3) // 16 * 16,
        image_token_id=vocab["<image>"],
        region_token_id=vocab["<region>"],
        cell_token_start=vocab["<cell_0>"],
        coord_token_start=vocab["<0>"],
        num_coord_bins=NUM_COORD_BINS,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<bos>"],
        eos_token_id=vocab["<eos>"],
    )
    torch.manual_seed(cfg.seed)
    model = RefloopTinyForConditionalGeneration(config)
    # Structural tokens are never a valid output; generation masks them (a random or sampled model
    # could otherwise emit <image> and corrupt the next prompt). Training never targets them.
    model.generation_config.suppress_tokens = [vocab[t] for t in ("<pad>", "<bos>", "<unk>", "<image>", "<region>", "<sep>")]
    return model, RefloopTinyProcessor(tokenizer, image_size=config.image_size, num_image_tokens=config.num_cells)


def init_checkpoint_dir(init_from: str) -> Path:
    """ "packaged": the embedded refloop-tiny; a packaged model's name: its
    directory; else a checkpoint directory."""
    from refloop.models import default_model_path, resolve_model

    if init_from == "packaged":
        return default_model_path()
    return Path(resolve_model(init_from))


def load_init_weights(model: RefloopTinyForConditionalGeneration, processor: RefloopTinyProcessor, init_from: str) -> Path:
    """Load a refloop-tiny checkpoint's weights into `model` (built from the recipe): the recipe's
    architecture and the code's vocabulary must be the checkpoint's."""
    directory = init_checkpoint_dir(init_from)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise RefloopError(f"init_from {init_from!r}: no model.safetensors in {directory}")
    saved = RefloopTinyProcessor.from_pretrained(directory).tokenizer.get_vocab()
    if saved != processor.tokenizer.get_vocab():
        raise RefloopError(f"init_from {init_from!r}: the checkpoint's vocabulary differs from this version's tokenizer")
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as exc:
        raise RefloopError(f"init_from {init_from!r}: weights do not fit the recipe's architecture ({exc})") from None
    return directory


def noisy_grounding(scene, rng: random.Random, miss_rate: tuple[float, float] = CONTEXT_MISS_RATE) -> Grounding:
    """The scene's objects as a noisy detector reports them, drawn like the scene oracle asked for
    each colour-shape pair present: per query, a miss rate, a false-positive rate and a jitter are
    drawn from the CONTEXT_* ranges (the miss rate from `miss_rate`); each object is missed at the miss rate, else labelled
    'colour shape' with corners moved by up to the jitter of its width/height; per pair present,
    a false positive is added at the false-positive rate, labelled with a pair absent from the
    scene, on a random box of an object's size. Scores follow the oracle's ranges and a
    `Grounding` lists detections best first, so the order does not reveal the caption's."""
    miss_rate = rng.uniform(*miss_rate)
    false_positive_rate = rng.uniform(*CONTEXT_FALSE_POSITIVE_RATE)
    jitter = rng.uniform(*CONTEXT_JITTER)
    present = {(o.colour, o.shape) for o in scene.objects}
    absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if (c, s) not in present]
    boxes, labels, scores = [], [], []
    for obj in scene.objects:
        if rng.random() < miss_rate:
            continue
        b = obj.box
        dx1, dy1, dx2, dy2 = (rng.uniform(-jitter, jitter) for _ in range(4))
        boxes.append(Box(b.x1 + dx1 * b.width, b.y1 + dy1 * b.height, b.x2 + dx2 * b.width, b.y2 + dy2 * b.height))
        labels.append(f"{obj.colour} {obj.shape}")
        scores.append(rng.uniform(*TRUE_SCORES))
    for _ in present:
        if absent and rng.random() < false_positive_rate:
            side = rng.uniform(0.1, 0.3) * min(scene.width, scene.height)
            w, h = side * rng.uniform(0.8, 1.25), side * rng.uniform(0.8, 1.25)
            x1, y1 = rng.uniform(0, scene.width - w), rng.uniform(0, scene.height - h)
            boxes.append(Box(x1, y1, x1 + w, y1 + h))
            labels.append(absent[rng.randrange(len(absent))])
            scores.append(rng.uniform(*FALSE_SCORES))
    return Grounding.from_detections(boxes, labels, scores, (scene.width, scene.height))


def context_scene(step: int, i: int, cfg: PretrainConfig, rng: random.Random, max_objects: int | None):
    """The scene and image a context_caption query about batch scene `i` is asked on when the
    recipe sets `context_styles` / `context_degrade_prob`: a scene of a style drawn from
    `context_styles` (default in-domain), redrawn by `outline_texture` with probability
    `context_outline_texture_prob` or else degraded with probability `context_degrade_prob`, then
    given misleading colours with probability `context_colour_cast_prob` (the two later options
    draw nothing from the stream when they are 0, so recipes without them see the same images).
    The third value says whether the image was drawn by `outline_texture`."""
    styles = cfg.context_styles or {IN_DOMAIN: 1.0}
    names, weights = zip(*styles.items(), strict=True)
    name = rng.choices(names, weights)[0]
    index = step * cfg.batch_scenes + i + cfg.seed * 10_000_000 + CONTEXT_SCENE_OFFSET
    scene = sample_scene(get_style(name), TRAIN_SEED, index, max_objects=max_objects)
    image = render(scene)
    textured = cfg.context_outline_texture_prob > 0 and rng.random() < cfg.context_outline_texture_prob
    if textured:
        image = outline_texture(scene, np.random.default_rng(rng.getrandbits(64)))
    elif rng.random() < cfg.context_degrade_prob:
        image = degrade_image(scene, image, np.random.default_rng(rng.getrandbits(64)))
    if cfg.context_colour_cast_prob > 0 and rng.random() < cfg.context_colour_cast_prob:
        image = colour_cast(image, np.random.default_rng(rng.getrandbits(64)))
    return scene, image, textured


def _query(
    scene,
    rng: random.Random,
    np_rng: np.random.Generator,
    task: str,
    profile: TinyProfile,
    canonical_prob: float,
    miss_rate: tuple[float, float] = CONTEXT_MISS_RATE,
) -> tuple[str, str] | None:
    size = (scene.width, scene.height)
    if task in ("rec", "reg"):
        targets = [(o, referring_expressions(scene, o)) for o in scene.objects]
        targets = [(o, e) for o, e in targets if e]
        if not targets:
            return None
        obj, exprs = targets[rng.randrange(len(targets))]
        if task == "reg":
            return profile.reg_prompt(obj.box, size), exprs[0]
        expr = exprs[0] if rng.random() < canonical_prob else exprs[rng.randrange(len(exprs))]
        return profile.rec_prompt(expr), profile.rec_answer(obj.box, size)
    if task == "caption":
        return profile.caption_prompt(), caption(scene)
    if task == "context_caption":
        context = grounding_context(noisy_grounding(scene, rng, miss_rate), size, codec=profile.codec)
        return profile.grounded_caption_prompt(context), caption(scene)
    question, answer = existence_question(scene, np_rng)
    return profile.prompt(question), answer


def make_batch(step: int, cfg: PretrainConfig, processor: RefloopTinyProcessor, profile: TinyProfile) -> dict[str, torch.Tensor]:
    """Step `step`'s batch, a pure function of (seed, step) so resumed runs see the same data."""
    rng = random.Random(step_seed(cfg.seed, step, "batch"))
    np_rng = np.random.default_rng([cfg.seed, step])
    style = get_style(IN_DOMAIN)
    max_objects = 3 if step < cfg.curriculum_steps else None
    tasks, weights = zip(*cfg.task_mix.items(), strict=True)
    images, prompts, answers, image_index = [], [], [], []
    frozen = []  # indices of images whose encodings train the decoder only
    # context_caption queries on images of their own (context_styles / context_degrade_prob): one
    # extra image per batch scene that has such a query, drawn from a stream of its own.
    separate = cfg.separate_context_images
    ctx_rng = random.Random(f"{cfg.seed}/{step}/context") if separate else None
    for i in range(cfg.batch_scenes):
        scene = sample_scene(style, TRAIN_SEED, step * cfg.batch_scenes + i + cfg.seed * 10_000_000, max_objects=max_objects)
        images.append(render(scene))
        own = len(images) - 1
        ctx = None  # (scene, image index) of this scene's context_caption queries
        for _ in range(cfg.queries_per_scene):
            task = rng.choices(tasks, weights)[0]
            if separate and task == "context_caption":
                if ctx is None:
                    ctx_scene, ctx_image, textured = context_scene(step, i, cfg, ctx_rng, max_objects)
                    images.append(ctx_image)
                    if textured and cfg.context_outline_texture_frozen_vision:
                        frozen.append(len(images) - 1)
                    ctx = (ctx_scene, len(images) - 1)
                q, index = _query(ctx[0], rng, np_rng, task, profile, cfg.canonical_rec_prob, cfg.context_miss_rate), ctx[1]
            else:
                q, index = _query(scene, rng, np_rng, task, profile, cfg.canonical_rec_prob, cfg.context_miss_rate), own
            if q is None:
                q, index = _query(scene, rng, np_rng, "caption", profile, cfg.canonical_rec_prob), own
            prompts.append(q[0])
            answers.append(q[1])
            image_index.append(index)
    batch = encode_pairs(processor, images, prompts, answers, image_index)
    if cfg.context_outline_texture_frozen_vision:
        batch["frozen_images"] = torch.zeros(len(images), dtype=torch.bool)
        batch["frozen_images"][frozen] = True
    return batch


def encode_pairs(
    processor: RefloopTinyProcessor, images, prompts: list[str], answers: list[str], image_index: list[int]
) -> dict[str, torch.Tensor]:
    """Right-padded text after the image tokens (prompt + answer + <eos>), labels only on the answer.

    Prompts start with the image placeholder; its tokens are supplied by `forward_shared_images`.
    """
    tok = processor.tokenizer
    for p in prompts:
        if not p.startswith("<image>"):
            raise ValueError(f"refloop-tiny prompts start with <image>: {p!r}")
    p_ids = tok([p[len("<image>") :] for p in prompts], add_special_tokens=False)["input_ids"]
    a_ids = tok([a + " <eos>" for a in answers], add_special_tokens=False)["input_ids"]
    length = max(len(p) + len(a) for p, a in zip(p_ids, a_ids, strict=True))
    input_ids = torch.full((len(prompts), length), tok.pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    attention = torch.zeros_like(input_ids)
    for r, (p, a) in enumerate(zip(p_ids, a_ids, strict=True)):
        seq = p + a
        input_ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, len(p) : len(seq)] = torch.tensor(a)
        attention[r, : len(seq)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "pixel_values": processor.preprocess_images(images),
        "image_index": torch.tensor(image_index),
    }


def smoothed_loss(logits: torch.Tensor, labels: torch.Tensor, coord_start: int, bins: int, sigma: float) -> torch.Tensor:
    """Next-token cross-entropy; coordinate targets spread over neighbouring bins (Gaussian)."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    keep = targets != -100
    logp = F.log_softmax(logits[keep], dim=-1)
    tgt = targets[keep]
    nll = -logp.gather(1, tgt[:, None]).squeeze(1)
    is_coord = (tgt >= coord_start) & (tgt < coord_start + bins)
    if sigma > 0 and is_coord.any():
        centre = (tgt[is_coord] - coord_start).float()
        grid = torch.arange(bins, dtype=torch.float32)
        weights = torch.exp(-0.5 * ((grid[None] - centre[:, None]) / sigma) ** 2)
        weights = weights / weights.sum(dim=1, keepdim=True)
        nll = nll.clone()
        nll[is_coord] = -(weights * logp[is_coord][:, coord_start : coord_start + bins]).sum(dim=1)
    return nll.mean()


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, cosine decay laid out over `cosine_steps`, and a linear cooldown to the
    minimum over the last `cooldown_steps` of the `steps` actually run (warmup-stable-decay style:
    the run can end before the cosine does and still finish annealed)."""
    lr = warmup_cosine(step, cfg.lr, cfg.warmup_steps, cfg.cosine_steps, cfg.min_lr_ratio)
    cooldown_start = max(cfg.steps - cfg.cooldown_steps, cfg.warmup_steps)
    if step >= cooldown_start:
        lr += (cfg.lr * cfg.min_lr_ratio - lr) * (step - cooldown_start) / max(1, cfg.steps - cooldown_start)
    return lr


@torch.no_grad()
def quick_eval(model, processor, profile: TinyProfile, num_scenes: int, batch: int = 100) -> dict[str, float]:
    """REC acc@0.5, REG exact match and self-consistency on held-out in-domain scenes, through the
    same VLM interface and cycle the evaluation commands use."""
    model.eval()
    style = get_style(IN_DOMAIN)
    rng = random.Random(1234)
    items = []
    for i in range(num_scenes):
        scene = sample_scene(style, EVAL_SEED, i)
        cands = [o for o in scene.objects if canonical_expression(scene, o)]
        obj = cands[rng.randrange(len(cands))]
        items.append((scene, obj, canonical_expression(scene, obj)))
    vlm = HFVLM(model, processor, profile, batch_size=batch)
    images = [render(scene) for scene, _, _ in items]
    targets = [obj.box for _, obj, _ in items]
    _, rec_iou = locate_boxes(vlm, images, [expr for _, _, expr in items], targets)
    cycle = describe_then_locate(vlm, vlm, images, targets, GenerateOptions(max_new_tokens=10))
    model.train()
    n = len(items)
    return {
        "rec_acc": int(SC_TUNE_CONSISTENCY(rec_iou).sum()) / n,
        "reg_exact": sum(c == expr for c, (_, _, expr) in zip(cycle.expressions, items, strict=True)) / n,
        "self_consistency": int(cycle.consistent.sum()) / n,
    }


def pretrain(cfg: PretrainConfig, work_dir: Path, export_dir: Path | None = None, progress=None, tracking: Tracking | None = None) -> dict:
    """Train (or resume) in `work_dir` on the shared trainer, reporting to `tracking` (default:
    nowhere); export the final model as an HF checkpoint directory."""
    torch.set_num_threads(cfg.threads)
    model, processor = build_model(cfg)
    if cfg.init_from is not None:
        load_init_weights(model, processor, cfg.init_from)
    profile = TinyProfile(grid_size=model.config.grid_size)
    trainer = Trainer(
        model,
        config=cfg.trainer_config(),
        total_steps=cfg.steps,
        seed=cfg.seed,
        checkpoint_every=cfg.checkpoint_every,
        grad_clip=cfg.grad_clip,
    )
    if tracking is not None:
        trainer.track(tracking)

    def adamw(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))

    trainer.add_optimizer("model", list(model.parameters()), adamw)
    coord_start = model.config.coord_token_start

    def step_fn(step: int) -> dict:
        model.train()
        batch = make_batch(step, cfg, processor, profile)
        for group in trainer.optimizer("model").param_groups:
            group["lr"] = lr_at(step, cfg)
        labels = batch["labels"]

        def loss_of(rows: list[int]) -> torch.Tensor:
            # Whole batch per update: image tokens are shared by the queries about each scene.
            logits = model.forward_shared_images(
                batch["pixel_values"], batch["image_index"], batch["input_ids"], batch["attention_mask"], batch.get("frozen_images")
            )
            return smoothed_loss(logits, labels, coord_start, NUM_COORD_BINS, cfg.coord_sigma)

        loss, grad_norm = trainer.update("model", loss_of, list(range(labels.shape[0])), tokens=int((labels != -100).sum()))
        stats = {"loss": loss, "grad_norm": grad_norm, "samples": labels.shape[0]}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            stats |= quick_eval(model, processor, profile, cfg.eval_scenes)
        return stats

    summary = trainer.run(work_dir, step_fn, progress)
    if export_dir is not None:
        export_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(export_dir)
        processor.save_pretrained(export_dir)
    return {"steps": cfg.steps, "elapsed_s": summary["train_seconds"]}


def run_pretrain_tiny(
    cfg: PretrainConfig,
    out: Path,
    work_dir: Path,
    inputs: Sequence[object] = (),
    overwrite: bool = False,
    progress: bool = False,
    on_eval: Callable[[dict], None] | None = None,
) -> dict:
    """`refloop pretrain-tiny`: train (or resume) in `work_dir` and export to `out` with its recipe
    (recipe.json), training log and learning curves, through the one recipe wrapper (`run_recipe`;
    no results.json and no model card: `out` is a model folder, whose README.md is written by hand).
    `out` holds a run of this recipe only: another recipe's checkpoint there is refused unless
    `overwrite`; both places are checked before the first step (a bad `out` would otherwise be
    found after training). `inputs`: files the recipe was read from; `progress`: show a progress
    bar; `on_eval`: called with each step's record that holds the quick evaluation."""
    import shutil

    from refloop.methods.recipe import RecipeRun, recipe_fingerprint, run_recipe
    from refloop.progress import progress_bar
    from refloop.report.plots import pretrain_curves
    from refloop.runs import check_output

    task = "pretrain-tiny"
    inputs = [*inputs, *([cfg.init_from] if cfg.init_from else [])]  # the checkpoint it continues is read too
    unchanged = cfg.options_at_default()  # outputs written before these options existed still match
    fingerprint = recipe_fingerprint(task, cfg, unchanged)
    check_output(out, inputs=inputs, fingerprint=fingerprint, overwrite=overwrite, apart_from={"--work-dir": work_dir})
    check_output(work_dir, inputs=inputs, option="--work-dir")

    def body(run: RecipeRun) -> dict:
        with progress_bar("pretrain refloop-tiny", cfg.steps, enabled=progress and run.main_process) as advance:

            def on_record(record: dict) -> None:
                if advance is not None:
                    advance(1)
                if on_eval is not None and "rec_acc" in record:
                    on_eval(record)

            summary = pretrain(cfg, work_dir, export_dir=out if run.main_process else None, progress=on_record, tracking=run.tracking)
        if run.main_process:
            shutil.copyfile(work_dir / "metrics.jsonl", out / "training_log.jsonl")
            pretrain_curves(work_dir / "metrics.jsonl", out / "learning_curves.png")
        return summary

    return run_recipe(task, cfg, out, body, overwrite, unchanged=unchanged, results_file=None)
