"""Stage 2: supervised fine-tuning with FaceMix (IoU-weighted mixup) → a classifier."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ssfer_dist.distributed.engine import engine_dtype
from ssfer_dist.plan import LaunchPlan
from ssfer_dist.ssl.ema import EMATeacher
from ssfer_dist.stages.base import Stage, StageConfigs, build_classifier_for, rank_now
from ssfer_dist.tasks import FaceMixFinetune
from ssfer_dist.tasks.base import Task


class FaceMixStage(Stage):
    name = "facemix"
    section = "facemix"
    model_ema = True

    def build_task(self, sub: StageConfigs, plan: LaunchPlan, device: torch.device) -> Tuple[Task, nn.Module]:
        f = sub.section
        dtype = engine_dtype(sub.train)
        model = build_classifier_for(sub.model, sub.init, plan.num_classes).to(device)
        ema = None
        if sub.train.model_ema:          # built from the full module, before DeepSpeed wraps (and shards) it

            ema = EMATeacher(model, decay=sub.train.model_ema_decay, device=device)
        task = FaceMixFinetune(model, plan.num_classes, alpha=f.alpha, smoothing=f.label_smoothing,
                               seed=sub.run.seed, rank=rank_now(), facemix_prob=1.0 if f.enabled else 0.0,
                               input_dtype=None if dtype == torch.float32 else dtype, smooth_real=f.smooth_real,
                               ema=ema, real_term=f.real_term)
        return task, model

    def eval_module(self, sub: StageConfigs, task: Task) -> Optional[nn.Module]:
        ema = getattr(task, "ema", None)
        return ema.module if ema is not None else None


STAGE = FaceMixStage()
