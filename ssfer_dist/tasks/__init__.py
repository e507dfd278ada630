"""One Task per stage: ``task(batch, step) -> {"loss": scalar tensor, metric: 0-d tensor, ...}``.

Metrics are detached tensors on the batch's device (NaN when undefined for the batch); tasks never read a
device value to the host, so a step runs without a host sync — the loop reads metrics once per log step.

Tasks own their models' forward passes; the loop (``train/``) owns backward and the optimizer step.
Every task follows :class:`~ssfer_dist.tasks.base.Task`. Pure torch: no ray, deepspeed or torch.distributed here.
"""
from ssfer_dist.tasks.base import Task, TaskBase
from ssfer_dist.tasks.facemix_finetune import FaceMixFinetune
from ssfer_dist.tasks.linear_probe import LinearProbe
from ssfer_dist.tasks.mae_pretrain import MAEPretrain
from ssfer_dist.tasks.semi_supervised import SemiSupervised

__all__ = ["Task", "TaskBase", "MAEPretrain", "FaceMixFinetune", "SemiSupervised", "LinearProbe"]
