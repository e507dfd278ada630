"""The GPU fast path: which speed switches are on for a worker's device, and applying them.

Each is a config key with an automatic default (``null`` = auto) that is on where it helps — on CUDA —
and off elsewhere; an explicit ``true`` is honoured where the machine can do it:

- ``data.pin_memory``          pinned loader batches → asynchronous host-to-device copies (auto: CUDA)
- ``optim.fused``              fused AdamW kernel (auto: CUDA; torch also fuses on CPU when asked)
- ``train.tf32``               TF32 for fp32 matmuls / convolutions (CUDA only; bf16 runs are unaffected)
- ``train.compile``            ``torch.compile`` of the trained module in place (auto: CUDA with ZeRO 0–2;
                               ZeRO-3's parameter hooks break graphs); ``true`` without a compiler → ConfigError
- ``model.grad_checkpointing`` activation checkpointing of the ViT / MAE blocks (timm's; off by default:
                               trades ~25-30 % more compute for activation memory, for ViT-L/H at large batch)
- ``train.precision``          bf16 through DeepSpeed (the production configs' choice on GPUs)

:func:`resolve` is called by the worker on its own device and by ``ssfer run --dry-run`` for this machine.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from typing import List, Optional, Tuple

import torch
from torch import nn

from ssfer_dist.config import Config
from ssfer_dist.typed import ConfigError

__all__ = ["FastPath", "resolve", "apply_backend_flags", "apply_to_model", "compiler_problem", "describe", "summary"]


@dataclasses.dataclass(frozen=True)
class FastPath:
    device: str                       # "cuda" | "cpu": the device type the switches were resolved for
    pin_memory: bool
    fused: bool
    tf32: bool
    compile: bool
    grad_checkpointing: bool
    precision: str
    notes: Tuple[str, ...] = ()       # why an automatic switch is off
    why_off: Tuple[Tuple[str, str], ...] = ()     # (switch, reason) for each note, in the same order


CPP_COMPILERS = ("g++", "c++", "clang++")    # what torch.compile's CPU backend looks for, unless $CXX names one


def compiler_problem(device: str) -> Optional[str]:
    """Why ``torch.compile`` cannot generate code for ``device`` here (None: it can): triton for CUDA,
    a C++ compiler (``$CXX``, else one of :data:`CPP_COMPILERS` on the PATH) for the CPU."""
    if device == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "triton (torch.compile's GPU code generator) is not installed"
        return None
    names = [os.environ["CXX"]] if os.environ.get("CXX") else list(CPP_COMPILERS)
    if any(shutil.which(n) is not None or os.path.isfile(n) for n in names):
        return None
    return f"the C++ compiler ({', '.join(names)}) that torch.compile's CPU backend needs was not found"


def resolve(cfg: Config, device: str) -> FastPath:
    """The switches for a worker whose training device type is ``device``; ConfigError for an explicit
    ``train.compile: true`` the machine cannot honour."""
    cuda = device == "cuda"
    notes: List[Tuple[str, str, str]] = []          # (switch, what happened, why)

    def auto(value: Optional[bool], key: str, default_on: bool, why_off: str) -> bool:
        if value is not None:
            return bool(value)
        if not default_on:
            notes.append((key, "auto-off", why_off))
        return default_on

    pin = auto(cfg.data.pin_memory, "data.pin_memory", cuda, "no CUDA device")
    if pin and not cuda:
        notes.append(("data.pin_memory", "off", "pinned memory needs a CUDA device"))
        pin = False
    fused = auto(cfg.optim.fused, "optim.fused", cuda, "no CUDA device")
    tf32 = bool(cfg.train.tf32) and cuda
    if cfg.train.tf32 and not cuda:
        notes.append(("train.tf32", "no effect", "no CUDA device"))
    zero3 = cfg.train.zero_stage == 3
    comp = auto(cfg.train.compile, "train.compile", cuda and not zero3,
                "ZeRO-3 partitions parameters" if cuda else "no CUDA device")
    if comp:
        why = compiler_problem(device)
        if why is not None:
            if cfg.train.compile:     # asked for explicitly: a clear error
                raise ConfigError(f"train.compile: true, but {why}; install it or set train.compile: false")
            notes.append(("train.compile", "auto-off", why))
            comp = False
    return FastPath(device=device, pin_memory=pin, fused=fused, tf32=tf32, compile=comp,
                    grad_checkpointing=bool(cfg.model.grad_checkpointing), precision=cfg.train.precision,
                    notes=tuple(f"{key}: {what} ({why})" for key, what, why in notes),
                    why_off=tuple((key, why) for key, _, why in notes))


def summary(fp: FastPath) -> str:
    """One console line: the device and precision, the switches on, and the switches off with why
    (``cpu, fp32; off: data.pin_memory, optim.fused, train.compile (no CUDA device), ...``)."""
    switches = {"data.pin_memory": fp.pin_memory, "optim.fused": fp.fused, "train.tf32": fp.tf32,
                "train.compile": fp.compile, "model.grad_checkpointing": fp.grad_checkpointing}
    why = dict(reversed(fp.why_off))          # a switch's first reason
    on = [k for k, v in switches.items() if v]
    off: dict = {}
    for k, v in switches.items():
        if not v:
            off.setdefault(why.get(k, "config"), []).append(k)
    parts = [f"{fp.device}, {fp.precision}"]
    if on:
        parts.append("on: " + ", ".join(on))
    if off:
        parts.append("off: " + "; ".join(f"{', '.join(keys)} ({reason})" for reason, keys in off.items()))
    return "; ".join(parts)


def apply_backend_flags(fp: FastPath) -> None:
    """Process-wide backend switches (TF32 for fp32 matmuls and cuDNN convolutions on CUDA)."""
    if fp.device != "cuda":
        return
    prec = "tf32" if fp.tf32 else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):      # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = prec
        torch.backends.cudnn.conv.fp32_precision = prec
    else:  # pragma: no cover - older torch
        torch.backends.cuda.matmul.allow_tf32 = fp.tf32
        torch.backends.cudnn.allow_tf32 = fp.tf32
        torch.set_float32_matmul_precision("high" if fp.tf32 else "highest")


def apply_to_model(fp: FastPath, model: nn.Module) -> nn.Module:
    """Activation checkpointing (models with timm's ``set_grad_checkpointing``: ViT classifiers, MAE) and
    ``torch.compile`` in place (``nn.Module.compile``: parameter names, hence checkpoints and exports, keep
    their names). Returns ``model``."""
    if fp.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(f"model.grad_checkpointing: {type(model).__name__} has no set_grad_checkpointing")
        model.set_grad_checkpointing(True)
    if fp.compile:
        model.compile()
    return model


def describe(fp: FastPath) -> List[str]:
    """Lines for ``--dry-run``."""
    def onoff(b: bool) -> str:
        return "on" if b else "off"
    lines = [f"device: {fp.device}", f"precision: {fp.precision}", f"data.pin_memory: {onoff(fp.pin_memory)}",
             f"optim.fused: {onoff(fp.fused)}", f"train.tf32: {onoff(fp.tf32)}", f"train.compile: {onoff(fp.compile)}",
             f"model.grad_checkpointing: {onoff(fp.grad_checkpointing)}"]
    return lines + [f"# {n}" for n in fp.notes]
