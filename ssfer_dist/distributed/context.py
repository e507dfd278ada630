"""What the one training loop needs from whoever launched it: rank, world size, local rank, the checkpoint to
resume from, and where metrics and checkpoints are reported.

Each launcher (:mod:`ssfer_dist.launchers`) has its implementation of :class:`WorkerContext`: Ray Train's
worker (``launchers/ray.py``) and torchrun's ranks (``launchers/torchrun.py``); one loop
(:mod:`ssfer_dist.train.loop`) serves both.

Both write the same run folder: ``checkpoint_<step>/`` (the same files, the same ``_COMMITTED`` protocol),
``metrics.jsonl``, ``export/``. A run started by one launcher resumes under the other.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Iterator

from ssfer_dist import storage

__all__ = ["WorkerContext", "CheckpointRef", "Upload"]

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
        """Where this worker's log lines go (called first thing in the loop; the Ray launcher's train function
        has already sent them to the run's log files)."""
