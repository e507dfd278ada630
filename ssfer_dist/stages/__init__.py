"""The stage registry: one module per stage, each defining ``STAGE`` (a :class:`~ssfer_dist.stages.base.Stage`).

Importing this package is cheap (no torch): :func:`get_stage` imports the one stage module a run needs.
The registry validates what depends on the stage after the typed config has checked the shared keys:
:func:`load_stage_config` is how a run loads its config, :func:`check_stage_config` checks one built otherwise.
Adding a stage: a module here, its name below, and its config section in ``config.py``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, List, Optional, Tuple

from ssfer_dist.config import Config, ConfigError, load_config

if TYPE_CHECKING:  # pragma: no cover
    from ssfer_dist.stages.base import Stage

__all__ = ["STAGES", "stage_names", "get_stage", "check_stage_config", "load_stage_config"]

# registry name -> module in this package (the module defines STAGE)
STAGES = {"mae": "mae", "facemix": "facemix", "semisup": "semisup", "linear_probe": "linear_probe"}


def stage_names() -> Tuple[str, ...]:
    return tuple(STAGES)


def get_stage(name: str) -> "Stage":
    """The registered stage ``name`` (KeyError naming the valid ones otherwise)."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r} (expected one of: {', '.join(STAGES)})")
    return importlib.import_module(f"{__name__}.{STAGES[name]}").STAGE


def check_stage_config(cfg: Config, source: str = "<config>") -> Config:
    """``cfg`` checked against its stage: ``train.stage`` is registered and the stage's own cross-field checks
    pass. Raises :class:`ConfigError` as ``"<source>: <key>: <what was expected>"``; returns ``cfg``."""
    if cfg.train.stage not in STAGES:
        raise ConfigError(f"{source}: train.stage: unknown stage {cfg.train.stage!r} "
                          f"(expected one of: {', '.join(STAGES)})")
    problems: List[Tuple[str, str]] = get_stage(cfg.train.stage).config_problems(cfg)
    if problems:
        key, msg = problems[0]
        raise ConfigError(f"{source}: {key}: {msg}")
    return cfg


def load_stage_config(path: str, overrides: Optional[List[str]] = None) -> Config:
    """A stage YAML as a run uses it: :func:`ssfer_dist.config.load_config` (shared keys, ``--set`` overrides,
    absolute paths) followed by :func:`check_stage_config`."""
    return check_stage_config(load_config(path, overrides), path)
