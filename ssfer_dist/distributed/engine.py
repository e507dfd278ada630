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


def ds_config(train: TrainCfg, batch_size_per_rank: int, global_batch: int) -> Dict[str, Any]:
    """The DeepSpeed JSON config for a stage (no optimizer/scheduler sections: we pass our own).
    ``global_batch`` is the launch plan's (batch_size_per_rank x ranks x grad_accum); DeepSpeed checks it."""
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


@contextlib.contextmanager
def _zero3_fp32_master_is_param():
    """Let ZeRO-3 use the fp32 parameter partition as its fp32 master partition instead of a copy.

    DeepSpeed's stage-3 optimizer (``_create_fp32_partitions``) means to skip the master copy when
    the parameter partition already has the master dtype and device ("we don't need another copy of
    the weights"), but it compares ``tensor.device`` (a ``torch.device``) with ``self.device`` (the
    accelerator's device *name*, a string), and ``torch.device("cpu") == "cpu"`` is False in torch 2.x,
    so fp32 ZeRO-3 always keeps a second fp32 copy of every partition: 4 bytes per parameter / ranks
    more than needed. For the duration of that one call ``self.device`` becomes the ``torch.device``
    it names, so the comparison works and DeepSpeed takes its own no-copy path (the one it takes
    under torch autocast): the optimizer then updates the parameter partition in place, and the
    later fp32 -> param copy is a copy onto itself. Optimizer offload is left alone. Nothing changes
    when DeepSpeed is fixed upstream (the comparison then already holds).
    """
    try:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Z3
    except ImportError:  # pragma: no cover - DeepSpeed layout changed: nothing to patch
        yield
        return
    orig = getattr(Z3, "_create_fp32_partitions", None)
    if orig is None:  # pragma: no cover - renamed upstream: DeepSpeed's own behaviour
        yield
        return

    def create(self):
        dev = getattr(self, "device", None)
        if getattr(self, "offload_optimizer", True) or not isinstance(dev, str):
            return orig(self)
        self.device = torch.device(dev)
        try:
            return orig(self)
        finally:
            self.device = dev

    Z3._create_fp32_partitions = create
    try:
        yield
    finally:
        Z3._create_fp32_partitions = orig


def _skip_cpu_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU communication backend from loading its shared-memory all-reduce op.

    On the CPU accelerator ``deepspeed.comm`` JIT-compiles (first time) or loads (under a file lock in
    ``TORCH_EXTENSIONS_DIR``, shared by every worker) ``deepspeed_shm_comm`` in each process, and first
    probes every op builder with compiler subprocesses. The op only serves ``inference_all_reduce``;
    training collectives go through ``torch.distributed`` (gloo) either way. Marking it incompatible
    before the backend starts skips the probe, the build and its "built successfully" line: minutes per
    worker on a busy 2-core machine. GPU runs never take this path."""
    import deepspeed.ops

    ops = vars(deepspeed.ops)
    compatible = ops.get("__compatible_ops__")
    if compatible is None:            # not probed yet (the probe is lazy): set it without probing
        compatible = ops["__compatible_ops__"] = {}
    compatible["deepspeed_shm_comm"] = False


_MUON_MODULES = ("deepspeed.runtime.zero.muon.original_muon", "deepspeed.runtime.zero.muon.muon_optimizer")


def _import_muon_with_lazy_compile() -> None:
    """Import DeepSpeed's Muon modules with their ``torch.compile`` deferred to the first call.

    ZeRO's optimizer check and gradient reduction import ``deepspeed.runtime.zero.muon`` to ask whether the
    optimizer is a ``MuonWithAuxAdam`` (DeepSpeed's comment: "importing Muon compiles its kernels"). Its three
    ``@compiler.compile()`` decorators build ``torch.compile`` wrappers at import, which imports
    ``torch._inductor``: 1.3-1.5 s of one CPU per rank before the first step (measured here), for an
    optimizer this system never builds (:func:`build_optimizer`: AdamW). Here the same modules are imported
    with DeepSpeed's ``compiler.compile`` returning a decorator that calls ``torch.compile`` on first use:
    the classes and functions are DeepSpeed's own, and a run that did use Muon would compile on its first
    update instead of at import. A process that imported them before keeps what it has."""
    import functools
    import importlib
    import sys

    if all(m in sys.modules for m in _MUON_MODULES):
        return
    from deepspeed.runtime import compiler

    eager_compile = compiler.compile

    def lazy_compile():
        def decorate(fn):
            compiled = None

            @functools.wraps(fn)
            def call(*args, **kwargs):
                nonlocal compiled
                if compiled is None:
                    compiled = eager_compile()(fn)
                return compiled(*args, **kwargs)

            return call

        return decorate

    compiler.compile = lazy_compile
    try:
        for m in _MUON_MODULES:
            importlib.import_module(m)
    except ImportError:          # a DeepSpeed without Muon: nothing to defer
        pass
    finally:
        compiler.compile = eager_compile


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, config: Dict[str, Any]):
    """``deepspeed.initialize`` (reuses the process group Ray Train created). Returns the engine.
    fp32 ZeRO-3 keeps no second fp32 copy of the partitions (see ``_zero3_fp32_master_is_param``).
    On CPU, DeepSpeed's shared-memory op is not built (``_skip_cpu_shm_comm_op``); on any device its Muon
    kernels are not compiled to check ours (``_import_muon_with_lazy_compile``)."""
    import deepspeed

    if not torch.cuda.is_available():
        _skip_cpu_shm_comm_op()

    if not torch.distributed.is_initialized():  # a single process outside Ray (benchmarks, tools)
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    fp32_zero3 = (config.get("zero_optimization", {}).get("stage") == 3
                  and not config.get("bf16", {}).get("enabled") and not config.get("fp16", {}).get("enabled"))
    _import_muon_with_lazy_compile()
    with _zero3_fp32_master_is_param() if fp32_zero3 else contextlib.nullcontext():
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
