"""Stage 1: MAE pretraining task."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from ssfer_dist.tasks.base import TaskBase
from ssfer_dist.tasks.common import prepare_images


class MAEPretrain(TaskBase):
    """``batch = {"image": [N, 3, H, W]}`` (float normalised or uint8) -> ``{"loss", "mask_ratio"}``.

    ``model`` is the :class:`~ssfer_dist.models.mae.MAE` or anything that calls it (e.g. a training engine
    wrapping it); the loop may replace ``task.model`` after wrapping. ``noise_seed`` makes the masks a pure
    function of (seed, step) — reproducible runs and resumes.
    """

    def __init__(self, model: nn.Module, mask_ratio: float = 0.75, input_dtype: Optional[torch.dtype] = None,
                 noise_seed: Optional[int] = None, rank: int = 0):
        self.model, self.mask_ratio, self.input_dtype = model, float(mask_ratio), input_dtype
        self.noise_seed, self.rank = noise_seed, int(rank)

    def _noise(self, x: torch.Tensor, step: int) -> Optional[torch.Tensor]:
        if self.noise_seed is None:
            return None
        p = _patch_size(self.model)
        n, length = x.shape[0], (x.shape[-2] // p) * (x.shape[-1] // p)
        m = getattr(self, "micro_batch", None)     # data.order shards: keyed by the global micro-batch
        key = (self.noise_seed * 1_000_003 + step) * 4099 + self.rank if m is None else \
            (self.noise_seed * 1_000_003 + m) * 4099 + 4093
        g = torch.Generator().manual_seed(key)
        noise = torch.rand(n, length, generator=g)      # on the host: the same masks on every device type
        if x.device.type == "cuda":                     # pinned -> an asynchronous copy, no stall
            return noise.pin_memory().to(x.device, non_blocking=True)
        return noise.to(x.device)

    def __call__(self, batch: Dict[str, torch.Tensor], step: int) -> Dict:
        x = prepare_images(batch["image"], self.input_dtype)
        loss, _pred, mask = self.model(x, mask_ratio=self.mask_ratio, noise=self._noise(x, step))
        return {"loss": loss, "mask_ratio": mask.detach().float().mean()}


def _patch_size(model: nn.Module) -> int:
    m = getattr(model, "module", model)
    return int(m.patch_size)
