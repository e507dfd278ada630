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


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if labels.numel() == 0:
        return 0.0
    return (logits.argmax(dim=-1) == labels).float().mean().item()
