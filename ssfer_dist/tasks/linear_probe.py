"""Linear probe: a frozen (MAE-pretrained) encoder, only a linear head trained (MAE paper, linear probing).

The head is ``BatchNorm1d(affine=False)`` then ``Linear`` (the MAE recipe: a parameter-free BN normalises
the frozen features so one lr fits them). The encoder stays frozen and in eval mode every step (no
dropout / drop-path, no gradient); only the head trains. For export the BN folds into the linear layer,
so the probe is a plain classifier (``head.weight`` / ``head.bias``) that ``ssfer evaluate`` loads.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssfer_dist.tasks.base import TaskBase
from ssfer_dist.tasks.common import accuracy, prepare_images

__all__ = ["LinearProbe", "probe_head", "freeze_encoder", "fold_probe_head"]


def probe_head(linear: nn.Linear) -> nn.Sequential:
    """``BatchNorm1d(affine=False, eps=1e-6)`` + ``linear`` (the classifier's own, freshly initialised head)."""
    return nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False, eps=1e-6), linear)


def freeze_encoder(model: nn.Module) -> nn.Module:
    """Swap in the probe head and freeze every parameter outside it; returns the model."""
    model.head = probe_head(model.head)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head."))
    return model


def fold_probe_head(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``head.0`` (BN running stats) + ``head.1`` (linear) -> one ``head`` linear with the same eval output."""
    out = {k: v for k, v in sd.items() if not k.startswith("head.")}
    mean, var = sd["head.0.running_mean"].double(), sd["head.0.running_var"].double()
    w, b = sd["head.1.weight"].double(), sd["head.1.bias"].double()
    inv = 1.0 / torch.sqrt(var + 1e-6)
    out["head.weight"] = (w * inv).float()
    out["head.bias"] = (b - (w * inv) @ mean).float()
    return out


class LinearProbe(TaskBase):
    """``batch = {"image": [N,3,H,W], "label": long[N]}`` -> CE loss of the head on frozen features.

    ``model`` is a classifier after :func:`freeze_encoder` (its ``head`` is the BN + linear probe).
    """

    def __init__(self, model: nn.Module, num_classes: int, smoothing: float = 0.0,
                 input_dtype: Optional[torch.dtype] = None):
        self.model, self.num_classes = model, int(num_classes)
        self.smoothing, self.input_dtype = float(smoothing), input_dtype

    def __call__(self, batch: Dict[str, torch.Tensor], step: int) -> Dict:
        self.model.eval()              # the engine puts the module in train mode; only the head trains
        self.model.head.train()
        x = prepare_images(batch["image"], self.input_dtype)
        y = batch["label"].long()
        logits = self.model(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.smoothing)
        return {"loss": loss, "acc": accuracy(logits, y)}
