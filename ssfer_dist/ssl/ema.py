"""EMA teacher: teacher <- d * teacher + (1 - d) * student after every optimizer step.

The decay is a pure function of the global step (:func:`ema_decay`). When the student's parameters are
sharded (ZeRO-3), the caller passes ``gather_ctx``: a callable taking a list of parameters and returning a
context manager inside which those parameters hold their full values (e.g.
``lambda ps: deepspeed.zero.GatheredParameters(ps)``); this module never imports deepspeed.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, ContextManager, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

GatherCtx = Callable[[Sequence[torch.nn.Parameter]], ContextManager]


def ema_decay(step: int, decay: float = 0.999, warmup_steps: int = 0) -> float:
    """EMA decay at ``step`` (0-based): ``decay``, or with a warm-up ``min(decay, (1 + step) / (10 + step))``
    while ``step < warmup_steps`` (early teachers follow the student closely)."""
    if warmup_steps > 0 and step < warmup_steps:
        return min(decay, (1.0 + step) / (10.0 + step))
    return decay


def _unwrap(m: nn.Module) -> nn.Module:
    """The wrapped module of an engine / DDP wrapper (duck-typed ``.module``), else ``m``."""
    inner = getattr(m, "module", None)
    return inner if isinstance(inner, nn.Module) else m


class EMATeacher:
    """An fp32, frozen, eval-mode copy of the student updated by EMA.

    Build it from the full (unsharded) student module, before it is wrapped/sharded.
    ``chunk_size`` parameters are gathered at a time, so a sharded model is never gathered whole.
    """

    def __init__(self, student: nn.Module, decay: float = 0.999, warmup_steps: int = 0, chunk_size: int = 16,
                 device: Optional[torch.device] = None):
        self.module = copy.deepcopy(_unwrap(student)).float()
        if device is not None:
            self.module.to(device)
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup_steps, self.chunk_size = float(decay), int(warmup_steps), int(chunk_size)
        self.num_updates = 0

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int, gather_ctx: Optional[GatherCtx] = None) -> float:
        """One EMA step with the decay for ``step``; returns the decay used."""
        d = ema_decay(step, self.decay, self.warmup_steps)
        src = dict(_unwrap(student).named_parameters())
        dst = dict(self.module.named_parameters())
        missing = [k for k in dst if k not in src]
        if missing:
            raise KeyError(f"EMA teacher and student differ: student lacks {missing[:3]}")
        names: List[str] = list(dst)
        for i in range(0, len(names), max(1, self.chunk_size)):
            chunk = names[i:i + self.chunk_size]
            ctx = gather_ctx([src[k] for k in chunk]) if gather_ctx is not None else contextlib.nullcontext()
            with ctx:
                for k in chunk:
                    t, s = dst[k], src[k]
                    t.mul_(d).add_(s.detach().to(device=t.device, dtype=t.dtype), alpha=1.0 - d)
        sbufs = dict(_unwrap(student).named_buffers())
        for k, b in self.module.named_buffers():
            if k in sbufs:
                b.copy_(sbufs[k])
        self.num_updates += 1
        return d

    def state_dict(self) -> Dict:
        return {"model": self.module.state_dict(), "decay": self.decay, "warmup_steps": self.warmup_steps,
                "num_updates": self.num_updates}

    def load_state_dict(self, state: Dict) -> None:
        self.module.load_state_dict(state["model"], strict=True)
        self.decay = float(state.get("decay", self.decay))
        self.warmup_steps = int(state.get("warmup_steps", self.warmup_steps))
        self.num_updates = int(state.get("num_updates", 0))
