"""Helpers shared by the tasks."""
from __future__ import annotations

from typing import Optional

import torch

from ssfer_dist.data.transforms import normalize_on_device


def prepare_images(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """uint8 batches are normalised here (on whatever device they are); float batches pass through.
    ``dtype`` (e.g. torch.bfloat16 for a bf16 engine) casts the result."""
    if x.dtype == torch.uint8:
        x = normalize_on_device(x)
    return x if dtype is None else x.to(dtype)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy as a detached 0-d tensor on the logits' device (NaN for an empty batch): no host sync."""
    if labels.numel() == 0:
        return torch.full((), float("nan"), device=logits.device)
    return (logits.detach().argmax(dim=-1) == labels.to(logits.device)).float().mean()


def const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d float tensor on ``like``'s device holding a host number (a fill kernel, not a host-to-device copy)."""
    return torch.full((), float(value), device=like.device)
