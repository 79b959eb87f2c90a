"""SC-Tune: Self-Consistency Tuning (paper 000, Sec. 3 and 4.1).

One base model, two roles as named LoRA adapters (`describer`, `locator`). Phases alternate
(Sec. 3.2):
- describer phase, H_d steps: the describer samples captions for boxes and the frozen locator
  re-locates them (the describe-then-locate cycle); reward = IoU at the last token minus a
  token-level KL penalty to the reference (Eq. 2); value-free advantage = return-to-go minus a
  baseline's reward (Eq. 3); PPO clipped loss (Eq. 1), several epochs over the batch.
- locator phase, H_l steps: the frozen describer writes greedy captions; the locator learns by
  MLE to write the ground-truth box for them (Eq. 4), optionally mixed with supervised pairs.
- after each phase the trained role's adapter is copied onto the other (parameter sync).
Seeding, checkpoints, resume, metrics, micro-batches and data parallelism are the shared
trainer's (`refloop.training.trainer`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from refloop.cycle import describe_then_locate
from refloop.data.records import BoxItem
from refloop.errors import RefloopError
from refloop.limits import BatchSize, NewTokens, Samples, Seed
from refloop.models.base import VLM, GenerateOptions
from refloop.models.hf import HFVLM
from refloop.seeding import step_seed
from refloop.training.adapters import REFERENCE, LoraSettings, NamedAdapters
from refloop.training.losses import answer_nll
from refloop.training.ppo import clipped_policy_loss, pad_rows, token_rewards, value_free_advantages
from refloop.training.trainer import Trainer

Role = Literal["describer", "locator"]
ROLES: tuple[Role, Role] = ("describer", "locator")


class SCTuneConfig(BaseModel):
    """Defaults are the paper's (Sec. 4.1) and the authors' release where the paper is silent."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # Schedule (Sec. 3.2, 4.1)
    phases: int = Field(6, ge=1, description="number of phases; they alternate describer/locator")
    first_phase: Role = Field("describer", description="role trained in the first phase")
    describer_steps: int = Field(200, ge=1, description="H for describer phases (paper 200)")
    locator_steps: int = Field(200, ge=1, description="H for locator phases (paper 200, authors' release 100)")
    tune: Literal["both", "describer", "locator"] = Field(
        "both", description="both = SC-Tune; describer/locator = Table 8 ablations (only that role, every phase, no sync)"
    )
    batch_size: BatchSize = Field(128, description="boxes per step")
    # Optimisation
    describer_lr: float = Field(5e-7, gt=0, description="describer learning rate (paper, 7B models)")
    locator_lr: float = Field(1e-6, gt=0, description="locator learning rate (paper, 7B models)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="max gradient norm")
    reset_optimizer_on_switch: bool = Field(True, description="fresh AdamW state at each phase (authors' release)")
    # Describer PPO (Eq. 1-3)
    kl_coef: float = Field(0.01, ge=0, description="beta of the token-level KL penalty (Eq. 2)")
    clip_eps: float = Field(0.2, gt=0, description="PPO clip epsilon (Eq. 1)")
    ppo_epochs: int = Field(2, ge=1, description="PPO epochs over each rollout batch")
    minibatches: int = Field(1, ge=1, description="minibatches per PPO epoch")
    baseline: Literal["reference", "greedy", "group"] = Field(
        "reference", description="reference: pi_ref's greedy caption (paper); greedy: current policy's; group: mean of K samples"
    )
    group_size: Samples = Field(4, ge=2, description="samples per box with baseline=group")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_k: int = Field(100, ge=0, description="sampling top-k (authors' release)")
    top_p: float = Field(0.3, gt=0, le=1, description="sampling top-p (authors' release)")
    max_new_tokens: NewTokens = Field(30, description="longest sampled caption (authors' release)")
    # Locator (Eq. 4)
    supervised_ratio: float = Field(0.0, ge=0, le=1, description="fraction of locator samples taken from supervised referring data (L_sup)")
    # Roles
    lora: LoraSettings = Field(default_factory=LoraSettings, description="adapter settings")
    reference: Literal["base", "snapshot"] = Field("base", description="reference policy: base with adapters off, or a frozen snapshot")
    # Bookkeeping
    seed: Seed = Field(0, description="seed of batches and sampling")
    checkpoint_every: int = Field(25, ge=1, description="steps between resumable checkpoints")
    generation_batch_size: BatchSize = Field(64, description="sequences per generation/forward batch")
    micro_batch_size: BatchSize | None = Field(
        None,
        description="sequences per forward+backward of an update; gradients accumulate to the full minibatch's, "
        "so activation memory scales with this instead of the batch (None: the whole minibatch at once)",
    )


@dataclass(frozen=True)
class Phase:
    index: int
    role: Role
    start: int  # first global step
    steps: int


def schedule(cfg: SCTuneConfig) -> list[Phase]:
    """Alternating phases. Ablations (tune=describer|locator) keep the full cycle's phase lengths
    and optimizer resets but train only their role, so every arm has the same step budget."""
    out, start = [], 0
    other = {"describer": "locator", "locator": "describer"}
    for k in range(cfg.phases):
        cycle_role = cfg.first_phase if k % 2 == 0 else other[cfg.first_phase]
        steps = cfg.describer_steps if cycle_role == "describer" else cfg.locator_steps
        out.append(Phase(k, cycle_role if cfg.tune == "both" else cfg.tune, start, steps))
        start += steps
    return out


class Rollout(NamedTuple):
    """One describer batch, everything the PPO update needs (Eq. 1-3)."""

    images: list[Image.Image]  # one per sampled caption
    prompts: list[str]
    token_ids: list[list[int]]  # sampled captions c ~ pi_theta_old
    reward: torch.Tensor  # IoU(B, B_hat) of each caption (0 when the locator's answer does not parse)
    baseline: torch.Tensor  # R(c*, s*) of Eq. 3 for each caption's box
    logp_old: torch.Tensor  # (captions, tokens) log pi_theta_old
    logp_ref: torch.Tensor  # (captions, tokens) log pi_ref
    mask: torch.Tensor  # (captions, tokens) real caption tokens
    consistent: float  # fraction of captions whose located box has IoU > 0.5
    parse_failures: int
    seconds: float  # sampling, re-locating and the baseline


class SCTune:
    """The SC-Tune algorithm over the shared cycle, adapters and trainer. `vlm` must wrap the
    adapters' module (see `from_base`)."""

    # With one minibatch, log pi_theta_old comes from the first PPO epoch's forward (exact; see
    # `describer_step`). False: a separate no-grad pass, as with several minibatches (for checks).
    old_logprobs_from_first_epoch: bool = True

    def __init__(
        self, adapters: NamedAdapters, vlm: HFVLM, cfg: SCTuneConfig, train: list[BoxItem], supervised: list[BoxItem] | None = None
    ) -> None:
        if not train:
            raise ValueError("SC-Tune needs at least one training box")
        self.adapters, self.vlm, self.cfg, self.train = adapters, vlm, cfg, train
        self.supervised = [s for s in supervised or [] if s.expression]
        self.describer: VLM = adapters.view(vlm, "describer")
        self.locator: VLM = adapters.view(vlm, "locator")
        self.reference: VLM = adapters.view(vlm, REFERENCE)
        self.engine = None  # a vLLM engine generating for the roles (generate_with), else transformers
        self._stale: set[str] = set()  # adapters changed since their last push to the engine
        self.phases = schedule(cfg)
        self.total_steps = sum(p.steps for p in self.phases)
        self.trainer = Trainer(
            adapters,
            config=cfg.model_dump(mode="json"),
            total_steps=self.total_steps,
            seed=cfg.seed,
            checkpoint_every=cfg.checkpoint_every,
            grad_clip=cfg.grad_clip,
            micro_batch_size=cfg.micro_batch_size,
            device=vlm.device,
        )
        if cfg.batch_size % self.trainer.world_size:
            raise RefloopError(f"batch_size {cfg.batch_size} is not divisible by {self.trainer.world_size} processes")
        for role, lr in (("describer", cfg.describer_lr), ("locator", cfg.locator_lr)):
            self.trainer.add_optimizer(
                role, adapters.parameters(role), lambda ps, lr=lr: torch.optim.AdamW(ps, lr=lr, weight_decay=cfg.weight_decay)
            )

    @classmethod
    def from_base(cls, vlm: HFVLM, cfg: SCTuneConfig, train: list[BoxItem], supervised: list[BoxItem] | None = None, engine=None) -> SCTune:
        """`engine` (a `refloop.models.vllm.VLLMEngine` on the same checkpoint, started with LoRA):
        the roles generate through it; log-probs and training stay in transformers."""
        torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn at random: same seed, same start
        adapters = NamedAdapters(vlm.model, cfg.lora, ROLES, reference=cfg.reference)
        tuned = vlm.with_module(adapters.module, batch_size=cfg.generation_batch_size)
        tuned.share_image_states = True  # the K samples of a box share their image's states in every log-prob forward
        tuner = cls(adapters, tuned, cfg, train, supervised)
        if engine is not None:
            tuner.generate_with(engine)
        return tuner

    def generate_with(self, engine) -> None:
        """Generate every role's text with a vLLM engine: each role is a LoRA adapter of it (the
        reference: the base, or its snapshot adapter), pushed again before any step that follows
        a change of its tensors (an update, a parameter sync, a resumed checkpoint)."""
        from refloop.models.vllm import VLLMVLM

        if self.cfg.lora.vision_tower:
            raise RefloopError("generation_backend vllm serves language-model LoRA adapters only: --set sctune.lora.vision_tower=false")
        if self.adapters.sharded:
            raise RefloopError("generation_backend vllm runs in one process: launch without FSDP")
        served = VLLMVLM(
            engine,
            self.vlm.processor,
            self.vlm.profile,
            self.vlm.name,
            self.cfg.generation_batch_size,
            suppress_tokens=self.vlm.suppress_tokens,
        )
        self.engine = engine
        self.describer = served.view("describer", scorer=self.describer)
        self.locator = served.view("locator", scorer=self.locator)
        reference = REFERENCE if self.adapters.reference_kind == "snapshot" else None
        self.reference = served.view(reference, scorer=self.reference)
        self._stale = {*ROLES, *([REFERENCE] if reference else [])}

    def _publish(self) -> None:
        """Push the adapters changed since their last push (vLLM backend only)."""
        from refloop.models.vllm import write_peft_adapter

        if self.engine is None:
            return
        for name in sorted(self._stale):
            # a never-trained adapter (LoRA B = 0) is served as the base: no LoRA kernels
            self.engine.push(name, write_peft_adapter(self.adapters, name), identity=self.adapters.is_identity(name))
        self._stale.clear()

    def batch(self, step: int) -> list[BoxItem]:
        """Step `step`'s boxes (all processes), a pure function of (seed, step)."""
        rng = random.Random(step_seed(self.cfg.seed, step, "batch"))
        return [self.train[rng.randrange(len(self.train))] for _ in range(self.cfg.batch_size)]

    # ---- describer phase (Eq. 1-3) ----------------------------------------------------------
    def rollout(self, items: list[BoxItem], old_logprobs: bool = True) -> Rollout:
        """Sample, re-locate and score a batch. `old_logprobs=False` leaves `logp_old` zero for the
        caller to fill from the first PPO epoch's forward pass (see `describer_step`)."""
        cfg = self.cfg
        k = cfg.group_size if cfg.baseline == "group" else 1
        images = [it.load_image() for it in items]
        boxes = [it.box for it in items]
        sampling = GenerateOptions(
            do_sample=True,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            num_return_sequences=k,
        )
        t0 = time.perf_counter()
        # Sampled captions and the frozen locator's IoU: the reward of Eq. 2.
        cycle = describe_then_locate(self.describer, self.locator, images, boxes, sampling)
        reward = torch.tensor(cycle.iou, dtype=torch.float32)
        # Baseline reward R(c*, s*) of Eq. 3.
        if cfg.baseline == "group":
            baseline = reward.view(-1, k).mean(dim=1).repeat_interleave(k)
        else:
            greedy = GenerateOptions(max_new_tokens=cfg.max_new_tokens)
            baseline_describer = self.reference if cfg.baseline == "reference" else self.describer
            baseline = torch.tensor(describe_then_locate(baseline_describer, self.locator, images, boxes, greedy).iou, dtype=torch.float32)
        seconds = time.perf_counter() - t0
        # Old and reference log-probs from the same masked forward pass as the new ones.
        r_images = [img for img in images for _ in range(k)]
        prompts = [self.vlm.profile.reg_prompt(b, img.size) for img, b in zip(r_images, cycle.boxes, strict=True)]
        ids = [list(c.token_ids) for c in cycle.descriptions]
        if old_logprobs:
            logp_old, mask = pad_rows(self.describer.logprobs(r_images, prompts, ids))
        else:
            logp_old, mask = pad_rows([torch.zeros(len(row)) for row in ids])
        if cfg.kl_coef > 0:
            logp_ref, _ = pad_rows(self.reference.logprobs(r_images, prompts, ids))
        else:  # beta = 0: pi_ref never enters Eq. 2, its forward pass is skipped
            logp_ref = logp_old
        consistent = float(cycle.consistent.mean())
        return Rollout(r_images, prompts, ids, reward, baseline, logp_old, logp_ref, mask, consistent, cycle.parse_failures, seconds)

    def describer_step(self, items: list[BoxItem]) -> dict:
        cfg = self.cfg
        # With one minibatch, the first epoch's forward of every row runs before the epoch's only
        # optimizer step: detached, it IS log pi_theta_old, so the separate no-grad pass is skipped
        # (TRL does the same for one iteration). Rows stay on their process, so data parallel holds.
        old_from_first_epoch = self.old_logprobs_from_first_epoch and cfg.minibatches == 1
        ro = self.rollout(items, old_logprobs=not old_from_first_epoch)
        advantages = torch.zeros_like(ro.mask)

        def score(rows: list[int]) -> None:  # Eq. 2-3 are per row: score rows once their pi_old is known
            rewards = token_rewards(ro.logp_old[rows], ro.logp_ref[rows], ro.mask[rows], ro.reward[rows], cfg.kl_coef)  # Eq. 2
            advantages[rows] = value_free_advantages(rewards, ro.mask[rows], ro.baseline[rows])  # Eq. 3

        if not old_from_first_epoch:
            score(list(range(len(ro.token_ids))))
        stats = {"approx_kl": 0.0, "clipfrac": 0.0, "loss": 0.0, "grad_norm": 0.0}
        updates = 0
        for epoch in range(cfg.ppo_epochs):  # PPO epochs over minibatches (Eq. 1)
            order = torch.randperm(len(ro.token_ids))  # seeded per step by the trainer
            for mb in order.chunk(cfg.minibatches):
                rows = mb.tolist()
                n_tokens = ro.mask[rows].sum().clamp(min=1)
                fill_old = old_from_first_epoch and epoch == 0

                def loss_of(chunk: list[int], n_tokens: torch.Tensor = n_tokens, fill_old: bool = fill_old) -> torch.Tensor:
                    logp_new, _ = pad_rows(
                        self.describer.logprobs(
                            [ro.images[i] for i in chunk], [ro.prompts[i] for i in chunk], [ro.token_ids[i] for i in chunk], grad=True
                        )
                    )
                    width = logp_new.shape[1]
                    if fill_old:  # no update yet in this step: these are pi_theta_old's log-probs
                        ro.logp_old[chunk, :width] = logp_new.detach()
                        score(chunk)
                    loss, chunk_stats = clipped_policy_loss(
                        logp_new, ro.logp_old[chunk, :width], advantages[chunk, :width], ro.mask[chunk, :width], cfg.clip_eps, n_tokens
                    )
                    stats["approx_kl"] += chunk_stats["approx_kl"]
                    stats["clipfrac"] += chunk_stats["clipfrac"]
                    return loss

                loss_value, norm = self.trainer.update("describer", loss_of, rows, tokens=int(n_tokens))
                stats["grad_norm"] += norm
                stats["loss"] += loss_value
                updates += 1
        n_tok = ro.mask.sum().clamp(min=1)
        return {
            "reward": float(ro.reward.mean()),
            "baseline_reward": float(ro.baseline.mean()),
            "consistency": ro.consistent,
            **({"kl_to_reference": float(((ro.logp_old - ro.logp_ref) * ro.mask).sum() / n_tok)} if cfg.kl_coef > 0 else {}),
            "advantage": float((advantages * ro.mask).sum() / n_tok),
            "parse_failure_rate": ro.parse_failures / len(ro.token_ids),
            "caption_tokens": float(ro.mask.sum(1).mean()),
            "captions_per_second": len(ro.token_ids) / ro.seconds,
            **{key: v / updates for key, v in stats.items()},
        }

    # ---- locator phase (Eq. 4) --------------------------------------------------------------
    def locator_step(self, items: list[BoxItem], step: int) -> dict:
        cfg, profile = self.cfg, self.vlm.profile
        images = [it.load_image() for it in items]
        boxes = [it.box for it in items]
        captions = self.describer.describe(images, boxes, GenerateOptions(max_new_tokens=cfg.max_new_tokens))
        described = [c.strip() for c in captions]  # the describer's pseudo captions, before L_sup replaces some
        rng = random.Random(step_seed(cfg.seed, step, "mix"))
        supervised = 0
        if self.supervised and cfg.supervised_ratio > 0:  # L_sup: referring pairs mixed in
            for i in range(len(items)):
                if rng.random() < cfg.supervised_ratio:
                    pair = self.supervised[rng.randrange(len(self.supervised))]
                    images[i], boxes[i], captions[i] = pair.load_image(), pair.box, pair.expression
                    supervised += 1
        prompts = [profile.rec_prompt(c) for c in captions]
        targets = [self.vlm.answer_ids(profile.rec_answer(b, img.size, c)) for img, b, c in zip(images, boxes, captions, strict=True)]
        n_tokens = sum(len(t) for t in targets)

        def loss_of(chunk: list[int]) -> torch.Tensor:  # Eq. 4, mean over the step's answer tokens
            return answer_nll(self.locator, [images[i] for i in chunk], [prompts[i] for i in chunk], [targets[i] for i in chunk], n_tokens)

        loss, norm = self.trainer.update("locator", loss_of, list(range(len(targets))), tokens=n_tokens)
        return {
            "loss": loss,
            "grad_norm": norm,
            # what the locator learned from: its partner's captions (length in words, how many
            # distinct: a describer collapsing to few captions shows here) and L_sup's share
            "caption_words": sum(len(c.split()) for c in described) / len(described),
            "distinct_captions": len(set(described)) / len(described),
            "supervised_share": supervised / len(items),
        }

    # ---- the alternating loop (Sec. 3.2) ------------------------------------------------------
    def phase_at(self, step: int) -> Phase:
        for phase in self.phases:
            if phase.start <= step < phase.start + phase.steps:
                return phase
        raise IndexError(step)

    def step(self, step: int) -> dict:
        phase = self.phase_at(step)
        if step == phase.start and self.cfg.reset_optimizer_on_switch:
            self.trainer.reset_optimizer(phase.role)
        items = self.trainer.shard(self.batch(step))
        self._publish()
        if phase.role == "describer":
            stats = self.describer_step(items)
        else:
            stats = self.locator_step(items, step)
        changed = {phase.role}
        if step == phase.start + phase.steps - 1 and self.cfg.tune == "both":
            other = "locator" if phase.role == "describer" else "describer"
            self.adapters.copy(phase.role, other)  # parameter synchronisation
            changed.add(other)
        if self.engine is not None:
            self._stale |= changed
        return {"phase": phase.index, "role": phase.role, **stats}

    def run(self, work_dir: Path, progress: Callable[[dict], None] | None = None) -> dict:
        summary = self.trainer.run(work_dir, self.step, progress)
        self.adapters.use(self.final_role, trainable=False)
        return summary

    @property
    def final_role(self) -> str:
        """The role whose adapter is the tuned model: the last one trained (equal to the other
        after a sync), or the only one trained in an ablation."""
        return self.phases[-1].role
