"""DeepSpeed engine from the typed config: ZeRO 0–3, fp32/bf16/fp16, accumulation, clipping, AdamW.

The optimizer is a plain ``torch.optim.AdamW`` over the model's parameter groups (DeepSpeed accepts
it with ``zero_allow_untested_optimizer``); the learning rate is set by the loop every optimizer
step from :mod:`ssfer_dist.train.schedule` (a pure function of the step), so DeepSpeed runs no
scheduler of its own. Groups may carry ``lr_scale`` (layer-wise decay); :func:`set_lr` honours it.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from ssfer_dist.config import OptimCfg, TrainCfg

log = logging.getLogger(__name__)

__all__ = ["ds_config", "build_optimizer", "build_engine", "set_lr", "gather_ctx",
           "consolidated_state_dict", "engine_dtype"]


def ds_config(train: TrainCfg, batch_size_per_rank: int, global_batch: int,
              load_universal: bool = False) -> Dict[str, Any]:
    """The DeepSpeed JSON config for a stage (no optimizer/scheduler sections: we pass our own).
    ``global_batch`` is the launch plan's (batch_size_per_rank x ranks x grad_accum); DeepSpeed checks it.
    ``load_universal``: the engine will load a universal checkpoint (a resume on another rank count),
    DeepSpeed's ``checkpoint.load_universal`` key."""
    cfg: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(batch_size_per_rank),
        "gradient_accumulation_steps": int(train.grad_accum),
        "train_batch_size": int(global_batch),
        "gradient_clipping": float(train.grad_clip) if train.grad_clip else 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": int(train.zero_stage)},
    }
    z = cfg["zero_optimization"]
    bucket = int(train.zero_bucket_size)   # DeepSpeed's 5e8-element default is 2 GB of fp32 per bucket
    if train.zero_stage in (1, 2):
        z.update({"contiguous_gradients": True, "overlap_comm": False, "reduce_scatter": True,
                  "allgather_partitions": True, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket})
    if train.zero_stage == 3:
        z.update({"contiguous_gradients": True, "overlap_comm": False, "reduce_bucket_size": bucket,
                  "stage3_prefetch_bucket_size": bucket, "stage3_param_persistence_threshold": 0,
                  "stage3_gather_16bit_weights_on_model_save": False})
    if train.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 500,
                       "hysteresis": 2, "min_loss_scale": 1}
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


def build_optimizer(groups: List[Dict[str, Any]], optim: OptimCfg, lr: float,
                    fused: Optional[bool] = None) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` over ``groups`` (each may carry ``lr_scale``); ``fused`` picks the fused kernel
    (one launch for all parameters; None: torch's default, the multi-tensor ``foreach`` kernel)."""
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        g["lr"] = lr * g["lr_scale"]
    kw: Dict[str, Any] = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay, **kw)


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, config: Dict[str, Any]):
    """``deepspeed.initialize`` (reuses the launcher's process group; a single process outside a launcher,
    such as a benchmark, gets one of its own). Returns the engine."""
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    engine, _opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                              dist_init_required=False)
    return engine


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the lr of every group of the torch optimizer (times the group's ``lr_scale``)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def engine_dtype(train: TrainCfg) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[train.precision]


def gather_ctx(zero_stage: int) -> Callable[[Iterable[nn.Parameter]], Any]:
    """A context-manager factory that makes full parameters visible (ZeRO-3 gathers; else a no-op).

    Used by the EMA teacher update: ``with gather(student.parameters()): ...``.
    """
    if zero_stage != 3:
        return lambda params: contextlib.nullcontext()
    import deepspeed

    return lambda params: deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def consolidated_state_dict(engine, zero_stage: int) -> Optional[Dict[str, torch.Tensor]]:
    """Full fp32 weights on rank 0 (None on other ranks). Every rank must call this (ZeRO-3 gathers)."""
    module = engine.module
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if zero_stage == 3:
        import deepspeed

        out: Dict[str, torch.Tensor] = {}
        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    out[name] = p.detach().float().cpu().clone()
        if rank != 0:
            return None
        for name, b in module.named_buffers():
            out[name] = b.detach().cpu().clone()
        return out
    if rank != 0:
        return None
    sd = {}
    for k, v in module.state_dict().items():
        v = v.detach().cpu()
        sd[k] = v.float().clone() if v.is_floating_point() else v.clone()
    return sd
