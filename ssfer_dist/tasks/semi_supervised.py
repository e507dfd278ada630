"""Stage 3: semi-supervised fine-tuning (EMA teacher on weak views -> pseudo-labels for the strong view)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssfer_dist.ssl.ema import EMATeacher, GatherCtx
from ssfer_dist.ssl.thresholds import ThresholdPolicy
from ssfer_dist.tasks.base import TaskBase
from ssfer_dist.tasks.common import accuracy, prepare_images


class SemiSupervised(TaskBase):
    """loss = L_x + lambda_u * L_u.

    batch: ``image`` [N,3,H,W] (labeled, weak view), ``label`` long[N], ``box`` [N,4] (unused here),
    ``u_weak`` / ``u_strong`` [M,3,H,W] (two views of the same unlabeled images, M = mu * N), optional
    ``u_weak2`` (second weak view; DTM averages the teacher's softmax over both), optional ``u_label``
    long[M] (true labels when known, -1 unknown: reports pseudo-label accuracy), optional ``u_index``
    long[M] (stable sample ids, FlexMatch).

    L_x = CE(student(x), y) with ``smoothing``; L_u = mean over all M of mask * CE(student(u_strong), y^),
    y^ = argmax of the teacher's softmax on the weak view(s), mask from ``threshold``.
    The loop calls :meth:`after_step` after each optimizer step (EMA update; DTM rounds every
    ``round_steps`` steps).
    """

    def __init__(self, student: nn.Module, teacher: EMATeacher, threshold: ThresholdPolicy, num_classes: int,
                 lambda_u: float = 5.0, mu: int = 1, smoothing: float = 0.0, round_steps: int = 0,
                 input_dtype: Optional[torch.dtype] = None):
        self.model = student
        self.teacher, self.threshold = teacher, threshold
        self.num_classes, self.lambda_u, self.mu = int(num_classes), float(lambda_u), int(mu)
        self.smoothing, self.round_steps, self.input_dtype = float(smoothing), int(round_steps), input_dtype

    @property
    def student(self) -> nn.Module:
        return self.model

    @torch.no_grad()
    def teacher_probs(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher softmax [M, C] on the weak view (averaged over ``u_weak``/``u_weak2`` when the policy uses 2)."""
        views = [batch["u_weak"]]
        if self.threshold.num_views >= 2 and "u_weak2" in batch:
            views.append(batch["u_weak2"])
        x = torch.cat([prepare_images(v) for v in views], dim=0)
        probs = F.softmax(self.teacher(x).float(), dim=-1)
        return probs.view(len(views), -1, probs.shape[-1]).mean(dim=0)

    def __call__(self, batch: Dict[str, torch.Tensor], step: int) -> Dict:
        x = prepare_images(batch["image"], self.input_dtype)
        y = batch["label"].long()
        us = prepare_images(batch["u_strong"], self.input_dtype)
        n = x.shape[0]
        probs = self.teacher_probs(batch)
        if self.threshold.needs_labeled:
            with torch.no_grad():
                self.threshold.observe_labeled(F.softmax(self.teacher(prepare_images(batch["image"])).float(), -1), y)
        mask, pseudo = self.threshold(probs, step, batch.get("u_index"))
        logits = self.model(torch.cat([x, us], dim=0))
        logits_x, logits_s = logits[:n].float(), logits[n:].float()
        loss_x = F.cross_entropy(logits_x, y, label_smoothing=self.smoothing)
        loss_u = (F.cross_entropy(logits_s, pseudo.to(logits_s.device), reduction="none") * mask).mean()
        dev = logits_x.device
        out = {"loss": loss_x + self.lambda_u * loss_u, "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
               "acc_x": accuracy(logits_x, y), "mask_rate": mask.mean(),
               "teacher_conf": probs.max(dim=-1).values.mean(),
               "tau_mean": self.threshold.class_thresholds().mean().to(dev)}
        ul = batch.get("u_label")
        if ul is not None:                # pseudo-label accuracy on samples with a known label (NaN: none)
            ul = ul.to(pseudo.device)
            known = ul >= 0
            hit = (pseudo == ul) & known
            n_known = known.sum()
            kept = known & (mask > 0)
            nan = torch.full((), float("nan"), device=pseudo.device)
            out["pseudo_acc"] = torch.where(n_known > 0, hit.sum() / n_known.clamp(min=1), nan)
            out["pseudo_acc_masked"] = torch.where(n_known > 0, (hit & kept).sum() / kept.sum().clamp(min=1), nan)
        return out

    def after_step(self, step: int, gather_ctx: Optional[GatherCtx] = None) -> Dict:
        """EMA teacher update after the optimizer step ``step``; closes a threshold round when due."""
        d = self.teacher.update(self.model, step, gather_ctx)
        if self.round_steps > 0 and (step + 1) % self.round_steps == 0:
            self.threshold.end_round()
        return {"ema_decay": d}

    def state_dict(self) -> Dict:
        return {"teacher": self.teacher.state_dict(), "threshold": self.threshold.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.threshold.load_state_dict(state["threshold"])
