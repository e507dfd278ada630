"""DeepSpeed engine from the typed config: ZeRO 0–3, fp32/bf16/fp16, accumulation, clipping, AdamW.

The optimizer is a plain ``torch.optim.AdamW`` over the model's parameter groups (DeepSpeed accepts
it with ``zero_allow_untested_optimizer``); the learning rate is set by the loop every optimizer
step from :mod:`ssfer_dist.train.schedule` (a pure function of the step), so DeepSpeed runs no
scheduler of its own. Groups may carry ``lr_scale`` (layer-wise decay); :func:`set_lr` honours it.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from ssfer_dist.config import OptimCfg, TrainCfg

log = logging.getLogger(__name__)

__all__ = ["ds_config", "default_param_groups", "build_optimizer", "build_engine", "set_lr", "gather_ctx",
           "consolidated_state_dict", "engine_dtype"]


def ds_config(train: TrainCfg, batch_size_per_rank: int, world_size: int) -> Dict[str, Any]:
    """The DeepSpeed JSON config for a stage (no optimizer/scheduler sections: we pass our own)."""
    cfg: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(batch_size_per_rank),
        "gradient_accumulation_steps": int(train.grad_accum),
        "train_batch_size": int(batch_size_per_rank * train.grad_accum * world_size),
        "gradient_clipping": float(train.grad_clip) if train.grad_clip else 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": int(train.zero_stage)},
    }
    z = cfg["zero_optimization"]
    if train.zero_stage in (1, 2):
        z.update({"contiguous_gradients": True, "overlap_comm": False, "reduce_scatter": True,
                  "allgather_partitions": True})
    if train.zero_stage == 3:
        z.update({"contiguous_gradients": True, "overlap_comm": False,
                  "stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False})
    if train.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 500,
                       "hysteresis": 2, "min_loss_scale": 1}
    return cfg


def default_param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases, position embeddings and tokens (MAE recipe)."""
    skip = set()
    if hasattr(model, "no_weight_decay"):
        try:
            skip = set(model.no_weight_decay())
        except Exception:  # pragma: no cover - model-specific
            skip = set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or name in skip or leaf in ("pos_embed", "cls_token", "mask_token", "decoder_pos_embed") \
                or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0})
    return groups


def build_optimizer(groups: List[Dict[str, Any]], optim: OptimCfg, lr: float) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` over ``groups`` (each may carry ``lr_scale``)."""
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay)


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, config: Dict[str, Any]):
    """``deepspeed.initialize`` (reuses the process group Ray Train created). Returns the engine."""
    import deepspeed

    if not torch.distributed.is_initialized():  # a single process outside Ray (benchmarks, tools)
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
    # bf16/fp16 engines hold fp32 masters in the optimizer; copy them over the low-precision weights.
    if getattr(engine, "bfloat16_enabled", lambda: False)() or getattr(engine, "fp16_enabled", lambda: False)():
        masters = _fp32_masters(engine)
        if masters:
            sd.update(masters)
    return sd


def _fp32_masters(engine) -> Dict[str, torch.Tensor]:
    """fp32 master weights (ZeRO 0/1/2 with bf16/fp16); empty when not available."""
    try:
        from deepspeed.runtime.zero.utils import is_zero_param  # noqa: F401
        opt = engine.optimizer
        if hasattr(opt, "get_fp32_params") or not hasattr(opt, "bit16_groups"):
            return {}
        names = {id(p): n for n, p in engine.module.named_parameters()}
        out = {}
        fp32_groups = getattr(opt, "single_partition_of_fp32_groups", None)
        if fp32_groups is None or torch.distributed.get_world_size() > 1:
            return {}
        for g16, g32 in zip(opt.bit16_groups, fp32_groups):
            offset = 0
            for p in g16:
                n = p.numel()
                out[names[id(p)]] = g32[offset:offset + n].view_as(p).float().cpu().clone()
                offset += n
        return out
    except Exception:  # pragma: no cover - best effort
        return {}


def ds_env_defaults() -> None:
    """DeepSpeed on CPU needs ``DS_ACCELERATOR=cpu`` when no GPU is visible."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
