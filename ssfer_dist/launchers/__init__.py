"""Launchers: one :class:`~ssfer_dist.launchers.base.Launcher` interface, Ray Train and torchrun behind it
(one module each). Apps (cli, demo, sweep) call this package: :func:`get_launcher`, :func:`run_config` (a
config built in code), :func:`run_from_cli` (``ssfer run``) and the pipeline helpers (``ssfer pipeline``:
pretrain → FaceMix → semi-supervised, each from the previous export, on one Ray)."""
from __future__ import annotations

import json
import sys
from typing import Dict, List, Optional, Type

from ssfer_dist import console
from ssfer_dist.config import Config, load_pipeline
from ssfer_dist.errors import UserError
from ssfer_dist.launchers import ray as ray_launcher
from ssfer_dist.launchers.base import (Launcher, RunResult, dry_run_text, export_url, planned_steps, preflight,
                                       run_url)
from ssfer_dist.launchers.torchrun import TorchrunLauncher
from ssfer_dist.stages import load_stage_config

__all__ = ["Launcher", "RunResult", "LAUNCHERS", "get_launcher", "run_config", "run_from_cli", "preflight",
           "planned_steps", "run_url", "pipeline_configs", "run_pipeline", "pipeline_from_cli", "local_ray_started",
           "finish_local_ray"]

LAUNCHERS: Dict[str, Type[Launcher]] = {"ray": ray_launcher.RayLauncher, "torchrun": TorchrunLauncher}


def get_launcher(name: str, config_dir: Optional[str] = None, file_stem: Optional[str] = None) -> Launcher:
    """The launcher called ``name``. ``config_dir``/``file_stem``: where a launcher whose workers read the config
    from a file writes a config built in code (torchrun)."""
    if name not in LAUNCHERS:
        raise UserError(f"launcher: expected one of {', '.join(sorted(LAUNCHERS))}, got {name!r}")
    return LAUNCHERS[name](config_dir=config_dir, file_stem=file_stem)


def run_config(cfg: Config, launcher: str = "ray", label: Optional[str] = None,
               config_dir: Optional[str] = None, file_stem: Optional[str] = None) -> RunResult:
    """One stage from a config built in code, on either launcher."""
    return get_launcher(launcher, config_dir, file_stem).run(cfg, label=label)


def run_from_cli(config_path: str, overrides: List[str], dry_run: bool = False, launcher: str = "ray") -> int:
    """``ssfer run CONFIG [--set k=v ...] [--dry-run] [--launcher ray|torchrun]`` → exit code."""
    cfg = load_stage_config(config_path, overrides)
    if dry_run:
        sys.stdout.write(dry_run_text(cfg, config_path))
        return 0
    return get_launcher(launcher).run_from_cli(config_path, overrides, cfg)


def local_ray_started() -> Optional[str]:
    """The temp folder of a local Ray this process started (None: none)."""
    return ray_launcher.current_private()


def finish_local_ray(ok: bool) -> Optional[str]:
    """Shut down the local Ray this process started (its folder removed after success); the folder kept."""
    return ray_launcher.finish(ok)


# ------------------------------------------------------------------------------------------ pipeline

_PIPE_STAGES = ("pretrain", "finetune", "semisup")
_PIPE_KIND = {"pretrain": "mae", "finetune": "facemix", "semisup": "semisup"}


def _split_pipeline_overrides(overrides: List[str]):
    """``pretrain.x.y=v`` → stage override (unless x is config/overrides); ``*.x.y=v`` → every stage."""
    own, per_stage = [], {s: [] for s in _PIPE_STAGES}
    for o in overrides or []:
        head, _, rest = o.partition(".")
        second = rest.split("=", 1)[0].split(".", 1)[0]
        if head == "*" and rest:
            for s in _PIPE_STAGES:
                per_stage[s].append(rest)
        elif head in _PIPE_STAGES and rest and second not in ("config", "overrides"):
            per_stage[head].append(rest)
        else:
            own.append(o)
    return own, per_stage


def pipeline_configs(path: str, overrides: List[str]) -> List[Config]:
    """The three stage configs of a pipeline, each stage's ``init.weights`` set to the previous export.
    Later stages are validated against the previous stage's export path (not yet existing)."""
    own, per_stage = _split_pipeline_overrides(overrides)
    pcfg = load_pipeline(path, own)
    cfgs: List[Config] = []
    prev_export: Optional[str] = None
    for name in _PIPE_STAGES:
        st = getattr(pcfg, name)
        ov = list(st.overrides)
        if pcfg.storage:
            ov.append(f"run.storage={pcfg.storage}")
        ov += per_stage[name]
        if prev_export is not None:
            ov.append(f"init.weights={prev_export}")
        cfg = load_stage_config(st.config, ov)
        if cfg.train.stage != _PIPE_KIND[name]:
            raise UserError(f"{path}: {name}.config: {st.config} has train.stage={cfg.train.stage!r}, "
                            f"expected {_PIPE_KIND[name]!r}")
        cfgs.append(cfg)
        prev_export = export_url(run_url(cfg))
    return cfgs


def run_pipeline(path: str, overrides: List[str]) -> List[RunResult]:
    """pretrain → FaceMix → semi-supervised, each from the previous export, on one Ray instance."""
    cfgs = pipeline_configs(path, overrides)
    launcher = get_launcher("ray")
    first = launcher.plan(cfgs[0])     # fail early for the first stage; later stages are checked before they start
    steps = [planned_steps(c) for c in cfgs]
    results = []
    for i, (name, cfg) in enumerate(zip(_PIPE_STAGES, cfgs)):
        with console.stage(i + 1, len(cfgs), name, future_steps=steps[i + 1:]):
            results.append(launcher.run(cfg, first if i == 0 else preflight(cfg), label=name))
    return results


def pipeline_from_cli(config_path: str, overrides: List[str], dry_run: bool = False) -> int:
    """``ssfer pipeline CONFIG [--set ...] [--dry-run]`` → exit code."""
    if dry_run:
        for cfg in pipeline_configs(config_path, overrides):
            sys.stdout.write(dry_run_text(cfg, f"{config_path} [{cfg.train.stage}]") + "\n")
        return 0
    results = run_pipeline(config_path, overrides)
    print(json.dumps({"stages": [{"run": r.run_url, "export": r.export_path} for r in results]}, sort_keys=True))
    return 0

