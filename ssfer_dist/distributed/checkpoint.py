"""Checkpoints through Ray Train: every rank saves its DeepSpeed shard into a local folder and reports it.

A checkpoint folder (``<storage>/<run>/checkpoint_<step>``) holds

- ``ds/``               the DeepSpeed checkpoint (model/optimizer shards of every rank, tag ``ds``);
- ``train_state.json``  :class:`~ssfer_dist.train.state.TrainState` (step, samples seen, data epoch and
  position, seeds);
- ``extra.pt``          the task's own state (``Task.state_dict``: EMA teacher, threshold policy) — tensors
  and plain values only, loaded with ``weights_only=True``; absent when the task keeps none.

Ray merges the ranks' files into one folder, keeps ``checkpoint.num_to_keep`` of them and hands the
latest back through ``ray.train.get_checkpoint()`` after a failure or when a run is rerun with the
same name.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any, Dict, Optional

import torch

from ssfer_dist.tasks.base import Task
from ssfer_dist.train.state import TrainState

log = logging.getLogger(__name__)

__all__ = ["save_and_report", "restore", "DS_TAG", "checkpoint_dir_name"]

DS_TAG = "ds"
STATE_FILE = "train_state.json"
EXTRA_FILE = "extra.pt"


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def save_and_report(engine, task: Task, state: TrainState, metrics: Dict[str, Any], rank: int) -> None:
    """Save this rank's part of the checkpoint and report it to Ray (every rank calls this)."""
    import ray.train

    tmp = tempfile.mkdtemp(prefix="ssfer-ckpt-")
    try:
        engine.save_checkpoint(tmp, tag=DS_TAG, save_latest=False)
        if rank == 0:
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                f.write(state.to_json())
            extra = task.state_dict()
            if extra:
                torch.save(extra, os.path.join(tmp, EXTRA_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_dir_name(state.step))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ds_safe_globals():
    """The few DeepSpeed classes its checkpoints pickle besides tensors and builtins."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def weights_only_loads(engine) -> None:
    """Make DeepSpeed read its checkpoint files with ``torch.load(weights_only=True)`` (allow-listing only
    the DeepSpeed classes above) instead of its default full unpickling."""
    ce = engine.checkpoint_engine

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(_ds_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = load


def restore(checkpoint, engine, task: Task) -> Optional[TrainState]:
    """Load a reported checkpoint into the engine and task; returns its TrainState (None: fresh run)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        state_path = os.path.join(d, STATE_FILE)
        if not os.path.exists(state_path):
            raise RuntimeError(f"checkpoint {checkpoint.path} lacks {STATE_FILE}")
        with open(state_path, "r", encoding="utf-8") as f:
            state = TrainState.from_json(f.read())
        weights_only_loads(engine)
        path, _ = engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=True, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"checkpoint {checkpoint.path}: DeepSpeed found no '{DS_TAG}' checkpoint")
        extra_path = os.path.join(d, EXTRA_FILE)
        if os.path.exists(extra_path):
            task.load_state_dict(torch.load(extra_path, map_location="cpu", weights_only=True))
    return state
