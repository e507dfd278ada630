"""The stage registry: one module per stage, each defining ``STAGE`` (a :class:`~ssfer_dist.stages.base.Stage`).

Importing this package is cheap (no torch): ``config.py`` validates ``train.stage`` against
:func:`stage_names`, and :func:`get_stage` imports the one stage module a run needs.
Adding a stage: a module here, its name below, and its config section in ``config.py``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from ssfer_dist.stages.base import Stage

__all__ = ["STAGES", "stage_names", "get_stage"]

# registry name -> module in this package (the module defines STAGE)
STAGES = {"mae": "mae", "facemix": "facemix", "semisup": "semisup", "linear_probe": "linear_probe"}


def stage_names() -> Tuple[str, ...]:
    return tuple(STAGES)


def get_stage(name: str) -> "Stage":
    """The registered stage ``name`` (KeyError naming the valid ones otherwise)."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r} (expected one of: {', '.join(STAGES)})")
    return importlib.import_module(f"{__name__}.{STAGES[name]}").STAGE
