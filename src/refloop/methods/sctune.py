"""SC-Tune: Self-Consistency Tuning (paper 000, Sec. 3 and 4.1).

One base model, two roles as LoRA adapters. Phases alternate (Sec. 3.2):
- describer phase, H_d steps: sample captions for boxes, the frozen locator re-locates them
  greedily, reward = IoU at the last token minus a token-level KL penalty to the reference
  (Eq. 2); value-free advantage = return-to-go minus a baseline's reward (Eq. 3); PPO clipped
  loss (Eq. 1), several epochs over the batch.
- locator phase, H_l steps: the frozen describer writes greedy captions; the locator learns by
  MLE to write the ground-truth box for them (Eq. 4), optionally mixed with supervised pairs.
- after each phase the trained role's adapter is copied onto the other (parameter sync).
Every step's batch and sampling are a pure function of (seed, step), so a killed run resumes
exactly from its last checkpoint. Under `accelerate launch` each process takes its shard of the
step's batch and gradients are averaged across processes after every backward pass (data
parallel; done explicitly because role switches change which tensors require grad, which DDP's
wrapper fixes at construction).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from accelerate import PartialState
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from refloop.boxes import Box, paired_iou
from refloop.data.jsonl import JsonlWriter
from refloop.errors import RefloopError
from refloop.models.base import GenerateOptions
from refloop.models.hf import HFVLM
from refloop.training.checkpoint import latest_checkpoint, save_checkpoint, truncate_log
from refloop.training.ppo import clipped_policy_loss, pad_rows, token_rewards, value_free_advantages
from refloop.training.roles import LoraSettings, RoleModel

Role = Literal["describer", "locator"]


class SCTuneConfig(BaseModel):
    """Defaults are the paper's (Sec. 4.1) and the authors' release where the paper is silent."""

    model_config = ConfigDict(extra="forbid")

    # Schedule (Sec. 3.2, 4.1)
    phases: int = Field(6, description="number of phases; they alternate describer/locator")
    first_phase: Role = Field("describer", description="role trained in the first phase")
    describer_steps: int = Field(200, description="H for describer phases (paper 200)")
    locator_steps: int = Field(200, description="H for locator phases (paper 200, authors' release 100)")
    tune: Literal["both", "describer", "locator"] = Field(
        "both", description="both = SC-Tune; describer/locator = Table 8 ablations (only that role, every phase, no sync)"
    )
    batch_size: int = Field(128, description="boxes per step")
    # Optimisation
    describer_lr: float = Field(5e-7, description="describer learning rate (paper, 7B models)")
    locator_lr: float = Field(1e-6, description="locator learning rate (paper, 7B models)")
    weight_decay: float = Field(0.1, description="AdamW weight decay")
    grad_clip: float = Field(1.0, description="max gradient norm")
    reset_optimizer_on_switch: bool = Field(True, description="fresh AdamW state at each phase (authors' release)")
    # Describer PPO (Eq. 1-3)
    kl_coef: float = Field(0.01, description="beta of the token-level KL penalty (Eq. 2)")
    clip_eps: float = Field(0.2, description="PPO clip epsilon (Eq. 1)")
    ppo_epochs: int = Field(2, description="PPO epochs over each rollout batch")
    minibatches: int = Field(1, description="minibatches per PPO epoch")
    baseline: Literal["reference", "greedy", "group"] = Field(
        "reference", description="reference: pi_ref's greedy caption (paper); greedy: current policy's; group: mean of K samples"
    )
    group_size: int = Field(4, description="samples per box with baseline=group")
    temperature: float = Field(1.0, description="sampling temperature")
    top_k: int = Field(100, description="sampling top-k (authors' release)")
    top_p: float = Field(0.3, description="sampling top-p (authors' release)")
    max_new_tokens: int = Field(30, description="longest sampled caption (authors' release)")
    # Locator (Eq. 4)
    supervised_ratio: float = Field(0.0, description="fraction of locator samples taken from supervised referring data (L_sup)")
    # Roles
    lora: LoraSettings = Field(default_factory=LoraSettings, description="adapter settings")
    reference: Literal["base", "snapshot"] = Field("base", description="reference policy: base with adapters off, or a frozen snapshot")
    # Bookkeeping
    seed: int = Field(0, description="seed of batches and sampling")
    checkpoint_every: int = Field(25, description="steps between resumable checkpoints")
    generation_batch_size: int = Field(64, description="sequences per generation/forward batch")
    micro_batch_size: int | None = Field(
        None,
        description="sequences per forward+backward of an update; gradients accumulate to the full minibatch's, "
        "so activation memory scales with this instead of the batch (None: the whole minibatch at once)",
    )


@dataclass(frozen=True)
class BoxItem:
    """One training box: an image and a box on it (no text needed)."""

    image_path: str
    box: Box
    image: Image.Image | None = None


@lru_cache(maxsize=8192)
def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def load_image(item: BoxItem) -> Image.Image:
    return item.image if item.image is not None else _load_rgb(item.image_path)


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


class SCTune:
    """The training loop. `vlm` must wrap the RoleModel's module (see `from_base`)."""

    def __init__(
        self, roles: RoleModel, vlm: HFVLM, cfg: SCTuneConfig, train: list[BoxItem], supervised: list[tuple[BoxItem, str]] | None = None
    ) -> None:
        if not train:
            raise ValueError("SC-Tune needs at least one training box")
        self.roles, self.vlm, self.cfg, self.train = roles, vlm, cfg, train
        self.supervised = supervised or []
        self.phases = schedule(cfg)
        self.total_steps = sum(p.steps for p in self.phases)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.tokenizer = vlm.tokenizer
        self.state = PartialState(cpu=vlm.device.type == "cpu")
        if cfg.batch_size % self.state.num_processes:
            raise RefloopError(f"batch_size {cfg.batch_size} is not divisible by {self.state.num_processes} processes")

    @classmethod
    def from_base(cls, vlm: HFVLM, cfg: SCTuneConfig, train: list[BoxItem], supervised=None) -> SCTune:
        torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn at random: same seed, same start
        roles = RoleModel(vlm.model, cfg.lora, reference=cfg.reference)
        tuned = HFVLM(roles.module, vlm.processor, vlm.profile, name=vlm.name, batch_size=cfg.generation_batch_size)
        return cls(roles, tuned, cfg, train, supervised)

    # ---- helpers -----------------------------------------------------------------------------
    def _optimizer(self, role: str) -> torch.optim.Optimizer:
        if role not in self.optimizers:
            lr = self.cfg.describer_lr if role == "describer" else self.cfg.locator_lr
            self.optimizers[role] = torch.optim.AdamW(self.roles.parameters(role), lr=lr, weight_decay=self.cfg.weight_decay)
        return self.optimizers[role]

    def _batch(self, step: int) -> list[BoxItem]:
        rng = random.Random(self.cfg.seed * 1_000_003 + step)
        return [self.train[rng.randrange(len(self.train))] for _ in range(self.cfg.batch_size)]

    def _locate_iou(self, images, captions: list[str], boxes: list[Box]) -> tuple[torch.Tensor, int]:
        """The frozen locator re-locates captions greedily; IoU with the input boxes (0 if unparseable)."""
        self.roles.use("locator", trainable=False)
        located = self.vlm.locate(images, captions)
        failures = sum(loc.box is None for loc in located)
        return torch.tensor(paired_iou([loc.box for loc in located], boxes), dtype=torch.float32), failures

    def _micro_batches(self, rows: list[int]) -> list[list[int]]:
        size = self.cfg.micro_batch_size or len(rows)
        return [rows[i : i + size] for i in range(0, len(rows), size)]

    def _step_update(self, role: str, loss_of: Callable[[list[int]], torch.Tensor], rows: list[int]) -> tuple[float, float]:
        """One optimizer step on `rows`: `loss_of(chunk)` is that micro-batch's share of the loss
        (normalised by the whole minibatch), back-propagated chunk by chunk. Returns (loss, grad norm)."""
        opt = self._optimizer(role)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for chunk in self._micro_batches(rows):
            loss = loss_of(chunk)
            loss.backward()
            total += loss.item()
        if self.state.num_processes > 1:
            for p in self.roles.parameters(role):
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                p.grad /= self.state.num_processes
        norm = torch.nn.utils.clip_grad_norm_(self.roles.parameters(role), self.cfg.grad_clip)
        opt.step()
        return total, float(norm)

    # ---- describer phase (Eq. 1-3) ----------------------------------------------------------
    def describer_step(self, items: list[BoxItem]) -> dict:
        cfg, vlm, profile = self.cfg, self.vlm, self.vlm.profile
        k = cfg.group_size if cfg.baseline == "group" else 1
        images = [load_image(it) for it in items]
        boxes = [it.box for it in items]
        prompts = [profile.reg_prompt(b, img.size) for img, b in zip(images, boxes)]
        sampling = GenerateOptions(
            do_sample=True,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            num_return_sequences=k,
        )
        t0 = time.perf_counter()
        self.roles.use("describer", trainable=False)
        groups = vlm.generate(images, prompts, sampling)
        samples = [c for g in groups for c in g]
        r_images = [img for img in images for _ in range(k)]
        r_boxes = [b for b in boxes for _ in range(k)]
        r_prompts = [p for p in prompts for _ in range(k)]
        captions = [profile.read_expression(c.text) for c in samples]
        iou, failures = self._locate_iou(r_images, captions, r_boxes)
        # Baseline reward R(c*, s*) of Eq. 3.
        if cfg.baseline == "group":
            baseline = iou.view(-1, k).mean(dim=1).repeat_interleave(k)
        else:
            if cfg.baseline == "reference":
                with self.roles.reference():
                    greedy = vlm.describe(images, boxes, GenerateOptions(max_new_tokens=cfg.max_new_tokens))
            else:
                self.roles.use("describer", trainable=False)
                greedy = vlm.describe(images, boxes, GenerateOptions(max_new_tokens=cfg.max_new_tokens))
            baseline, _ = self._locate_iou(images, greedy, boxes)
        rollout_seconds = time.perf_counter() - t0
        # Old and reference log-probs from the same masked forward pass used for the new ones.
        ids = [list(c.token_ids) for c in samples]
        self.roles.use("describer", trainable=False)
        logp_old, mask = pad_rows(vlm.logprobs(r_images, r_prompts, ids))
        with self.roles.reference():
            logp_ref, _ = pad_rows(vlm.logprobs(r_images, r_prompts, ids))
        rewards = token_rewards(logp_old, logp_ref, mask, iou, cfg.kl_coef)  # Eq. 2
        advantages = value_free_advantages(rewards, mask, baseline)  # Eq. 3
        # PPO epochs over minibatches (Eq. 1).
        self.roles.use("describer", trainable=True)
        stats = {"approx_kl": 0.0, "clipfrac": 0.0, "loss": 0.0, "grad_norm": 0.0}
        updates = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(ids))  # seeded per step by run()
            for mb in order.chunk(cfg.minibatches):
                rows = mb.tolist()
                n_tokens = mask[rows].sum().clamp(min=1)

                def loss_of(chunk: list[int], n_tokens: torch.Tensor = n_tokens) -> torch.Tensor:
                    logp_new, _ = pad_rows(
                        vlm.logprobs([r_images[i] for i in chunk], [r_prompts[i] for i in chunk], [ids[i] for i in chunk], grad=True)
                    )
                    width = logp_new.shape[1]
                    loss, chunk_stats = clipped_policy_loss(
                        logp_new, logp_old[chunk, :width], advantages[chunk, :width], mask[chunk, :width], cfg.clip_eps, n_tokens
                    )
                    stats["approx_kl"] += chunk_stats["approx_kl"]
                    stats["clipfrac"] += chunk_stats["clipfrac"]
                    return loss

                loss_value, norm = self._step_update("describer", loss_of, rows)
                stats["grad_norm"] += norm
                stats["loss"] += loss_value
                updates += 1
        self.roles.use("describer", trainable=False)
        n_tok = mask.sum().clamp(min=1)
        return {
            "reward": float(iou.mean()),
            "baseline_reward": float(baseline.mean()),
            "consistency": float((iou > 0.5).float().mean()),
            "kl_to_reference": float(((logp_old - logp_ref) * mask).sum() / n_tok),
            "advantage": float((advantages * mask).sum() / n_tok),
            "parse_failure_rate": failures / len(ids),
            "caption_tokens": float(mask.sum(1).mean()),
            "captions_per_second": len(ids) / rollout_seconds,
            **{key: v / updates for key, v in stats.items()},
        }

    # ---- locator phase (Eq. 4) --------------------------------------------------------------
    def locator_step(self, items: list[BoxItem], step: int) -> dict:
        cfg, vlm, profile = self.cfg, self.vlm, self.vlm.profile
        images = [load_image(it) for it in items]
        boxes = [it.box for it in items]
        self.roles.use("describer", trainable=False)
        captions = vlm.describe(images, boxes, GenerateOptions(max_new_tokens=cfg.max_new_tokens))
        rng = random.Random(cfg.seed * 31 + step)
        if self.supervised and cfg.supervised_ratio > 0:
            for i in range(len(items)):
                if rng.random() < cfg.supervised_ratio:
                    item, expression = self.supervised[rng.randrange(len(self.supervised))]
                    images[i], boxes[i], captions[i] = load_image(item), item.box, expression
        prompts = [profile.rec_prompt(c) for c in captions]
        targets = [vlm.answer_ids(profile.rec_answer(b, img.size, c)) for img, b, c in zip(images, boxes, captions)]
        self.roles.use("locator", trainable=True)
        n_tokens = sum(len(t) for t in targets)

        def loss_of(chunk: list[int]) -> torch.Tensor:
            logp, mask = pad_rows(
                vlm.logprobs([images[i] for i in chunk], [prompts[i] for i in chunk], [targets[i] for i in chunk], grad=True)
            )
            return -(logp * mask).sum() / n_tokens  # Eq. 4, mean over the step's answer tokens

        loss, norm = self._step_update("locator", loss_of, list(range(len(targets))))
        self.roles.use("locator", trainable=False)
        return {"loss": loss, "grad_norm": norm}

    # ---- the alternating loop (Sec. 3.2) ------------------------------------------------------
    def phase_at(self, step: int) -> Phase:
        for phase in self.phases:
            if phase.start <= step < phase.start + phase.steps:
                return phase
        raise IndexError(step)

    def run(self, work_dir: Path, progress: Callable[[dict], None] | None = None) -> dict:
        work_dir.mkdir(parents=True, exist_ok=True)
        start, elapsed = self._resume(work_dir)
        if self.state.is_main_process:
            truncate_log(work_dir / "metrics.jsonl", start)
        self.state.wait_for_everyone()
        t_last = time.perf_counter()
        with JsonlWriter(work_dir / "metrics.jsonl", key="step") as log:
            for step in range(start, self.total_steps):
                phase = self.phase_at(step)
                if step == phase.start and self.cfg.reset_optimizer_on_switch:
                    self.optimizers.pop(phase.role, None)
                torch.manual_seed(self.cfg.seed * 1_000_003 + step + 7919 * self.state.process_index)
                items = self._batch(step)[self.state.process_index :: self.state.num_processes]
                if phase.role == "describer":
                    stats = self.describer_step(items)
                else:
                    stats = self.locator_step(items, step)
                stats = self._mean_over_processes(stats)
                if step == phase.start + phase.steps - 1 and self.cfg.tune == "both":
                    other = "locator" if phase.role == "describer" else "describer"
                    self.roles.copy_adapter(phase.role, other)  # parameter synchronisation
                now = time.perf_counter()
                elapsed += now - t_last
                t_last = now
                row = {
                    "step": step + 1,
                    "phase": phase.index,
                    "role": phase.role,
                    "elapsed_s": round(elapsed, 2),
                    **{k: round(v, 5) for k, v in stats.items()},
                }
                if self.state.is_main_process:
                    log.write_many([row])
                if (step + 1) % self.cfg.checkpoint_every == 0 or step + 1 == self.total_steps:
                    if self.state.is_main_process:
                        self._checkpoint(work_dir, step + 1, elapsed)
                    self.state.wait_for_everyone()
                if progress and self.state.is_main_process:
                    progress(row)
        self.roles.use(self.final_role, trainable=False)
        return {"steps": self.total_steps, "train_seconds": elapsed}

    def _mean_over_processes(self, stats: dict) -> dict:
        if self.state.num_processes == 1:
            return stats
        keys = sorted(stats)
        values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
        return dict(zip(keys, (values / self.state.num_processes).tolist()))

    @property
    def final_role(self) -> str:
        """The role whose adapter is the tuned model: the last one trained (equal to the other
        after a sync), or the only one trained in an ablation."""
        return self.phases[-1].role

    # ---- checkpoints ---------------------------------------------------------------------------
    def _checkpoint(self, work: Path, step: int, elapsed: float) -> None:
        def write(directory: Path) -> None:
            self.roles.save_state(directory / "adapters.safetensors")
            torch.save({role: opt.state_dict() for role, opt in self.optimizers.items()}, directory / "optimizers.pt")

        save_checkpoint(work, {"step": step, "elapsed": elapsed, "config": self.cfg.model_dump()}, write)

    def _resume(self, work: Path) -> tuple[int, float]:
        found = latest_checkpoint(work)
        if found is None:
            return 0, 0.0
        directory, state = found
        if state["config"] != self.cfg.model_dump():
            raise RefloopError(f"{work} holds an SC-Tune run with another config; resume with the same config or a fresh --out")
        self.roles.load_state(directory / "adapters.safetensors")
        for role, opt_state in torch.load(directory / "optimizers.pt", weights_only=True).items():
            self._optimizer(role).load_state_dict(opt_state)
        return state["step"], state["elapsed"]
