"""The torchrun launcher: ``torchrun --nproc-per-node N -m ssfer_dist.train CONFIG [--set KEY=VALUE ...]``.

The same loop as under Ray Train (:func:`ssfer_dist.train.loop.run_worker`) with a
:class:`~ssfer_dist.distributed.context.TorchrunContext`: rank and world size from torchrun's environment,
NCCL on CUDA (gloo on the CPU). ``scaling.num_workers`` is the world torchrun started. Rank 0 runs the
pre-flight and hands the launch plan to the other ranks; the run folder, checkpoints (with their
``_COMMITTED`` markers), ``metrics.jsonl`` and ``export/`` are those of a Ray run, so a run resumes from its
newest committed checkpoint under either launcher. ``ssfer run CONFIG --launcher torchrun`` starts this on
one machine. For several nodes start torchrun on each (``--nnodes``, ``--rdzv-endpoint``; a Slurm ``srun``
works the same way); every node must reach ``run.storage`` (an ``s3://`` bucket, or a shared file system).

Exit status: 0 done, 2 bad input (one line on stderr), 1 a failed run (one line naming the cause).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import List, Optional

log = logging.getLogger("ssfer_dist.train")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ssfer_dist.train",
                                description="One training stage under torchrun (see `ssfer run --launcher torchrun`).")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    return p


def _final_metrics(run_url: str) -> dict:
    from ssfer_dist import storage

    try:
        lines = storage.get_bytes(storage.join(run_url, "metrics.jsonl")).decode().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    except Exception:
        return {}
    return {k: v for k, v in last.items() if isinstance(v, (int, float)) and k not in ("time", "batch_digest")}


def main(argv: Optional[List[str]] = None) -> int:
    from ssfer_dist.startup import relax_gc

    relax_gc()                         # until the loop is built (ssfer_dist.startup)
    import torch
    import torch.distributed as dist

    from ssfer_dist import console, storage
    from ssfer_dist.config import to_dict
    from ssfer_dist.distributed import faults
    from ssfer_dist.distributed.context import TorchrunContext
    from ssfer_dist.distributed.launch import absolute_paths, preflight, run_url
    from ssfer_dist.errors import UserError
    from ssfer_dist.stages import load_stage_config
    from ssfer_dist.train.loop import run_worker

    a = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    console.setup(console.NORMAL if rank == 0 else console.QUIET)
    prog = "ssfer_dist.train"
    try:
        world = int(os.environ.get("WORLD_SIZE", "0") or 0)
        overrides = list(a.overrides)
        if world:
            overrides.append(f"scaling.num_workers={world}")     # the world torchrun started
        cfg = absolute_paths(load_stage_config(a.config, overrides))
        if cfg.scaling.use_gpu:
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            if have < local:
                raise UserError(f"scaling.use_gpu: true, but this machine has {have} CUDA GPU(s) for {local} "
                                "local ranks (torchrun --nproc-per-node); set scaling.use_gpu: false to train on "
                                "the CPU")
        ctx = TorchrunContext(run_url(cfg), use_cuda=bool(cfg.scaling.use_gpu),
                              timeout_s=cfg.failure.collective_timeout_s)
    except (UserError, RuntimeError) as e:         # bad config, no GPU, not started by torchrun
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2

    storage.set_retry_budget(cfg.run.storage_retry_s)
    # Rank 0 runs the pre-flight (reads manifests, checks storage) and hands the plan — or its error — to all.
    box: list = [None]
    if ctx.rank == 0:
        try:
            box[0] = ("plan", preflight(cfg))
        except UserError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        if ctx.rank == 0:
            print(f"{prog}: error: {value}", file=sys.stderr)
        ctx.close()
        return 2
    plan = value
    payload = {"config": to_dict(cfg), "plan": plan, "env": {}, "label": plan.stage}
    code = 0
    started = time.time()
    try:
        if ctx.rank == 0:
            with console.log_file(plan.run_url) as log_path:
                log.info("[%s] run %s under torchrun: %d ranks, %d steps, global batch %d → %s (log: %s)",
                         plan.stage, cfg.run.name, ctx.world_size, plan.total_steps, plan.global_batch,
                         plan.run_url, log_path)
                run_worker(payload, ctx)
        else:
            run_worker(payload, ctx)
    except Exception as e:
        why = faults.one_line(e, faults.read_causes(plan.run_url, started)) if ctx.rank == 0 else str(e)
        print(f"{prog}: error: rank {ctx.rank}: run {cfg.run.name} failed: {why.splitlines()[0] if why else e}",
              file=sys.stderr)
        code = 1
    finally:
        ctx.close()
    if code == 0 and ctx.rank == 0:
        print(json.dumps({"run": plan.run_url, "export": storage.join(plan.run_url, "export", "model.safetensors"),
                          "final": _final_metrics(plan.run_url), "launcher": "torchrun"}, sort_keys=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
