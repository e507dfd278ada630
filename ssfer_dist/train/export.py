"""The weights a run exports: what the stage evaluates (its ``eval_module``: model EMA, semisup teacher) or else
the trained module, gathered to full fp32 on rank 0 and written as ``model.safetensors`` by the stage's
``export`` (at the end of training to ``<run>/export/``, and for the best evaluation to ``export/best/``)."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Optional

import torch

from ssfer_dist import storage
from ssfer_dist.distributed.engine import consolidated_state_dict
from ssfer_dist.models.io import save_weights
from ssfer_dist.stages.base import StageConfigs
from ssfer_dist.plan import LaunchPlan

__all__ = ["export_state_dict", "write_export"]


def export_state_dict(stage, sub: StageConfigs, task, engine, zero_stage: int,
                      rank: int) -> Optional[Dict[str, torch.Tensor]]:
    """The weights to export, full and fp32 on rank 0 (None elsewhere): the stage's ``eval_module`` (model
    EMA, semisup teacher: full copies on every rank, nothing to gather) or else the trained module
    (consolidated: every rank takes part in the ZeRO-3 gather)."""
    em = stage.eval_module(sub, task)
    if em is None:
        return consolidated_state_dict(engine, zero_stage)
    if rank != 0:
        return None
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
            for k, v in em.state_dict().items()}


def write_export(stage, sub: StageConfigs, plan: LaunchPlan, task, sd, url: str,
                 extra_json: Optional[Dict[str, Any]] = None) -> None:
    """Rank 0: the stage's export of ``sd`` to ``url`` (``…/model.safetensors``), plus ``eval.json`` beside it
    when ``extra_json`` is given."""
    state_dict, meta = stage.export(sub, plan, task, sd)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model.safetensors")
        save_weights(local, state_dict, meta)
        storage.put_file(local, url)
        if extra_json is not None:
            storage.put_bytes(storage.join(url.rsplit("/", 1)[0], "eval.json"),
                              json.dumps(extra_json, indent=2, sort_keys=True).encode())
