"""Sharded training through accelerate's FSDP2 (`accelerate launch --config_file configs/accelerate/...`).

refloop does not shard models itself: when `accelerate launch` runs with an FSDP config, the
model that carries the LoRA adapters is prepared by accelerate's own FSDP2 code
(`fsdp2_prepare_model`: its auto-wrap policy, reshard-after-forward, CPU offload, mixed
precision), so every parameter, frozen or not, is a DTensor sharded across the processes.
What the rest of refloop needs on top, and only here:

- gradients: FSDP2 reduce-scatters (and averages) the gradients of the parameters that have
  one, so the trainer's explicit all-reduce is skipped. Adapter switches only flip
  `requires_grad` on the sharded parameters; FSDP2 copies that flag to the gathered parameter
  at every unshard, so only the active adapter gets gradients (tested).
- generation: every process must run the same number of forward passes, so `generate` runs
  with `synced_gpus` (transformers keeps finished processes stepping until all are done) and the
  number of generate calls is made equal across processes;
- checkpoints stay world-size independent: adapter tensors and optimizer states are gathered
  to full tensors on every process (a collective), the main process writes them, and a resume
  slices them back to each process's shard.

FSDP1 (`fsdp_version: 1`) wraps the model in another module whose `generate` only works after
gathering every weight; refloop refuses it with a message. DeepSpeed: see `check_engine`.
"""

from __future__ import annotations

import os

import torch
from accelerate import PartialState

from refloop.errors import RefloopError
from refloop.parallel import max_over_processes, sharded, synced_generation  # noqa: F401  (this module's API too)

_TRUE = {"1", "true", "yes"}


def engine() -> str | None:
    """'fsdp' or 'deepspeed' when `accelerate launch` was given such a config, else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE:
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE:
        return "deepspeed"
    return None


def check_engine() -> None:
    """Refuse launch configurations refloop cannot honour, before any weight is loaded."""
    found = engine()
    if found == "fsdp":
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise RefloopError(
                f"FSDP version {version} is not supported: refloop generates during training (rollouts), which FSDP1's "
                "wrapper cannot do without gathering every weight; set `fsdp_version: 2` in the accelerate config "
                "(configs/accelerate/fsdp2-8gpu.yaml)"
            )
    elif found == "deepspeed":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
        raise RefloopError(
            f"DeepSpeed (ZeRO stage {stage or '?'}) cannot train refloop's named adapters: one DeepSpeed engine owns one "
            "optimizer over a parameter set fixed at initialisation, while SC-Tune switches which adapter trains at every "
            "phase. Use the FSDP2 config (configs/accelerate/fsdp2-8gpu.yaml): FULL_SHARD shards parameters, gradients "
            "and optimizer states like ZeRO-3, SHARD_GRAD_OP like ZeRO-2 (README 'Scaling out')"
        )


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """`model` prepared by accelerate's FSDP2 when launched with an FSDP config; unchanged otherwise.
    Call it after the adapters are injected and before any optimizer exists."""
    if engine() is None:
        return model
    check_engine()
    from accelerate import Accelerator
    from accelerate.utils import fsdp2_prepare_model

    accelerator = Accelerator()
    if getattr(accelerator.state, "fsdp_plugin", None) is None:
        # accelerate turns FSDP on for accelerator devices only; on CPU processes (gloo, how the
        # tests run it) the plugin is read from the same launch config and handed to the same code.
        from accelerate.utils import FullyShardedDataParallelPlugin

        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    return fsdp2_prepare_model(accelerator, model)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective: every process must call it)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) cut to `target`'s sharding when `target` is a DTensor; no communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(target, DTensor):
        return value
    return distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """`opt.state_dict()` with every sharded state tensor gathered (collective)."""
    state = opt.state_dict()
    state["state"] = {i: {k: full(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()} for i, s in state["state"].items()}
    return state


def load_full_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a `full_optimizer_state` into `opt`, cutting each tensor to its parameter's shard."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state = dict(state)
    state["state"] = {
        i: {k: like(v, params[int(i)]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in s.items()}
        for i, s in state["state"].items()
    }
    opt.load_state_dict(state)


def unsharded_model(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded) instance of `module`'s model class and config, in the dtype of its
    gathered weights `state`; the caller loads `state` into it once its adapters are injected."""
    from torch.distributed.fsdp import FSDPModule
    from transformers.initialization import no_init_weights

    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))  # FSDP2 subclasses in place
    floating = [v.dtype for v in state.values() if v.is_floating_point()]
    dtype = max(set(floating), key=floating.count) if floating else torch.float32  # the base weights' dtype
    with no_init_weights():
        model = cls(module.config)
    return model.to(dtype=dtype, device=PartialState().device).eval()
