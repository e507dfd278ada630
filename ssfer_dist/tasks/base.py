"""The Task protocol every stage's task follows, and a base class with its no-op defaults.

A task owns its models' forward pass: ``task(batch, step) -> {"loss": scalar tensor, metric: 0-d tensor}``
(metrics detached, on the device, NaN when undefined; never read to the host inside the step). The
loop owns backward and the optimizer step, then calls ``after_step`` (EMA teacher, threshold rounds).
``state_dict`` / ``load_state_dict`` carry the task's state beyond the trained module (tensors and plain
values; empty for stateless tasks) through checkpoints. Pure torch: no ray, deepspeed or torch.distributed.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Protocol, runtime_checkable

from torch import nn

__all__ = ["Task", "TaskBase"]

GatherCtx = Callable[..., Any]


@runtime_checkable
class Task(Protocol):
    model: nn.Module

    def __call__(self, batch: Dict[str, Any], step: int) -> Dict[str, Any]: ...

    def after_step(self, step: int, gather_ctx: Optional[GatherCtx] = None) -> Dict[str, Any]: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


class TaskBase:
    """Defaults for a stateless task: nothing after the step, nothing to checkpoint."""

    model: nn.Module

    def after_step(self, step: int, gather_ctx: Optional[GatherCtx] = None) -> Dict[str, Any]:
        return {}

    def set_micro_batch(self, index: int) -> None:
        """The global index of the next micro-batch (``data.order: shards``): a task that draws random numbers
        keys them by it, so they do not depend on how the global batch is split over ranks."""
        self.micro_batch = int(index)

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)[:5]}")
