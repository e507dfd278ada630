"""Stage 2: supervised fine-tuning with FaceMix."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from ssfer_dist.data.facemix import facemix, facemix_loss
from ssfer_dist.ssl.ema import EMATeacher, GatherCtx
from ssfer_dist.tasks.base import TaskBase
from ssfer_dist.tasks.common import accuracy, const, prepare_images


class FaceMixFinetune(TaskBase):
    """``batch = {"image": [N,3,H,W], "label": long[N], "box": float[N,4]}`` -> loss + metrics.

    One forward over ``cat([mixed, real])``; the loss is :func:`~ssfer_dist.data.facemix.facemix_loss`.
    lam and the pairing are drawn from ``numpy.random.default_rng([seed, rank, step])``: a pure function of
    the step. ``facemix_prob`` < 1 trains some steps with plain label-smoothed CE. ``smoothing`` reaches the
    mixed targets only (the real-image term uses hard labels, as SSFER) unless ``smooth_real``.
    ``real_term=False`` drops the (1 - IoU)-weighted real-image term: plain mixup (the baseline FaceMix is
    compared with); the real images are then only forwarded without gradients, for the metrics.
    ``real_share`` (logged) is the real term's share of the FaceMix loss, loss_real / (loss_mix + loss_real).
    ``ema``: a model EMA (SSFER evaluates one, decay 0.999) updated after every optimizer step; it is the
    task's checkpointed state.
    """

    def __init__(self, model: nn.Module, num_classes: int, alpha: float = 1.0, pairing: str = "reverse",
                 smoothing: float = 0.1, seed: int = 0, rank: int = 0, facemix_prob: float = 1.0,
                 input_dtype: Optional[torch.dtype] = None, smooth_real: bool = False,
                 ema: Optional[EMATeacher] = None, real_term: bool = True):
        self.model, self.num_classes = model, int(num_classes)
        self.alpha, self.pairing, self.smoothing = float(alpha), pairing, float(smoothing)
        self.seed, self.rank = int(seed), int(rank)
        self.facemix_prob, self.input_dtype = float(facemix_prob), input_dtype
        self.smooth_real, self.ema, self.real_term = bool(smooth_real), ema, bool(real_term)

    def __call__(self, batch: Dict[str, torch.Tensor], step: int) -> Dict:
        x = prepare_images(batch["image"], self.input_dtype)
        y = batch["label"].long()
        m = getattr(self, "micro_batch", None)     # data.order shards: keyed by the global micro-batch
        rng = np.random.default_rng([self.seed, self.rank, int(step)] if m is None else [self.seed, 1 << 20, m])
        if rng.random() >= self.facemix_prob:
            logits = self.model(x)
            loss = nn.functional.cross_entropy(logits.float(), y, label_smoothing=self.smoothing)
            return {"loss": loss, "loss_mix": const(0.0, loss), "loss_real": loss.detach(),
                    "real_share": const(1.0, loss), "acc": accuracy(logits, y), "iou": const(0.0, loss),
                    "lam": const(1.0, loss)}
        mix = facemix(x, y, batch["box"], self.num_classes, self.alpha, self.pairing, self.smoothing, rng=rng,
                      smooth_real=self.smooth_real)
        n = x.shape[0]
        if self.real_term:
            logits = self.model(torch.cat([mix.images, x], dim=0))
            logits_mixed, logits_real = logits[:n], logits[n:]
        else:                                # plain mixup: only the mixed images train
            logits_mixed = self.model(mix.images)
            with torch.no_grad():
                logits_real = self.model(x)
        out = facemix_loss(logits_mixed, logits_real, mix)
        loss = out["loss"] if self.real_term else out["loss_mix"]
        share = (out["loss_real"] / (out["loss_mix"] + out["loss_real"]).clamp(min=1e-12)).detach()
        return {"loss": loss, "loss_mix": out["loss_mix"].detach(), "loss_real": out["loss_real"].detach(),
                "real_share": share, "acc": accuracy(logits_real, y), "iou": mix.iou.detach().mean(),
                "lam": const(mix.lam, loss)}

    def after_step(self, step: int, gather_ctx: Optional[GatherCtx] = None) -> Dict:
        """The model EMA's update (ZeRO-3: the student's shards gathered a chunk at a time)."""
        if self.ema is None:
            return {}
        return {"ema_decay": self.ema.update(self.model, step, gather_ctx)}

    def state_dict(self) -> Dict:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: Dict) -> None:
        if self.ema is None:
            return super().load_state_dict(state)
        if "ema" not in state:
            raise ValueError("train.model_ema is on but the checkpoint holds no model EMA")
        self.ema.load_state_dict(state["ema"])
