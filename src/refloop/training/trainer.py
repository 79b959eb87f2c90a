"""The one training loop every method runs on (SC-Tune's phases, SFT, refloop-tiny's pretraining).

A method supplies `step_fn(step) -> stats`; inside it, `Trainer.update` takes one optimizer
step. The trainer owns what every method needs the same way:
- each step is a pure function of (seed, step): batches and sampling draw from `step_seed`,
  and torch's generator is reseeded before every step, so a killed run resumes exactly;
- atomic checkpoints of the trained tensors, the optimizers and the step; resume refuses a
  work directory that holds a run of another config;
- `metrics.jsonl`, one row per step: the method's stats plus learning rate, step seconds,
  tokens/s and peak memory; the same rows and the config go to a tracker (TensorBoard, wandb,
  Trackio) when `track` names one (`refloop.training.trackers`);
- data parallel under `accelerate launch`: every process takes its shard of the step's batch
  and gradients are averaged after each backward pass. Done explicitly (not DDP's wrapper)
  because adapter switches change which tensors require grad. With an FSDP config the weights
  are sharded by accelerate's FSDP2 (`refloop.training.distributed`), which reduce-scatters the
  gradients itself; checkpoints then hold whole tensors gathered from every process, so a run
  resumes on any number of processes;
- micro-batches: an update back-propagates chunk by chunk with accumulated gradients, so
  activation memory scales with the micro-batch, not the batch.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from accelerate import PartialState
from safetensors.torch import load_file, save_file

from refloop.data.jsonl import JsonlWriter
from refloop.errors import RefloopError
from refloop.runs import run_directory
from refloop.seeding import step_seed
from refloop.training import distributed
from refloop.training.checkpoint import latest_checkpoint, save_checkpoint, truncate_log
from refloop.training.trackers import RunTracker, Tracking


class Stateful(Protocol):
    """What the trainer checkpoints: a model, or a set of adapters."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> object: ...


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA's allocator peak on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class Trainer:
    """Step loop, checkpoints, resume, metrics, gradient averaging and micro-batches."""

    def __init__(
        self,
        weights: Stateful,
        config: dict,
        total_steps: int,
        seed: int = 0,
        checkpoint_every: int = 25,
        grad_clip: float | None = 1.0,
        micro_batch_size: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.weights, self.config = weights, config
        self.total_steps, self.seed, self.checkpoint_every = total_steps, seed, checkpoint_every
        self.grad_clip, self.micro_batch_size = grad_clip, micro_batch_size
        self.device = torch.device(device)
        self.state = PartialState(cpu=self.device.type == "cpu")
        self._factories: dict[str, Callable[[], torch.optim.Optimizer]] = {}
        self._params: dict[str, list[torch.nn.Parameter]] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._step_lr: float | None = None
        self._step_tokens = 0
        self.tracking = Tracking()
        self.sharded = bool(getattr(weights, "sharded", False))  # FSDP2 weights (DTensors)

    def track(self, tracking: Tracking) -> None:
        """Report every metrics row and `tracking.config` to `tracking.report_to` (main process)."""
        self.tracking = tracking

    @property
    def rank(self) -> int:
        return self.state.process_index

    @property
    def world_size(self) -> int:
        return self.state.num_processes

    def shard(self, items: list) -> list:
        """This process's share of a step's batch."""
        return items[self.rank :: self.world_size]

    # ---- optimizers -----------------------------------------------------------------------
    def add_optimizer(self, name: str, params: list[torch.nn.Parameter], factory: Callable[[list], torch.optim.Optimizer]) -> None:
        """Register optimizer `name` over `params`; it is built on first use (and after a reset)."""
        self._params[name] = params
        self._factories[name] = lambda: factory(params)

    def optimizer(self, name: str) -> torch.optim.Optimizer:
        if name not in self.optimizers:
            self.optimizers[name] = self._factories[name]()
        return self.optimizers[name]

    def reset_optimizer(self, name: str) -> None:
        """Fresh optimizer state (SC-Tune's release clears Adam at every phase switch)."""
        self.optimizers.pop(name, None)

    def update(self, name: str, loss_of: Callable[[list[int]], torch.Tensor], rows: list[int], tokens: int = 0) -> tuple[float, float]:
        """One optimizer step of `name` over `rows`. `loss_of(chunk)` returns that micro-batch's
        share of the loss (normalised by the whole minibatch), back-propagated chunk by chunk;
        gradients are averaged across processes, clipped, applied. Returns (loss, grad norm)."""
        opt = self.optimizer(name)
        params = self._params[name]
        opt.zero_grad(set_to_none=True)
        size = self.micro_batch_size or len(rows)
        total = 0.0
        for start in range(0, len(rows), size):
            loss = loss_of(rows[start : start + size])
            loss.backward()
            total += loss.item()
        if self.world_size > 1 and not self.sharded:  # FSDP2 has reduce-scattered and averaged them
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                p.grad /= self.world_size
        if self.grad_clip is not None:
            norm = float(distributed.full(torch.nn.utils.clip_grad_norm_(params, self.grad_clip)))
        else:
            norm = float(distributed.full(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))))
        opt.step()
        self._step_lr = opt.param_groups[0]["lr"]
        self._step_tokens += tokens
        return total, norm

    # ---- the loop -------------------------------------------------------------------------
    def run(self, work_dir: Path, step_fn: Callable[[int], dict], progress: Callable[[dict], None] | None = None) -> dict:
        """Run (or resume from `work_dir`) steps until `total_steps`; returns {steps, train_seconds,
        resumed_from_step}: the training seconds of every step the run kept, over all of its
        invocations, and the step this invocation started at (0 for a fresh run)."""
        if self.state.is_main_process:
            # one writer at a time, in a directory of its own; the checkpoint holds the config check
            with run_directory(work_dir, {"task": "training"}):
                return self._run(Path(work_dir), step_fn, progress)
        return self._run(Path(work_dir), step_fn, progress)

    def _run(self, work_dir: Path, step_fn: Callable[[int], dict], progress: Callable[[dict], None] | None) -> dict:
        work_dir.mkdir(parents=True, exist_ok=True)
        start, elapsed = self._resume(work_dir)
        if start and self.state.is_main_process:
            done = "every step done already" if start >= self.total_steps else f"resuming at step {start} of {self.total_steps}"
            logging.getLogger("refloop.training").info(f"{work_dir}: {done} (an earlier run of the same command)")
        log_path = work_dir / "metrics.jsonl"
        if self.state.is_main_process:
            truncate_log(log_path, start)
        self.state.wait_for_everyone()
        tracker = RunTracker(self.tracking, work_dir, start) if self.tracking.enabled and self.state.is_main_process else None
        try:
            elapsed = self._steps(work_dir, step_fn, progress, log_path, start, elapsed, tracker)
        finally:
            if tracker is not None:
                tracker.finish()  # a failed step too: the event files are closed and flushed
        return {"steps": self.total_steps, "train_seconds": elapsed, "resumed_from_step": start}

    def _steps(self, work_dir: Path, step_fn, progress, log_path: Path, start: int, elapsed: float, tracker: RunTracker | None) -> float:
        """Steps `start`..`total_steps`; returns the run's training seconds."""
        with JsonlWriter(log_path, key="step") as log:
            for step in range(start, self.total_steps):
                t0 = time.perf_counter()
                torch.manual_seed(step_seed(self.seed, step, "torch", self.rank))
                self._step_lr, self._step_tokens = None, 0
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                stats = self._mean_over_processes(step_fn(step))
                seconds = time.perf_counter() - t0
                elapsed += seconds
                row = {"step": step + 1, **{k: round(v, 5) if isinstance(v, float) else v for k, v in stats.items()}}
                if self._step_lr is not None:
                    row["lr"] = self._step_lr
                row |= {
                    "step_seconds": round(seconds, 3),
                    "tokens_per_s": round(self._step_tokens * self.world_size / seconds, 1),
                    "peak_memory_mb": round(peak_memory_mb(self.device), 1),
                    "elapsed_s": round(elapsed, 2),
                }
                if self.state.is_main_process:
                    log.write_many([row])
                    if tracker is not None:
                        tracker.log(row)
                if (step + 1) % self.checkpoint_every == 0 or step + 1 == self.total_steps:
                    self._checkpoint(work_dir, step + 1, elapsed)
                    self.state.wait_for_everyone()
                if progress and self.state.is_main_process:
                    progress(row)
        return elapsed

    def _mean_over_processes(self, stats: dict) -> dict:
        numeric = sorted(k for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        if self.world_size == 1 or not numeric:
            return stats
        values = torch.tensor([float(stats[k]) for k in numeric], dtype=torch.float64, device=self.state.device)  # NCCL: on the GPU
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
        means = dict(zip(numeric, (values / self.world_size).tolist(), strict=True))
        # Integers that agree on every process (the phase index) stay integers.
        return stats | {k: int(v) if isinstance(stats[k], int) and v == int(v) else v for k, v in means.items()}

    # ---- checkpoints ----------------------------------------------------------------------
    def _checkpoint(self, work_dir: Path, step: int, elapsed: float) -> None:
        """Every process calls this (sharded tensors are gathered, a collective); the main one writes."""
        if not (self.sharded or self.state.is_main_process):
            return
        weights = {k: v.contiguous() for k, v in self.weights.state_dict().items()}
        if self.sharded:
            optimizers = {name: distributed.full_optimizer_state(opt) for name, opt in self.optimizers.items()}
        else:
            optimizers = {name: opt.state_dict() for name, opt in self.optimizers.items()}
        if not self.state.is_main_process:
            return

        def write(directory: Path) -> None:
            save_file(weights, str(directory / "weights.safetensors"))
            torch.save(optimizers, directory / "optimizers.pt")

        save_checkpoint(work_dir, {"step": step, "elapsed": elapsed, "config": self.config}, write)

    def _resume(self, work_dir: Path) -> tuple[int, float]:
        found = latest_checkpoint(work_dir)
        if found is None:
            return 0, 0.0
        directory, state = found
        if state["config"] != self.config:
            raise RefloopError(f"{work_dir} holds a run with another config; resume with the same config or use a fresh output directory")
        self.weights.load_state_dict(load_file(str(directory / "weights.safetensors")))
        for name, opt_state in torch.load(directory / "optimizers.pt", weights_only=True).items():
            if self.sharded:
                distributed.load_full_optimizer_state(self.optimizer(name), opt_state)
            else:
                self.optimizer(name).load_state_dict(opt_state)
        return state["step"], state["elapsed"]
