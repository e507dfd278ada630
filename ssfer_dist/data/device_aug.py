"""Geometric augmentation on the training device, batched: RandomResizedCrop + horizontal flip + resize.

With ``data.augment_on: device`` the loader workers only read and decode (``mae``/``weak`` views arrive as
uint8 ``[N, H0, W0, 3]`` at the stored size, channels last as decoded, or as raw JPEG bytes with
``data.decode: device``) and this
module finishes the view on the device the model runs on:

1. crop parameters by torchvision's ``RandomResizedCrop.get_params`` rule (10 tries of area-scale and
   log-uniform aspect ratio, then the centre-crop fallback), vectorised over the batch, integer pixels;
2. crop + flip + resize to the model size as ONE ``grid_sample`` over an affine grid per sample
   (``bilinear`` or ``bicubic``, edges replicated; no antialiasing: stored faces are upsampled or drafted
   to at most 2x the model size before they get here), rounded back to uint8 — the tasks normalise
   exactly as for CPU-augmented batches (``normalize_on_device``);
3. the face box through the same crop/flip/resize (``box`` key, FaceMix needs it), the formulas of
   ``data.transforms.crop_box`` / ``flip_box``.

Crop and flip draws come from a CPU ``torch.Generator`` seeded by (seed, rank, micro-batch index, view
key): a pure function of the position in the stream, so a resumed run replays the same batches and the
result does not depend on the device. Only ``N x 6`` floats travel to the device per view.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from ssfer_dist.data.pipeline import stream_seed

log = logging.getLogger(__name__)

__all__ = ["DEVICE_KINDS", "CropParams", "sample_crops", "crop_flip_resize", "map_boxes", "decode_jpegs",
           "DeviceAugment"]

# view kinds whose geometry runs on the device with augment_on=device (strong = RandAugment stays on the CPU)
DEVICE_KINDS = ("mae", "weak")


@dataclasses.dataclass(frozen=True)
class CropParams:
    """Per-sample integer crops (top, left, h, w) in the input's pixels and the flip flags, int64/bool [N]."""

    top: torch.Tensor
    left: torch.Tensor
    h: torch.Tensor
    w: torch.Tensor
    flip: torch.Tensor


def sample_crops(n: int, height: int, width: int, scale: Sequence[float] = (0.2, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                 generator: Optional[torch.Generator] = None, tries: int = 10) -> CropParams:
    """``n`` RandomResizedCrop parameter sets by torchvision's ``get_params`` rule, drawn at once.

    Each sample tries up to ``tries`` (area fraction ~ U(scale), log aspect ~ U(log ratio)) pairs and keeps
    the first that fits; none fits → the centre crop torchvision falls back to. Position uniform over the
    valid integer offsets. Flip with probability ``flip_p``.
    """
    g = generator
    area = float(height * width)
    s = torch.empty(n, tries, dtype=torch.float64).uniform_(float(scale[0]), float(scale[1]), generator=g)
    lr = torch.empty(n, tries, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    target, ar = area * s, torch.exp(lr)
    w = torch.round(torch.sqrt(target * ar)).long()     # round half to even, as Python's round()
    h = torch.round(torch.sqrt(target / ar)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)     # index of the first fitting try
    found = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    # torchvision's fallback: the largest centre crop within the ratio range
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    u = torch.rand(n, 3, dtype=torch.float64, generator=g)
    top = torch.floor(u[:, 0] * (height - h + 1)).long().clamp_(max=height - h)
    left = torch.floor(u[:, 1] * (width - w + 1)).long().clamp_(max=width - w)
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    top = torch.where(found, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fw) // 2))
    return CropParams(top, left, h, w, u[:, 2] < flip_p)


def _theta(p: CropParams, height: int, width: int) -> torch.Tensor:
    """Affine ``[N, 2, 3]`` mapping output coordinates (align_corners=False) to the crop in the input,
    mirrored in x for flipped samples: x_in = left + (x_out + 0.5) * w / S - 0.5 in pixel indices."""
    n = p.top.shape[0]
    w, h = p.w.double(), p.h.double()
    sx = torch.where(p.flip, -w / width, w / width)
    th = torch.zeros(n, 2, 3, dtype=torch.float64)
    th[:, 0, 0] = sx
    th[:, 0, 2] = (2 * p.left.double() + w) / width - 1
    th[:, 1, 1] = h / height
    th[:, 1, 2] = (2 * p.top.double() + h) / height - 1
    return th.float()


def crop_flip_resize(x: torch.Tensor, p: CropParams, size: int, mode: str = "bicubic") -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` (any device) → uint8 ``[N, 3, size, size]``: every sample's crop, flip and
    resize in one ``grid_sample``."""
    n, _, height, width = x.shape
    theta = _theta(p, height, width)
    if x.device.type == "cuda":
        theta = theta.pin_memory()
    theta = theta.to(x.device, non_blocking=True)
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    y = F.grid_sample(x.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def map_boxes(box: torch.Tensor, p: CropParams, size: int) -> torch.Tensor:
    """Boxes ``[N, 4]`` (x1, y1, x2, y2 in input pixels) through crop → resize to ``size`` → flip,
    clipped to the output (``transforms.crop_box`` then ``flip_box``)."""
    dev = box.device
    top, left = p.top.to(dev, torch.float32), p.left.to(dev, torch.float32)
    w, h = p.w.to(dev, torch.float32), p.h.to(dev, torch.float32)
    sx, sy = torch.full_like(w, size) / w, torch.full_like(h, size) / h     # (not size / w: a reciprocal)
    b = box.float()
    x1 = ((b[:, 0] - left) * sx).clamp(0, size)
    y1 = ((b[:, 1] - top) * sy).clamp(0, size)
    x2 = ((b[:, 2] - left) * sx).clamp(0, size)
    y2 = ((b[:, 3] - top) * sy).clamp(0, size)
    flip = p.flip.to(dev)
    x1, x2 = torch.where(flip, size - x2, x1), torch.where(flip, size - x1, x2)
    return torch.stack([x1, y1, x2, y2], dim=1)


def decode_jpegs(data: Sequence[Any], device: torch.device) -> Tuple[List[torch.Tensor], int]:
    """JPEG bytes → list of uint8 ``[3, H, W]`` on ``device`` (``torchvision.io.decode_jpeg`` batched: nvJPEG on
    CUDA, libjpeg on the CPU). A batch that fails is decoded one by one; an undecodable image is replaced by a
    copy of a decodable one of the batch (the batch size stays fixed) and counted (the second value)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    bufs = [d if isinstance(d, torch.Tensor) else torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    dev = torch.device(device)
    kw = {"mode": ImageReadMode.RGB}
    if dev.type == "cuda":
        kw["device"] = dev
    try:
        return list(decode_jpeg(bufs, **kw)), 0
    except RuntimeError:
        out: List[Optional[torch.Tensor]] = []
        for b in bufs:
            try:
                out.append(decode_jpeg(b, **kw))
            except RuntimeError:
                out.append(None)
        good = [t for t in out if t is not None]
        if not good:
            raise RuntimeError(f"none of the {len(bufs)} JPEGs of the batch decodes") from None
        bad = sum(t is None for t in out)
        log.warning("%d undecodable JPEG(s) in a batch replaced by decodable ones", bad)
        return [t if t is not None else good[i % len(good)] for i, t in enumerate(out)], bad


class DeviceAugment:
    """Finishes the device-placed views of a batch on its device: ``aug(batch, index) -> batch``.

    ``keys``: {batch key: view kind} of the views the CPU shipped undecoded/unaugmented (``data.pipeline``
    marks them); ``box_key`` follows the view named ``image``. ``index`` is the micro-batch index the loader
    stamps on the batch (``__index__``): crops are a pure function of (seed, rank, index, key).
    """

    def __init__(self, keys: Dict[str, str], img_size: int, *, seed: int, rank: int,
                 scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 flip_p: float = 0.5, interpolation: str = "bicubic") -> None:
        if interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be bicubic or bilinear, got {interpolation!r}")
        self.keys = dict(keys)
        self.img_size, self.seed, self.rank = int(img_size), int(seed), int(rank)
        self.scale, self.ratio, self.flip_p = tuple(scale), tuple(ratio), float(flip_p)
        self.mode = interpolation
        self.resized = 0           # images whose decoded size differed from the batch's (decode on device)
        self.undecodable = 0

    def generator(self, index: int, key: str) -> torch.Generator:
        return torch.Generator().manual_seed(stream_seed(self.seed, self.rank, -2, int(index), "devaug/" + key))

    def _stack(self, imgs: List[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Decoded images of one batch → ``[N, 3, H, W]``; any of another size than the first is resized
        (counted in ``resized``). Also the per-sample (sx, sy, sx, sy) box scale, None when nothing moved."""
        h, w = imgs[0].shape[-2:]
        out, scales = [], []
        for t in imgs:
            th, tw = t.shape[-2:]
            if (th, tw) != (h, w):
                self.resized += 1
                t = F.interpolate(t[None].float(), size=(h, w), mode="bilinear", antialias=True,
                                  align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
            scales.append((w / tw, h / th, w / tw, h / th))
            out.append(t)
        moved = any(s != (1.0, 1.0, 1.0, 1.0) for s in scales)
        return torch.stack(out), (torch.tensor(scales, dtype=torch.float32) if moved else None)

    def __call__(self, batch: Dict[str, Any], index: int, device: Optional[torch.device] = None) -> Dict[str, Any]:
        out = dict(batch)
        for key in self.keys:
            x = out[key]
            if isinstance(x, torch.Tensor):              # uint8 [N, H, W, 3] as the loader decoded it
                x = x.permute(0, 3, 1, 2)                    # [N, 3, H, W] view (channels-last memory)
            else:                                        # raw JPEG bytes (data.decode: device)
                dev = device if device is not None else (out["box"].device if "box" in out else torch.device("cpu"))
                imgs, bad = decode_jpegs(x, dev)
                self.undecodable += bad
                x, box_scale = self._stack(imgs)
                if box_scale is not None and key == "image" and "box" in out:
                    out["box"] = out["box"] * box_scale.to(out["box"].device)
            n, _, height, width = x.shape
            p = sample_crops(n, height, width, self.scale, self.ratio, self.flip_p, self.generator(index, key))
            out[key] = crop_flip_resize(x, p, self.img_size, self.mode)
            if key == "image" and "box" in out:
                out["box"] = map_boxes(out["box"], p, self.img_size)
        return out

    def __repr__(self) -> str:
        return (f"DeviceAugment(keys={self.keys}, img_size={self.img_size}, scale={self.scale}, "
                f"ratio={self.ratio}, mode={self.mode!r})")


def place_views(views, augment_on: str) -> tuple:
    """``views`` with ``on_device`` set for the kinds the device augments (``DEVICE_KINDS``) when
    ``augment_on == "device"``; the strong view (RandAugment) stays on the CPU."""
    return tuple(dataclasses.replace(v, on_device=augment_on == "device" and v.kind in DEVICE_KINDS)
                 for v in views)
