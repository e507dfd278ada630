"""Linear probe: the standard evaluation of a pretrained encoder (MAE paper, linear probing).

The encoder from ``init.weights`` (an MAE export) is frozen and kept in eval mode; only a
``BatchNorm1d(affine=False)`` + ``Linear`` head trains on the labeled shards (weak views). The export
folds the BN into the linear layer: a plain ``kind: classifier`` file that ``ssfer evaluate`` reads.
Config section: ``linear_probe`` (:class:`~ssfer_dist.config.LinearProbeCfg`).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import nn

from ssfer_dist.distributed.engine import engine_dtype
from ssfer_dist.plan import LaunchPlan
from ssfer_dist.stages.base import Stage, StageConfigs, build_classifier_for
from ssfer_dist.tasks.base import Task
from ssfer_dist.tasks.linear_probe import LinearProbe, fold_probe_head, freeze_encoder


class LinearProbeStage(Stage):
    name = "linear_probe"
    section = "linear_probe"
    layer_decay = False               # one linear layer: nothing to decay layer-wise

    def check_config(self, sub: StageConfigs):
        out = super().check_config(sub)
        if not sub.init.weights:
            out.append(("init.weights", "linear_probe needs the pretrained encoder (an MAE export)"))
        return out

    def build_task(self, sub: StageConfigs, plan: LaunchPlan, device: torch.device) -> Tuple[Task, nn.Module]:
        dtype = engine_dtype(sub.train)
        model = freeze_encoder(build_classifier_for(sub.model, sub.init, plan.num_classes, drop_path=0.0))
        model.to(device)
        task = LinearProbe(model, plan.num_classes, smoothing=sub.section.label_smoothing,
                           input_dtype=None if dtype == torch.float32 else dtype)
        return task, model

    def export(self, sub: StageConfigs, plan: LaunchPlan, task: Task, sd: Dict[str, torch.Tensor]
               ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        return super().export(sub, plan, task, fold_probe_head(sd))


STAGE = LinearProbeStage()
