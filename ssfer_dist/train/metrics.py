"""Run metrics: :class:`MetricsLogger` owns the cadence (``train.log_every``) and a log step's record on every
rank; rank 0 writes it (:class:`MetricsLog`: ``metrics.jsonl`` + TensorBoard events in the run folder) and
logs a progress line.

TensorBoard tags are grouped (:func:`tb_tag`): ``train/…`` (losses, accuracies, lr, the task's metrics),
``eval/…`` (evaluation while training, plus ``eval/confusion`` as an image), ``data/…`` (epoch, samples seen,
data position, corrupt samples), ``sys/…`` (throughput); housekeeping values (``batch_digest``, ``time``)
stay in ``metrics.jsonl`` only. :meth:`MetricsLog.log_hparams` records the run's config in the HParams
dashboard (and as text).

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
from typing import Any, Dict, Iterable, Optional

from ssfer_dist import storage
from ssfer_dist.console import format_progress
from ssfer_dist.config import Config, to_dict
from ssfer_dist.distributed import collectives
from ssfer_dist.evaluate import confusion_png
from ssfer_dist.plan import LaunchPlan
from ssfer_dist.train.state import TrainState
from ssfer_dist.train.step import DeviceMetrics

log = logging.getLogger(__name__)

__all__ = ["MetricsLogger", "MetricsLog", "tb_tag", "flatten", "hparams"]

HIDDEN = frozenset({"step", "time", "batch_digest"})          # metrics.jsonl only, never charted
SYS = frozenset({"steps_per_s", "images_per_s"})
DATA = frozenset({"epoch", "samples_seen", "corrupt_samples", "data_position"})
# the HParams dashboard's metric columns (shown when the run logs them)
HPARAM_METRICS = ("eval/accuracy", "eval/mean_class_accuracy", "eval/macro_f1", "train/loss")


def tb_tag(key: str) -> Optional[str]:
    """The TensorBoard tag of a metrics-line key, or None when it is not charted (see the module docstring)."""
    if key in HIDDEN:
        return None
    if "/" in key:
        return key
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    if key in SYS:
        return "sys/" + key
    if key in DATA:
        return "data/" + key
    return "train/" + key


def flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """A nested config dict as ``{"a.b": scalar}`` (lists and None as their text): HParams values."""
    out: Dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    if isinstance(tree, (bool, int, float, str)):
        out[key] = tree
    else:
        out[key] = json.dumps(tree)
    return out


class MetricsLog:
    """Append-only metrics for one run (only instantiate on rank 0)."""

    def __init__(self, run_url: str, tensorboard: bool = True, class_names: Iterable[str] = ()) -> None:
        self.run_url = run_url
        self.class_names = list(class_names)          # labels of the eval confusion image
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
                tag = tb_tag(k)
                if tag and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(tag, v, step)
            conf = record.get("eval_confusion")
            if conf is not None and len(self.class_names) == len(conf):
                self._confusion_image(conf, self.class_names, step)

    def _confusion_image(self, conf, names, step: int) -> None:
        """``eval/confusion``: the PNG ``ssfer evaluate`` draws, as a TensorBoard image."""
        import numpy as np
        from PIL import Image

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "confusion.png")
            confusion_png(np.asarray(conf), list(names), path, title=f"step {step}")
            with Image.open(path) as im:
                hwc = np.asarray(im.convert("RGB"))
        self._tb.add_image("eval/confusion", hwc, step, dataformats="HWC")

    def log_hparams(self, hparams: Dict[str, Any], metrics: Iterable[str] = HPARAM_METRICS) -> None:
        """The run's hyper-parameters (flat ``{"optim.lr": 1e-3, …}``) in TensorBoard's HParams dashboard,
        with ``metrics`` (tags this run charts) as its columns, and as a text table under ``config``."""
        if self._tb is None:
            return
        from torch.utils.tensorboard.summary import hparams as hp_summary

        exp, ssi, sei = hp_summary(hparams, {m: 0.0 for m in metrics})
        writer = self._tb.file_writer           # made by the SummaryWriter when it opens
        for summ in (exp, ssi, sei):
            writer.add_summary(summ)
        rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(hparams.items()))
        self._tb.add_text("config", "| key | value |\n|---|---|\n" + rows, 0)

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


def hparams(cfg: Config, plan: LaunchPlan) -> Dict[str, Any]:
    """The run's hyper-parameters for TensorBoard: the config tree (flat keys; ``failure`` housekeeping left
    out) plus the plan's derived values (``plan.*``)."""
    out = flatten({k: v for k, v in to_dict(cfg).items() if k != "failure"})
    for k in ("num_ranks", "global_batch", "effective_lr", "steps_per_epoch", "total_steps", "warmup_steps",
              "num_samples", "num_classes", "eval_num_samples"):
        out[f"plan.{k}"] = getattr(plan, k)
    return out


class MetricsLogger:
    """A run's metrics on one worker: :meth:`should_log` (every ``log_every`` steps and the last), the log
    step's :meth:`record` (every rank takes part in its reductions) and, on rank 0, :meth:`write` into
    :class:`MetricsLog` plus the progress line. ``state`` is the run's position at the start (a resumed
    run's lines after it move to ``metrics_redone.jsonl``)."""

    def __init__(self, cfg: Config, plan: LaunchPlan, rank: int, label: str, state: TrainState) -> None:
        self.log_every, self.total_steps = int(cfg.train.log_every), plan.total_steps
        self.global_batch = plan.global_batch
        self.batches_per_epoch = plan.steps_per_epoch * plan.grad_accum     # micro-batches per epoch per rank
        self.rank, self.label = rank, label
        self.corrupt_base = state.corrupt_samples
        self._t, self._step = time.time(), state.step
        self.log: Optional[MetricsLog] = None
        if rank == 0:
            self.log = MetricsLog(plan.run_url, tensorboard=cfg.train.tensorboard, class_names=plan.class_names)
            self.log.truncate_after(state.step)
            self.log.log_hparams(hparams(cfg, plan))

    def should_log(self, step: int) -> bool:
        return step >= self.total_steps or step % self.log_every == 0

    def record(self, state: TrainState, lr: float, window: DeviceMetrics, corrupt_by_lane: Dict[int, int],
               batch_digest: int) -> Dict[str, Any]:
        """The log step's record (the same on every rank): the window's task metrics averaged over ranks (its
        one host read), throughput since the last log step, the data position and the corrupt samples so far
        (also set on ``state``). Every rank calls this: it is a collective."""
        avg = window.read(collectives.all_reduce_sum)
        state.corrupt_samples = self.corrupt_base + collectives.sum_ints([sum(corrupt_by_lane.values())])[0]
        now = time.time()
        sps = (state.step - self._step) / max(now - self._t, 1e-9)
        self._t, self._step = now, state.step
        record = {"step": state.step, "lr": lr, "epoch": state.micro_batch / self.batches_per_epoch,
                  "samples_seen": state.samples_seen, "steps_per_s": sps, "images_per_s": sps * self.global_batch,
                  "corrupt_samples": state.corrupt_samples, "data_position": state.micro_batch,
                  "batch_digest": batch_digest, "time": now}
        record.update(avg)
        return record

    def write(self, record: Dict[str, Any]) -> None:
        """Rank 0: the record into ``metrics.jsonl`` / TensorBoard, and the progress line."""
        if self.log is None:
            return
        self.log.write(record)
        log.info(format_progress(self.label, record["step"], self.total_steps, record["steps_per_s"],
                                 record["images_per_s"], record.get("loss", float("nan")), record["lr"]))

    def sync(self) -> None:
        if self.log is not None:
            self.log.sync()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
