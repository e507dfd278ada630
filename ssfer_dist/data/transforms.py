"""Image transforms for the three stages; the face box follows every crop, flip and resize.

``build_transform(kind, img_size, uint8=False)`` returns ``f(img, box) -> (tensor [3, S, S], box float32[4])``:

- ``mae`` / ``weak``: RandomResizedCrop(S, scale 0.2-1, ratio 3/4-4/3, bicubic) + horizontal flip (p 0.5);
- ``strong``: the same, then timm RandAugment ``rand-m9-mstd0.5-inc1`` (its geometric ops are not
  tracked: the box is the post-crop/flip one);
- ``eval``: resize to S x S (bicubic).

Floats are normalised with the face mean/std; with ``uint8=True`` the tensor stays uint8 (cheap to ship
to the device) and :func:`normalize_on_device` finishes the job there.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ssfer_dist.shards.schema import FACE_MEAN, FACE_STD

KINDS = ("mae", "weak", "strong", "eval")
RANDAUG = "rand-m9-mstd0.5-inc1"


def normalize_on_device(x: torch.Tensor, mean: Optional[Sequence[float]] = FACE_MEAN,
                        std: Optional[Sequence[float]] = FACE_STD, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 3, H, W] (any device) -> normalised float ``dtype``: (x / 255 - mean) / std.

    ``mean``/``std`` None mean the face normalisation (so a weights file's optional meta can be passed as is).
    """
    mean = FACE_MEAN if mean is None else mean
    std = FACE_STD if std is None else std
    m, s = _norm_consts(x.device, tuple(float(v) for v in mean), tuple(float(v) for v in std))
    return ((x.float() / 255.0 - m) / s).to(dtype)


_NORM_CACHE: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def _norm_consts(device: torch.device, mean: Tuple[float, ...], std: Tuple[float, ...]):
    """mean/std as [3, 1, 1] tensors on ``device``, made once per device: a host-to-device copy every step
    would synchronise the host with the GPU each time."""
    key = (str(device), mean, std)
    out = _NORM_CACHE.get(key)
    if out is None:
        out = (torch.tensor(mean, dtype=torch.float32).view(3, 1, 1).to(device),
               torch.tensor(std, dtype=torch.float32).view(3, 1, 1).to(device))
        _NORM_CACHE[key] = out
    return out


def to_tensor(img: Image.Image, uint8: bool = False) -> torch.Tensor:
    """PIL RGB -> [3, H, W] uint8, or normalised float32."""
    t = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    return t if uint8 else normalize_on_device(t)


def sample_crop(width: int, height: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                rng: Optional[random.Random] = None) -> Tuple[int, int, int, int]:
    """RandomResizedCrop parameters (top, left, h, w), torchvision's sampling rule (10 tries, then centre)."""
    rng = rng or random
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_box(box: np.ndarray, top: int, left: int, h: int, w: int, out_w: int, out_h: int) -> np.ndarray:
    """Map a box [x1,y1,x2,y2] through crop (top,left,h,w) + resize to (out_w,out_h); clipped to the output."""
    sx, sy = out_w / w, out_h / h
    b = np.array([(box[0] - left) * sx, (box[1] - top) * sy, (box[2] - left) * sx, (box[3] - top) * sy],
                 dtype=np.float32)
    b[[0, 2]] = np.clip(b[[0, 2]], 0, out_w)
    b[[1, 3]] = np.clip(b[[1, 3]], 0, out_h)
    return b


def flip_box(box: np.ndarray, width: int) -> np.ndarray:
    """Horizontal flip of a box in an image ``width`` wide."""
    return np.array([width - box[2], box[1], width - box[0], box[3]], dtype=np.float32)


class FaceTransform:
    """Callable ``(img, box) -> (tensor, box)``; see the module docstring for the kinds."""

    def __init__(self, kind: str, img_size: int, uint8: bool = False, scale=(0.2, 1.0), flip_p: float = 0.5,
                 randaug: str = RANDAUG, ratio=(3 / 4, 4 / 3), interpolation: str = "bicubic"):
        if kind not in KINDS:
            raise ValueError(f"transform kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.img_size, self.uint8 = kind, int(img_size), uint8
        self.scale, self.flip_p, self.ratio = tuple(scale), flip_p, tuple(ratio)
        self.resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
        self.randaug: Optional[Callable] = None
        if kind == "strong":
            from timm.data.auto_augment import rand_augment_transform

            # magnitude_max just under 10: at the clamp (M 9 + noise reaches 10 in ~2 % of draws) timm's
            # increasing posterize asks for 0 bits, which Pillow >= 10 rejects (the sample would be dropped).
            hp = {"translate_const": int(img_size * 0.45),
                  "img_mean": tuple(int(round(255 * m)) for m in FACE_MEAN),
                  "magnitude_max": 9.99}
            self.randaug = rand_augment_transform(randaug, hp)

    def __call__(self, img: Image.Image, box: Optional[np.ndarray] = None) -> Tuple[torch.Tensor, np.ndarray]:
        if img.mode != "RGB":
            img = img.convert("RGB")
        w, h = img.size
        s = self.img_size
        b = np.array([0, 0, w, h] if box is None else box, dtype=np.float32)
        if self.kind == "eval":
            if (w, h) != (s, s):
                img = img.resize((s, s), Image.BICUBIC)
            b = crop_box(b, 0, 0, h, w, s, s)
        else:
            top, left, ch, cw = sample_crop(w, h, self.scale, self.ratio)
            img = img.resize((s, s), self.resample, box=(left, top, left + cw, top + ch))
            b = crop_box(b, top, left, ch, cw, s, s)
            if random.random() < self.flip_p:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
                b = flip_box(b, s)
            if self.randaug is not None:
                img = self.randaug(img)
        return to_tensor(img, self.uint8), b

    def __repr__(self) -> str:
        return f"FaceTransform(kind={self.kind!r}, img_size={self.img_size}, uint8={self.uint8})"


def build_transform(kind: str, img_size: int, uint8: bool = False, **kwargs) -> FaceTransform:
    """The stage transform ``kind`` (mae|weak|strong|eval) at ``img_size``; see the module docstring.
    ``kwargs``: ``scale``, ``ratio``, ``interpolation`` of the crop (``data.crop_*``, ``data.interpolation``)."""
    return FaceTransform(kind, img_size, uint8, **kwargs)
