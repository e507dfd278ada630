"""FaceMix (SSFER): mixup whose real-pair loss is weighted by 1 - IoU of the two faces' boxes.

Pure and seedable: :func:`facemix` never modifies its inputs; with the same ``rng`` seed it returns the
same mix. Loss (as SSFER's reference code computes it)::

    L = mean_i CE(f(x~_i), y~_i) + mean_i (1 - IoU_ij) * [CE(f(x_i), y_i) + CE(f(x_j), y_j)]
    x~_i = lam x_i + (1 - lam) x_j,   y~_i = lam s(y_i) + (1 - lam) s(y_j),   lam ~ Beta(alpha, alpha)

where s() is label smoothing: it reaches the mixed targets only; the real-image term uses the hard
labels y_i, y_j (SSFER's fine-tune.py: plain CrossEntropyLoss there). ``smooth_real=True`` smooths both.

with j = N-1-i (``pairing="reverse"``, SSFER) or a random permutation (``"random"``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

PAIRINGS = ("reverse", "random")


@dataclasses.dataclass
class FaceMixBatch:
    """Result of :func:`facemix` (all new tensors)."""

    images: torch.Tensor       # [N, 3, H, W] mixed images
    targets: torch.Tensor      # [N, C] mixed smoothed one-hots
    real_targets: torch.Tensor  # [N, C] one-hots of the unmixed labels (hard; smoothed with smooth_real)
    index: torch.Tensor        # [N] long: partner j of each i
    lam: float
    iou: torch.Tensor          # [N] IoU of box i and box j
    real_weight: torch.Tensor  # [N] 1 - IoU


def box_iou_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of boxes a[i] and b[i] ([N, 4] x1,y1,x2,y2 in one pixel frame) -> [N]; empty union -> 0."""
    a = a.float()
    b = b.float()
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """[N] long -> [N, C]: (1 - s) on the label plus s / C everywhere (timm/PyTorch label smoothing)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)
    return out


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample CE with soft targets: -(t * log_softmax(z)).sum(-1) -> [N] (float32)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)


def facemix(images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, num_classes: int,
            alpha: float = 1.0, pairing: str = "reverse", smoothing: float = 0.1,
            rng: Union[None, int, np.random.Generator] = None, lam: Optional[float] = None,
            smooth_real: bool = False) -> FaceMixBatch:
    """Mix a batch (images [N,3,H,W], labels [N], boxes [N,4] in the images' pixel frame); inputs untouched.

    ``smoothing`` applies to the mixed targets; the real targets stay hard unless ``smooth_real``.

    ``rng`` (a seed or ``numpy.random.Generator``) draws lam ~ Beta(alpha, alpha) (unless ``lam`` is given)
    and, for ``pairing="random"``, the permutation.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    n = images.shape[0]
    if lam is None:
        lam = float(gen.beta(alpha, alpha)) if alpha > 0 else 1.0
    if pairing == "reverse":
        index = torch.arange(n - 1, -1, -1, device=images.device)
    else:
        index = torch.from_numpy(gen.permutation(n)).to(images.device)
    mixed = images * lam + images[index] * (1.0 - lam)          # new tensor; inputs unchanged
    y = smooth_one_hot(labels, num_classes, smoothing)
    targets = y * lam + y[index] * (1.0 - lam)
    real = y if smooth_real else smooth_one_hot(labels, num_classes, 0.0)
    iou = box_iou_pairs(boxes, boxes[index]).to(images.device)
    return FaceMixBatch(mixed, targets, real, index, lam, iou, 1.0 - iou)


def facemix_loss(logits_mixed: torch.Tensor, logits_real: torch.Tensor, mix: FaceMixBatch) -> dict:
    """The FaceMix loss given the model's logits on ``mix.images`` and on the real (unmixed) images.

    Returns ``{"loss", "loss_mix", "loss_real"}`` (scalars): loss = loss_mix + loss_real with
    loss_mix = mean_i CE(f(x~_i), y~_i), loss_real = mean_i (1 - IoU_ij)(CE(f(x_i), y_i) + CE(f(x_j), y_j)).
    """
    loss_mix = soft_cross_entropy(logits_mixed, mix.targets).mean()
    ce_real = soft_cross_entropy(logits_real, mix.real_targets)          # [N]
    w = mix.real_weight.to(ce_real.device)
    loss_real = (w * (ce_real + ce_real[mix.index])).mean()
    return {"loss": loss_mix + loss_real, "loss_mix": loss_mix, "loss_real": loss_real}
