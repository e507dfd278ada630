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

from typing import List, Optional

import torch
import torch.distributed as dist

__all__ = ["comm_device", "all_reduce_sum", "all_reduce_max", "sum_ints", "barrier", "is_distributed",
           "world_size"]


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
    return t if t.device == dev else t.to(dev)


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
    dev = comm_device()
    dist.barrier(device_ids=[dev.index]) if dev.type == "cuda" else dist.barrier()
