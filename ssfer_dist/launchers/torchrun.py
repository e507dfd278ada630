"""The torchrun launcher: ``torchrun --nproc-per-node N -m ssfer_dist.launchers.torchrun CONFIG [--set KEY=VALUE ...]``.

The same loop as under Ray Train (:func:`ssfer_dist.train.loop.run_worker`) with a :class:`TorchrunContext`:
rank and world size from torchrun's environment, NCCL on CUDA (gloo on the CPU). ``scaling.num_workers`` is the
world torchrun started. Rank 0 runs the pre-flight and hands the launch plan to the other ranks, and prints the
progress and the result line; the run folder, checkpoints (with their ``_COMMITTED`` markers), ``metrics.jsonl``
and ``export/`` are those of a Ray run, so a run resumes from its newest committed checkpoint under either
launcher. The checkpoint to resume from is the run's newest committed one; rank 0 prunes all but
``checkpoint.num_to_keep`` after each commit.

``ssfer run CONFIG --launcher torchrun`` (:class:`TorchrunLauncher`) starts this on one machine. For several
nodes start torchrun on each (``--nnodes``, ``--rdzv-endpoint``; a Slurm ``srun`` works the same way); every
node must reach ``run.storage`` (an ``s3://`` bucket, or a shared file system).

Exit status: 0 done, 2 bad input (one line on stderr), 1 a failed run (one line naming the cause).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import yaml

from ssfer_dist import console, storage
from ssfer_dist.config import Config, absolute_paths, to_dict
from ssfer_dist.distributed import faults
from ssfer_dist.train.checkpoint import latest_complete, prune_committed
from ssfer_dist.distributed.context import CheckpointRef, Upload, WorkerContext
from ssfer_dist.errors import UserError
from ssfer_dist.launchers.base import Launcher, RunResult, check_gpus, export_url, preflight, run_url
from ssfer_dist.train.loop import run_worker
from ssfer_dist.plan import LaunchPlan
from ssfer_dist.stages import load_stage_config

log = logging.getLogger("ssfer_dist.launchers.torchrun")

__all__ = ["TorchrunLauncher", "TorchrunContext", "torchrun_command", "run_torchrun", "main"]

PROG = "ssfer_dist.launchers.torchrun"


class TorchrunContext(WorkerContext):
    """Under torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` set by it."""

    name = "torchrun"

    def __init__(self, run_url: str, use_cuda: bool, timeout_s: float) -> None:
        import torch
        import torch.distributed as dist

        missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
                   if k not in os.environ]
        if missing:
            raise RuntimeError(f"not started by torchrun: {', '.join(missing)} not set (run "
                               f"`torchrun --nproc-per-node N -m {PROG} CONFIG` or "
                               "`ssfer run CONFIG --launcher torchrun`)")
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.run_url = run_url
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            backend = "gloo"
            kw: Dict[str, Any] = {}
            if use_cuda:
                torch.cuda.set_device(self.local_rank)
                backend = "nccl"
                kw["device_id"] = torch.device("cuda", self.local_rank)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout_s)), **kw)

    def setup_logging(self) -> None:
        if self.rank != 0:                # torchrun interleaves every rank's stderr: rank 0 speaks for all
            logging.getLogger("ssfer_dist").setLevel(logging.WARNING)

    def latest_checkpoint(self) -> Optional[CheckpointRef]:
        url = latest_complete(self.run_url)
        return CheckpointRef(url) if url else None

    def report(self, metrics: Dict[str, Any]) -> None:
        return None                      # rank 0's MetricsLog already wrote metrics.jsonl / TensorBoard

    def report_checkpoint(self, metrics: Dict[str, Any], local_dir: str, name: str, upload: Upload) -> None:
        upload(local_dir)

    def after_commit(self, run_url: str, num_to_keep: int) -> None:
        if num_to_keep and num_to_keep > 0:
            prune_committed(run_url, num_to_keep)

    def close(self) -> None:
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ driver side


def torchrun_command(config_path: str, overrides: List[str], nproc: int) -> List[str]:
    """The command ``ssfer run --launcher torchrun`` runs: torchrun on this machine, ``nproc`` ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nproc)}",
           "-m", PROG, config_path]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def run_torchrun(config_path: str, overrides: List[str], nproc: int, timeout_s: Optional[float] = None) -> int:
    """Run one stage under torchrun on this machine; its ranks print the progress and the result line."""
    cmd = torchrun_command(config_path, overrides, nproc)
    log.info("starting %d ranks under torchrun: %s", nproc, " ".join(cmd[1:]))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")      # torchrun's default too; the loop sets its own thread count
    # `-m` runs this module after its package imported it (the package names every launcher): runpy's
    # warning about that says nothing to a user
    env.setdefault("PYTHONWARNINGS", "ignore::RuntimeWarning:runpy")
    proc = subprocess.Popen(cmd, env=env)
    try:
        rc = proc.wait(timeout=timeout_s)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=60)
        raise
    if rc not in (0, 2):
        log.error("torchrun exited with status %d", rc)
        return 1
    return rc


class TorchrunLauncher(Launcher):
    """``scaling.num_workers`` ranks on this machine, no Ray. A config built in code is written as YAML (the
    ranks read a file) to ``config_dir/<file_stem or run.name>.yaml`` (kept for the user) or a temporary folder."""

    name = "torchrun"

    def run(self, cfg: Config, plan: Optional[LaunchPlan] = None, label: Optional[str] = None) -> RunResult:
        with contextlib.ExitStack() as stack:
            folder = self.config_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="ssfer-config-"))
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{self.file_stem or cfg.run.name}.yaml")
            with open(path, "w", encoding="utf-8") as f:
                yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
            rc = run_torchrun(path, [], cfg.scaling.num_workers)
        url = run_url(cfg)
        if rc != 0:
            raise UserError(f"run {cfg.run.name} failed under torchrun (exit {rc}); see "
                            f"{storage.join(url, 'logs', 'ssfer.log')}")
        return RunResult(run_url=url, export_path=export_url(url), metrics={})

    def run_from_cli(self, config_path: str, overrides: List[str], cfg: Config) -> int:
        self.check_machine(cfg)            # the machine first: nothing is read or written when it cannot run
        return run_torchrun(config_path, overrides, cfg.scaling.num_workers)


# ------------------------------------------------------------------------------------------ each rank


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}",
                                description="One training stage under torchrun (see `ssfer run --launcher torchrun`).")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    return p


def _final_metrics(run: str) -> dict:
    try:
        lines = storage.get_bytes(storage.join(run, "metrics.jsonl")).decode().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    except Exception:  # noqa: BLE001 - the result line names what it can
        return {}
    return {k: v for k, v in last.items() if isinstance(v, (int, float)) and k not in ("time", "batch_digest")}


def _context(argv: Optional[List[str]]):
    """The config (the world torchrun started is ``scaling.num_workers``), the GPU check and the process group."""
    a = _parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "0") or 0)
    overrides = list(a.overrides) + ([f"scaling.num_workers={world}"] if world else [])
    cfg = absolute_paths(load_stage_config(a.config, overrides))
    check_gpus(cfg, local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    ctx = TorchrunContext(run_url(cfg), use_cuda=bool(cfg.scaling.use_gpu),
                          timeout_s=cfg.failure.collective_timeout_s)
    return cfg, ctx


def _shared_plan(cfg: Config, ctx: TorchrunContext):
    """Rank 0 runs the pre-flight (reads manifests, checks storage) and hands the plan — or its error — to all."""
    import torch.distributed as dist

    box: list = [None]
    if ctx.rank == 0:
        try:
            box[0] = ("plan", preflight(cfg))
        except UserError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _train(cfg: Config, ctx: TorchrunContext, plan: LaunchPlan) -> int:
    payload = {"config": to_dict(cfg), "plan": plan, "env": {}, "label": plan.stage}
    started = time.time()
    try:
        if ctx.rank != 0:
            run_worker(payload, ctx)
            return 0
        with console.log_file(plan.run_url) as log_path:
            log.info("[%s] run %s under torchrun: %d ranks, %d steps, global batch %d → %s (log: %s)",
                     plan.stage, cfg.run.name, ctx.world_size, plan.total_steps, plan.global_batch,
                     plan.run_url, log_path)
            run_worker(payload, ctx)
        return 0
    except Exception as e:
        why = faults.one_line(e, faults.read_causes(plan.run_url, started)) if ctx.rank == 0 else str(e)
        print(f"{PROG}: error: rank {ctx.rank}: run {cfg.run.name} failed: {why.splitlines()[0] if why else e}",
              file=sys.stderr)
        return 1


def main(argv: Optional[List[str]] = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    console.setup(console.NORMAL if rank == 0 else console.QUIET)
    try:
        cfg, ctx = _context(argv)
    except (UserError, RuntimeError) as e:         # bad config, no GPU, not started by torchrun
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    storage.set_retry_budget(cfg.run.storage_retry_s)
    try:
        kind, value = _shared_plan(cfg, ctx)
        if kind == "error":
            if ctx.rank == 0:
                print(f"{PROG}: error: {value}", file=sys.stderr)
            return 2
        code = _train(cfg, ctx, value)
    finally:
        ctx.close()
    if code == 0 and ctx.rank == 0:
        print(json.dumps({"run": value.run_url, "export": export_url(value.run_url),
                          "final": _final_metrics(value.run_url), "launcher": "torchrun"}, sort_keys=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
