"""Process start-up: Python's cyclic garbage collector while a run's processes import their libraries.

Every process of a run spends its first seconds importing torch, Ray Train, timm and DeepSpeed: about 880,000
objects that live as long as the process. With CPython's default thresholds (700, 10, 10) the collector
keeps walking that growing heap meanwhile. Measured on this 2-core machine (``import torch, ray.train.torch,
timm, deepspeed`` in a fresh interpreter, 2 runs each): 5.05-5.2 s by default, 4.2-4.4 s with the first
threshold at 50,000, 4.2-4.7 s with the collector off. On two cores a run starts five such processes.

:func:`relax_gc` raises the thresholds for the start-up (the CLI, the torchrun ranks, every Ray worker process
of a private local Ray through its ``worker_process_setup_hook``, and on a cluster the Ray Train workers from
the start of the train function, which then imports timm and DeepSpeed); :func:`settle_gc` puts the previous
thresholds back once a training worker is built, and ``gc.freeze()``s what start-up allocated: those objects
live until the process ends, later collections skip them, and the DataLoader processes forked next do not
copy the pages a collection would touch. Nothing is ever left uncollected: cycles are found by the next
collection, only later. Ray's own actors on a private instance (controller, synchronisation) keep the relaxed
thresholds; they allocate little after start.
"""
from __future__ import annotations

import gc
from typing import Optional, Tuple

__all__ = ["START_THRESHOLDS", "relax_gc", "settle_gc"]

START_THRESHOLDS = (50_000, 10, 10)

_saved: Optional[Tuple[int, int, int]] = None


def relax_gc() -> None:
    """Raise the collector's thresholds to :data:`START_THRESHOLDS` (idempotent)."""
    global _saved
    if _saved is None:
        _saved = gc.get_threshold()
        gc.set_threshold(*START_THRESHOLDS)


def settle_gc() -> None:
    """Back to the thresholds :func:`relax_gc` found, and freeze what start-up allocated. A no-op in a
    process that did not relax them (e.g. a test running the loop in-process)."""
    global _saved
    if _saved is None:
        return
    gc.set_threshold(*_saved)
    _saved = None
    gc.freeze()
