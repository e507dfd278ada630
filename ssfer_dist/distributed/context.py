"""What the one training loop needs from whoever launched it: rank, world size, local rank, the checkpoint to
resume from, and where metrics and checkpoints are reported.

Two implementations, one loop (:mod:`ssfer_dist.train.loop`):

- :class:`RayContext` — Ray Train's worker (the default launcher). Checkpoints are reported to Ray
  (``ray.train.report(..., checkpoint_upload_fn=...)``): Ray keeps ``checkpoint.num_to_keep`` of them and
  hands the latest back after a worker-group restart.
- :class:`TorchrunContext` — ``torchrun`` / ``torch.distributed.run`` (Slurm, plain GPU boxes, the GPU
  check): rank and world from the environment torchrun sets, the process group made here (NCCL on CUDA,
  gloo on the CPU). The checkpoint to resume from is the run's newest committed one
  (:func:`~ssfer_dist.train.checkpoint.latest_complete`); rank 0 prunes all but
  ``checkpoint.num_to_keep`` after each commit.

Both write the same run folder: ``checkpoint_<step>/`` (the same files, the same ``_COMMITTED`` protocol),
``metrics.jsonl``, ``export/``. A run started by one launcher resumes under the other.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Iterator, Optional

from ssfer_dist import storage

log = logging.getLogger(__name__)

__all__ = ["WorkerContext", "RayContext", "TorchrunContext", "CheckpointRef"]

Upload = Callable[[str], None]          # upload(local_dir): this rank's files into the checkpoint folder


class CheckpointRef:
    """A checkpoint folder to resume from: ``path`` (for messages) and ``as_directory()`` (a local copy)."""

    def __init__(self, url: str) -> None:
        self.path = url

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        if not storage.is_s3(self.path):
            yield self.path
            return
        tmp = tempfile.mkdtemp(prefix="ssfer-restore-")
        try:
            for rel in storage.list_files(self.path):
                local = os.path.join(tmp, *rel.split("/"))
                os.makedirs(os.path.dirname(local), exist_ok=True)
                storage.get_file(storage.join(self.path, rel), local)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class WorkerContext:
    """The launcher as the loop sees it."""

    name = "abstract"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def latest_checkpoint(self) -> Any:
        """An object with ``.path`` and ``.as_directory()``, or None for a fresh run."""
        raise NotImplementedError

    def report(self, metrics: Dict[str, Any]) -> None:
        """A log step's metrics (every rank calls this the same number of times)."""
        raise NotImplementedError

    def report_checkpoint(self, metrics: Dict[str, Any], local_dir: str, name: str, upload: Upload) -> None:
        """This rank's checkpoint files in ``local_dir``, to go into ``<run>/<name>`` through ``upload``."""
        raise NotImplementedError

    def after_commit(self, run_url: str, num_to_keep: int) -> None:
        """Rank 0, after a checkpoint's ``_COMMITTED`` marker is written."""

    def setup_logging(self) -> None:
        """Where this worker's log lines go (called first thing in the loop)."""


class RayContext(WorkerContext):
    name = "ray"

    def __init__(self, run_url: str = "") -> None:
        import ray.train

        self.run_url = run_url
        self._train = ray.train
        ctx = ray.train.get_context()
        self._ctx = ctx
        self.rank, self.world_size, self.local_rank = ctx.get_world_rank(), ctx.get_world_size(), \
            ctx.get_local_rank()

    def setup_logging(self) -> None:
        from ssfer_dist.console import worker_logging

        worker_logging(self.rank)         # rank 0's lines reach the driver's console (marked); the rest its log

    def latest_checkpoint(self):
        """Ray's own (after a worker-group restart, or its snapshot of an earlier run of this name); else the
        run folder's newest committed checkpoint — one a torchrun run wrote."""
        ckpt = self._train.get_checkpoint()
        if ckpt is None and self.run_url:
            from ssfer_dist.train.checkpoint import latest_complete

            url = latest_complete(self.run_url)
            if url:
                log.info("resuming from %s (not registered with Ray: written by another launcher)", url)
                return CheckpointRef(url)
        return ckpt

    def report(self, metrics: Dict[str, Any]) -> None:
        self._train.report(metrics)

    def report_checkpoint(self, metrics: Dict[str, Any], local_dir: str, name: str, upload: Upload) -> None:
        train, ctx = self._train, self._ctx

        def upload_fn(checkpoint, dir_name: str):
            upload(checkpoint.path)
            st = ctx.get_storage()
            return train.Checkpoint(path=f"{st.experiment_fs_path}/{dir_name}", filesystem=st.storage_filesystem)

        train.report(metrics, checkpoint=train.Checkpoint.from_directory(local_dir), checkpoint_dir_name=name,
                     checkpoint_upload_fn=upload_fn)


class TorchrunContext(WorkerContext):
    """Under torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` set by it."""

    name = "torchrun"

    def __init__(self, run_url: str, use_cuda: bool, timeout_s: float) -> None:
        import datetime

        import torch
        import torch.distributed as dist

        missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
                   if k not in os.environ]
        if missing:
            raise RuntimeError(f"not started by torchrun: {', '.join(missing)} not set (run "
                               "`torchrun --nproc-per-node N -m ssfer_dist.train CONFIG` or "
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
        from ssfer_dist.train.checkpoint import latest_complete

        url = latest_complete(self.run_url)
        return CheckpointRef(url) if url else None

    def report(self, metrics: Dict[str, Any]) -> None:
        return None                      # rank 0's MetricsLog already wrote metrics.jsonl / TensorBoard

    def report_checkpoint(self, metrics: Dict[str, Any], local_dir: str, name: str, upload: Upload) -> None:
        upload(local_dir)

    def after_commit(self, run_url: str, num_to_keep: int) -> None:
        from ssfer_dist.train.checkpoint import prune_committed

        if num_to_keep and num_to_keep > 0:
            prune_committed(run_url, num_to_keep)

    def close(self) -> None:
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
