"""The one door to torch.distributed collectives in the training path.

Every collective the loop, the stages and the threshold policies issue goes through here (DeepSpeed's own
ZeRO traffic is DeepSpeed's). Each call first places its tensor on the process group's communication
device, derived from the backend: ``cuda:<current>`` for NCCL (NCCL rejects CPU tensors), ``cpu`` for gloo.
Results come back on the caller's device (with NCCL and device tensors, the usual case, nothing moves).

Without an initialised process group every function is the single-process identity.
The pure packages (``ssl/``, ``tasks/``) never import this module: the stage hands them
:func:`all_reduce_sum` as their ``all_reduce`` callable.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

__all__ = ["comm_device", "all_reduce_sum", "all_reduce_max", "all_reduce_mean", "sum_ints", "barrier",
           "is_distributed", "world_size", "install_guard", "maybe_install_guard", "CommGuardError"]

GUARD_ENV = "SSFER_COMM_GUARD"   # test-only: "1" makes the worker install :func:`install_guard`
_placed_hook = None              # set by the guard: sees every tensor this module hands to torch.distributed


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def comm_device(backend: Optional[str] = None) -> torch.device:
    """The device collectives of the default process group run on: the current CUDA device for NCCL
    (and other accelerator backends), the CPU for gloo / mpi. ``backend`` overrides the group's (tests)."""
    if backend is None:
        backend = str(dist.get_backend()) if is_distributed() else "gloo"
    backend = backend.lower()
    if backend in ("gloo", "mpi"):
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    # "cpu:gloo,cuda:nccl" style multi-device backends: prefer the accelerator when this process has one
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _place(t: torch.Tensor) -> torch.Tensor:
    dev = comm_device()
    out = t if t.device == dev else t.to(dev)
    if _placed_hook is not None:
        _placed_hook(out, dev)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all ranks, on ``t``'s device. In place when ``t`` already lives on the
    communication device (then the returned tensor is ``t``)."""
    if not is_distributed():
        return t
    c = _place(t)
    dist.all_reduce(c, op=dist.ReduceOp.SUM)
    return t if c is t else t.copy_(c)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``t`` over all ranks, on ``t``'s device (in place like
    :func:`all_reduce_sum`). Every element of the result is a value some rank held: FlexMatch records
    one rank's pseudo-label per sample this way (``-1`` = no label), never a blend of two."""
    if not is_distributed():
        return t
    c = _place(t)
    dist.all_reduce(c, op=dist.ReduceOp.MAX)
    return t if c is t else t.copy_(c)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over all ranks (a sum divided by the world size), on ``t``'s device."""
    if not is_distributed():
        return t
    return all_reduce_sum(t) / world_size()


def sum_ints(values: List[int]) -> List[int]:
    """Sum host integers (e.g. the loader's corrupt-sample counters) over ranks: one small collective."""
    if not is_distributed():
        return [int(v) for v in values]
    t = torch.tensor(values, dtype=torch.long).to(comm_device())
    return [int(v) for v in all_reduce_sum(t).tolist()]


def barrier() -> None:
    """All ranks meet here (NCCL barriers run on the current device)."""
    if not is_distributed():
        return
    if _placed_hook is not None:   # the guard sees barriers too: they must come through here
        _placed_hook(None, comm_device())
    dev = comm_device()
    dist.barrier(device_ids=[dev.index]) if dev.type == "cuda" else dist.barrier()


# ------------------------------------------------------------------------------------ test-only guard
_GUARDED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
            "broadcast", "reduce", "all_to_all_single", "barrier", "all_gather_object", "broadcast_object_list",
            "gather", "scatter")


class CommGuardError(RuntimeError):
    """A collective of ours bypassed this module, or handed torch.distributed a tensor off the
    communication device (test-only guard)."""


def install_guard(designated: Optional[torch.device] = None) -> None:
    """Test-only: make every collective called from ``ssfer_dist`` code outside this module raise, and
    every tensor this module hands over be checked against the designated communication device
    (``comm_device()`` unless given). Calls from DeepSpeed / torch internals pass untouched.
    Installed by the worker when ``SSFER_COMM_GUARD=1`` (tests set it); idempotent."""
    global _placed_hook
    if getattr(dist, "_ssfer_guarded", False):
        return
    placed: Dict[str, object] = {}

    def hook(t: Optional[torch.Tensor], dev: torch.device) -> None:
        want = designated if designated is not None else comm_device()
        if t is not None and t.device != want:
            raise CommGuardError(f"collective on a {t.device} tensor; the communication device is {want}")
        placed["last"] = t

    def wrap(name, fn):
        def guarded(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("ssfer_dist") and caller != __name__:
                raise CommGuardError(f"torch.distributed.{name} called from {caller}, not through "
                                     f"ssfer_dist.distributed.collectives")
            if caller == __name__:
                t = args[0] if args else kwargs.get("tensor")
                if name != "barrier" and t is not placed.get("last"):
                    raise CommGuardError(f"torch.distributed.{name}: tensor not placed on the communication device")
            return fn(*args, **kwargs)
        guarded.__wrapped__ = fn
        return guarded

    for name in _GUARDED:
        fn = getattr(dist, name, None)
        if fn is not None:
            setattr(dist, name, wrap(name, fn))
    dist._ssfer_guarded = True
    _placed_hook = hook


def maybe_install_guard() -> None:
    """Install :func:`install_guard` when ``SSFER_COMM_GUARD=1`` (set by the tests)."""
    if os.environ.get(GUARD_ENV) == "1":
        install_guard()
