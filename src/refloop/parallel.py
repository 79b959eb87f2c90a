"""Process-group helpers every layer may need when `accelerate launch` runs several processes:
whether a module's weights are sharded (FSDP2), whether generation must step in lockstep, and
the largest of a number over processes. The sharding itself is `refloop.training.distributed`."""

from __future__ import annotations

import logging
import os

import torch
from accelerate import PartialState


def is_main_process() -> bool:
    """Whether this is the main process, without creating accelerate's process state: a bare
    PartialState() made before a recipe sets up its CPU state becomes the process-wide singleton
    (on a machine without CUDA: one process, every rank the main one). Before any state exists,
    the launcher's RANK says."""
    from accelerate.state import PartialState as State

    if State._shared_state:
        return State().is_main_process
    return int(os.environ.get("RANK", "0")) == 0


def sharded(module: torch.nn.Module) -> bool:
    """Whether `module` (or the model inside a PEFT wrapper) is an FSDP2 module."""
    from torch.distributed.fsdp import FSDPModule

    inner = getattr(getattr(module, "base_model", None), "model", module)
    return isinstance(module, FSDPModule) or isinstance(inner, FSDPModule)


def synced_generation(module: torch.nn.Module) -> bool:
    """Whether generate() must keep stepping until every process is done (sharded weights)."""
    return sharded(module) and PartialState().num_processes > 1


def max_over_processes(value: int) -> int:
    """The largest `value` of all processes (every process must call it)."""
    t = torch.tensor([value], dtype=torch.long, device=PartialState().device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


_BEFORE_END: list = []  # weak references to callables run before the process group ends


def before_process_group_ends(method) -> None:
    """Run bound `method` (held weakly) before `end_process_group` destroys the process group: an
    engine holding groups of its own (vLLM) shuts them down while they are still valid."""
    import weakref

    _BEFORE_END.append(weakref.WeakMethod(method))


def end_process_group() -> None:
    """Destroy the default process group, if one was set up, once a run has finished. Left to the
    interpreter's exit, gloo's worker threads can outlive it and abort the process (SIGABRT,
    "terminate called without an active exception"; pytorch/pytorch#190489). Call it after success
    only: after an error, other processes may still wait in a collective."""
    while _BEFORE_END:
        method = _BEFORE_END.pop()()
        if method is not None:
            method()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception as exc:  # the run's work is done and saved: a failed shutdown is only reported
            logging.getLogger(__name__).warning(f"ending the process group failed: {exc!r}")
