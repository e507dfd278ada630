"""Run metrics (rank 0): ``metrics.jsonl`` + TensorBoard events in the run folder, and a progress line.

For a local run folder both are written in place. For ``s3://`` run folders they are written to a
local staging folder and uploaded by :meth:`MetricsLog.sync` (at checkpoints and at the end); a
resumed run first downloads the existing ``metrics.jsonl`` so the log stays one continuous file.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from typing import Any, Dict

from ssfer_dist import storage

log = logging.getLogger(__name__)

__all__ = ["MetricsLog", "format_progress"]


def format_progress(stage: str, step: int, total: int, steps_per_s: float, images_per_s: float,
                    loss: float, lr: float) -> str:
    """``[mae] step 40/200  3.10 steps/s  396.8 img/s  loss 0.8123  lr 1.20e-04  ETA 0:00:52``."""
    eta = (total - step) / steps_per_s if steps_per_s > 0 else float("inf")
    eta_s = "?" if not math.isfinite(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
    return (f"[{stage}] step {step}/{total}  {steps_per_s:.2f} steps/s  {images_per_s:.1f} img/s  "
            f"loss {loss:.4f}  lr {lr:.2e}  ETA {eta_s}")


class MetricsLog:
    """Append-only metrics for one run (only instantiate on rank 0)."""

    def __init__(self, run_url: str, tensorboard: bool = True) -> None:
        self.run_url = run_url
        self.remote = storage.is_s3(run_url)
        self.local_dir = tempfile.mkdtemp(prefix="ssfer-metrics-") if self.remote else run_url
        os.makedirs(self.local_dir, exist_ok=True)
        self.jsonl_path = os.path.join(self.local_dir, "metrics.jsonl")
        if self.remote:
            remote = storage.join(run_url, "metrics.jsonl")
            if storage.exists(remote):
                storage.get_file(remote, self.jsonl_path)
            if storage.exists(remote.replace("metrics.jsonl", "metrics_redone.jsonl")):
                storage.get_file(remote.replace("metrics.jsonl", "metrics_redone.jsonl"),
                                 os.path.join(self.local_dir, "metrics_redone.jsonl"))
        self._fh = open(self.jsonl_path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=os.path.join(self.local_dir, "tb"))
            except Exception as e:  # pragma: no cover - tensorboard is a dependency
                log.warning("tensorboard disabled: %s", e)

    def truncate_after(self, step: int) -> None:
        """Move lines with ``step > step`` to ``metrics_redone.jsonl``: steps redone after a resume then
        appear once in ``metrics.jsonl`` (from the resumed run); the replaced lines stay auditable."""
        self._fh.close()
        keep, redone = [], []
        with open(self.jsonl_path, "r", encoding="utf-8") as f:
            for line in f:
                try:
                    (keep if json.loads(line).get("step", 0) <= step else redone).append(line)
                except json.JSONDecodeError:
                    continue
        if redone:
            with open(os.path.join(self.local_dir, "metrics_redone.jsonl"), "a", encoding="utf-8") as f:
                f.writelines(redone)
            with open(self.jsonl_path, "w", encoding="utf-8") as f:
                f.writelines(keep)
            self._redone = True
        self._fh = open(self.jsonl_path, "a", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def add_image(self, tag: str, chw, step: int) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, chw, step)

    def sync(self, final: bool = False) -> None:
        """Flush; upload to S3 when the run folder is remote.

        Files are uploaded from an in-memory snapshot (TensorBoard appends from a background thread, and a
        file that grows during a multipart upload fails the server's checksum). A failed upload mid-run
        is logged and retried at the next sync; only the final sync raises.
        """
        self._fh.flush()
        if self._tb is not None:
            self._tb.flush()
        if not self.remote:
            return
        files = [(self.jsonl_path, "metrics.jsonl")]
        redone = os.path.join(self.local_dir, "metrics_redone.jsonl")
        if os.path.exists(redone):
            files.append((redone, "metrics_redone.jsonl"))
        tb_dir = os.path.join(self.local_dir, "tb")
        if os.path.isdir(tb_dir):
            files += [(os.path.join(tb_dir, n), f"tb/{n}") for n in sorted(os.listdir(tb_dir))]
        for path, name in files:
            with open(path, "rb") as f:
                snapshot = f.read()
            try:
                storage.put_bytes(storage.join(self.run_url, name), snapshot)
            except storage.StorageError as e:
                if final:
                    raise
                log.warning("metrics upload failed (retried at the next checkpoint): %s", e)

    def close(self) -> None:
        self.sync(final=True)
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
