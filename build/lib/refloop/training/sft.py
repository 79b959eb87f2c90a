"""Supervised fine-tuning of one named adapter on (image, prompt, answer) examples, the outer step
shared by Pink's instruction tuning (Sec. 3.1-3.2) and SVP's adaptation (Eq. 7). The loss is
the answer tokens' NLL; batches walk seeded permutations of the data (epochs), so a run is a
pure function of (seed, step) and resumes exactly."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from refloop.data.records import InstructionExample
from refloop.limits import BatchSize, SafeName, Seed
from refloop.models.hf import HFVLM
from refloop.seeding import step_seed
from refloop.training.adapters import REFERENCE, LoraSettings, NamedAdapters
from refloop.training.losses import answer_nll
from refloop.training.schedules import warmup_cosine
from refloop.training.trainer import Trainer


class SFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: float = Field(1.0, gt=0, description="passes over the examples (SVP: one epoch)")
    batch_size: BatchSize = Field(16, description="examples per optimizer step")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (the peak, with a schedule)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant: lr throughout (after any warm-up); cosine: decays to 0 over the run (SVP Table 11)"
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of the steps over which the rate rises linearly to lr")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="max gradient norm")
    micro_batch_size: BatchSize | None = Field(None, description="examples per forward+backward (gradients accumulate)")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="adapter settings")
    adapter: SafeName = Field("sft", description="name of the trained adapter")
    seed: Seed = Field(0, description="seed of adapter init and data order")
    checkpoint_every: int = Field(50, ge=1, description="steps between resumable checkpoints")
    generation_batch_size: BatchSize = Field(32, description="sequences per forward batch")

    @field_validator("adapter")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == REFERENCE:
            raise ValueError(f"{REFERENCE!r} is reserved for the frozen reference adapter")
        return value

    @model_serializer(mode="wrap")
    def _schedule_only_when_set(self, dump):
        """The schedule fields came after runs were recorded: left out of the dump (and so of what
        identifies a run) when they are this class's default and that default is the behaviour
        before them, a constant rate without warm-up, so earlier outputs and checkpoints still match."""
        data = dump(self)
        for name, before in _SCHEDULE_BEFORE.items():
            if getattr(self, name) == type(self).model_fields[name].default == before:
                data.pop(name, None)
        return data


# What the SFT did before its schedule fields existed.
_SCHEDULE_BEFORE = {"lr_schedule": "constant", "warmup_ratio": 0.0}


def epoch_order(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Step `step`'s example indices: consecutive slices of seeded permutations, one per epoch."""
    first, last = step * batch_size, (step + 1) * batch_size
    out = []
    for epoch in range(first // num_examples, (last - 1) // num_examples + 1):
        perm = list(range(num_examples))
        random.Random(step_seed(seed, epoch, "batch")).shuffle(perm)
        lo, hi = max(first - epoch * num_examples, 0), min(last - epoch * num_examples, num_examples)
        out += perm[lo:hi]
    return out


class SFT:
    """One adapter on the base, trained by answer-token NLL on the shared trainer."""

    def __init__(
        self, vlm: HFVLM, cfg: SFTConfig, examples: list[InstructionExample], trainable_tokens: dict[str, list[int]] | None = None
    ) -> None:
        """`trainable_tokens`: embedding rows (by module name) the adapter trains too, e.g. the
        rows of words added to the vocabulary (see NamedAdapters)."""
        if not examples:
            raise ValueError("SFT needs at least one example")
        self.cfg, self.examples = cfg, examples
        torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn at random: same seed, same start
        self.adapters = NamedAdapters(vlm.model, cfg.lora, [cfg.adapter], trainable_tokens=trainable_tokens)
        self.vlm = vlm.with_module(self.adapters.module, batch_size=cfg.generation_batch_size)
        self.policy = self.adapters.view(self.vlm, cfg.adapter)
        self.total_steps = max(1, round(cfg.epochs * len(examples) / cfg.batch_size))
        self.warmup_steps = math.ceil(cfg.warmup_ratio * self.total_steps)
        self.trainer = Trainer(
            self.adapters,
            config=cfg.model_dump(mode="json") | {"examples": len(examples)},
            total_steps=self.total_steps,
            seed=cfg.seed,
            checkpoint_every=cfg.checkpoint_every,
            grad_clip=cfg.grad_clip,
            micro_batch_size=cfg.micro_batch_size,
            device=self.vlm.device,
        )
        self.trainer.add_optimizer(
            cfg.adapter, self.adapters.parameters(cfg.adapter), lambda ps: torch.optim.AdamW(ps, lr=cfg.lr, weight_decay=cfg.weight_decay)
        )

    def lr_at(self, step: int) -> float:
        """The step's learning rate: a pure function of the step, so resumed runs match."""
        if self.cfg.lr_schedule == "cosine":
            return warmup_cosine(step, self.cfg.lr, self.warmup_steps, self.total_steps)
        return self.cfg.lr * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else self.cfg.lr

    def step(self, step: int) -> dict:
        for group in self.trainer.optimizer(self.cfg.adapter).param_groups:
            group["lr"] = self.lr_at(step)
        batch = self.trainer.shard([self.examples[i] for i in epoch_order(len(self.examples), self.cfg.batch_size, step, self.cfg.seed)])
        images = [ex.load_image() for ex in batch]
        prompts = [ex.prompt for ex in batch]
        targets = [self.vlm.answer_ids(ex.answer) for ex in batch]
        n_tokens = sum(len(t) for t in targets)

        def loss_of(chunk: list[int]) -> torch.Tensor:
            return answer_nll(self.policy, [images[i] for i in chunk], [prompts[i] for i in chunk], [targets[i] for i in chunk], n_tokens)

        loss, norm = self.trainer.update(self.cfg.adapter, loss_of, list(range(len(batch))), tokens=n_tokens)
        return {"loss": loss, "grad_norm": norm, "answer_tokens": n_tokens}

    def run(self, work_dir: Path, progress: Callable[[dict], None] | None = None) -> dict:
        summary = self.trainer.run(work_dir, self.step, progress)
        self.adapters.use(self.cfg.adapter, trainable=False)
        return summary
