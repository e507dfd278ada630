"""Test machinery for the processes the tests start, installed by ``sitecustomize.py`` beside this file.

Production code knows nothing of it: when ``ssfer_dist``'s modules are imported, a post-import hook wraps them.

- **Fault injection** (``SSFER_TEST_FAULT``: a JSON spec, or ``SSFER_TEST_FAULT_FILE``: a file holding one,
  read at every check, so a test can arm a Ray cluster that is already running). The spec
  ``{"step": s, "rank": r, "kind": k, "marker": path}`` fires once (the marker file is created when it
  fires) on rank ``r``:

  - ``error``: :class:`InjectedFault` right after the loop's step body ran step ``s``
    (``ssfer_dist.train.step.train_step``; a transient fault, retried like a lost worker);
  - ``stall``: the worker freezes there instead (a hung peer or loader: only the stall watchdog or the
    collective timeout end it);
  - ``enospc_upload``: rank ``r``'s upload of ``checkpoint_<s>`` fails half-way with ENOSPC, as a full disk
    would (``ssfer_dist.train.checkpoint.upload_part``).

- **Collective guard** (``SSFER_TEST_COMM_GUARD=1``): every collective that ``ssfer_dist`` code calls outside
  ``ssfer_dist.distributed.collectives`` raises :class:`CommGuardError`, and every tensor that module hands
  to ``torch.distributed`` must be on its communication device (NCCL rejects host tensors; gloo accepts
  anything, so CPU runs cannot show it otherwise). DeepSpeed's and torch's own calls pass untouched.
"""
from __future__ import annotations

import errno
import functools
import importlib.abc
import inspect
import json
import logging
import os
import re
import sys
import time
from typing import Callable, Dict, Optional, Sequence

FAULT_ENV = "SSFER_TEST_FAULT"
FAULT_FILE_ENV = "SSFER_TEST_FAULT_FILE"
GUARD_ENV = "SSFER_TEST_COMM_GUARD"
KINDS = ("error", "stall", "enospc_upload")
DOOR = "ssfer_dist.distributed.collectives"

log = logging.getLogger("ssfer_test_hooks")


class InjectedFault(RuntimeError):
    """The fault injector's error (a transient fault: not one the classifier calls permanent)."""


class CommGuardError(RuntimeError):
    """A collective of ``ssfer_dist`` bypassed its collectives module, or was handed a tensor off the
    communication device."""


# ------------------------------------------------------------------------------------------ faults


def fault_spec() -> Optional[dict]:
    """The armed fault, or None."""
    raw = os.environ.get(FAULT_ENV)
    if not raw:
        path = os.environ.get(FAULT_FILE_ENV)
        try:
            with open(path or "", encoding="utf-8") as f:
                raw = f.read()
        except OSError:
            return None
    return json.loads(raw) if raw.strip() else None


def _due(step: int, rank: int, kinds: Sequence[str]) -> Optional[dict]:
    """The spec when it fires here (at most once per marker file: created atomically when it fires)."""
    spec = fault_spec()
    if spec is None or spec["step"] != step or spec["rank"] != rank or spec["kind"] not in kinds:
        return None
    marker = spec.get("marker")
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as f:
            f.write(f"{spec['kind']} at step {step} on rank {rank}\n")
    return spec


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def wrap_train_step(module) -> None:
    """``train_step`` raises or freezes after the armed step (see the module docstring)."""
    orig = module.train_step
    sig = inspect.signature(orig)

    @functools.wraps(orig)
    def train_step(*args, **kwargs):
        out = orig(*args, **kwargs)
        step, rank = sig.bind(*args, **kwargs).arguments["step"], _rank()
        spec = _due(step, rank, ("error", "stall"))
        if spec is not None and spec["kind"] == "stall":
            log.warning("injected stall at step %d on rank %d", step, rank)
            while True:
                time.sleep(3600)
        if spec is not None:
            raise InjectedFault(f"injected fault at step {step} on rank {rank}")
        return out

    module.train_step = train_step


def wrap_upload_part(module) -> None:
    """``upload_part`` of the armed checkpoint stops half-way with ENOSPC on the armed rank."""
    orig = module.upload_part

    @functools.wraps(orig)
    def upload_part(local_dir: str, dest_url: str, rank: int, world: int):
        m = re.fullmatch(r"checkpoint_(\d+)", dest_url.rstrip("/").rsplit("/", 1)[-1])
        if m and _due(int(m.group(1)), rank, ("enospc_upload",)):
            _upload_half_then_enospc(local_dir, dest_url)
        return orig(local_dir, dest_url, rank, world)

    module.upload_part = upload_part


def _upload_half_then_enospc(local_dir: str, dest_url: str) -> None:
    from ssfer_dist import storage

    names = sorted(os.path.relpath(os.path.join(root, n), local_dir).replace(os.sep, "/")
                   for root, _dirs, files in os.walk(local_dir) for n in files)
    for name in names[:len(names) // 2]:
        storage.put_file(os.path.join(local_dir, name), storage.join(dest_url, name))
    target = storage.join(dest_url, names[len(names) // 2]) if names else dest_url
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)


# ------------------------------------------------------------------------------------------ guard

_GUARDED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
            "broadcast", "reduce", "all_to_all_single", "barrier", "all_gather_object", "broadcast_object_list",
            "gather", "scatter")


def install_guard(_module=None) -> None:
    """Wrap ``torch.distributed``'s collectives with the guard (idempotent)."""
    import torch
    import torch.distributed as dist

    def wrap(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("ssfer_dist") and caller != DOOR:
                raise CommGuardError(f"torch.distributed.{name} called from {caller}, not through {DOOR}")
            t = args[0] if args else kwargs.get("tensor")
            if caller == DOOR and isinstance(t, torch.Tensor):
                want = sys.modules[DOOR].comm_device()
                if t.device != want:
                    raise CommGuardError(f"torch.distributed.{name} on a {t.device} tensor; the communication "
                                         f"device is {want}")
            return fn(*args, **kwargs)

        guarded.ssfer_guard = True
        return guarded

    for name in _GUARDED:
        fn = getattr(dist, name, None)
        if fn is not None and not getattr(fn, "ssfer_guard", False):
            setattr(dist, name, wrap(name, fn))


# ------------------------------------------------------------------------------------ post-import


class _AfterExec(importlib.abc.Loader):
    """The module's own loader, then ``after(module)``."""

    def __init__(self, inner, after: Callable) -> None:
        self.inner, self.after = inner, after

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        self.after(module)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _PostImport(importlib.abc.MetaPathFinder):
    def __init__(self, hooks: Dict[str, Callable]) -> None:
        self.hooks = hooks

    def find_spec(self, name, path, target=None):
        if name not in self.hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _AfterExec(spec.loader, self.hooks[name])
                return spec
        return None


def install() -> None:
    """The hooks the environment asks for, on the modules they wrap (now if imported, else when imported)."""
    hooks: Dict[str, Callable] = {}
    if os.environ.get(FAULT_ENV) or os.environ.get(FAULT_FILE_ENV):
        hooks["ssfer_dist.train.step"] = wrap_train_step
        hooks["ssfer_dist.train.checkpoint"] = wrap_upload_part
    if os.environ.get(GUARD_ENV) == "1":
        hooks[DOOR] = install_guard
    for name, hook in hooks.items():
        if name in sys.modules:
            hook(sys.modules[name])
    if not any(isinstance(f, _PostImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImport(hooks))
