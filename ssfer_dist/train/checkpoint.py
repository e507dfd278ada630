"""Checkpoints: :class:`CheckpointManager` owns a run's checkpoints on each worker — when to save, saving,
committing, the launcher's retention, and finding and loading the one to resume from. Every rank saves its
DeepSpeed shard into a local folder, uploads it and reports it to its launcher.

A checkpoint folder (``<storage>/<run>/checkpoint_<step>``) holds

- ``ds/``               the DeepSpeed checkpoint (model/optimizer shards of every rank, tag ``ds``);
- ``train_state.json``  :class:`~ssfer_dist.train.state.TrainState` (step, samples seen, data epoch and
  position, seeds);
- ``extra.pt``          the task's own state (``Task.state_dict``: EMA teacher, threshold policy) — tensors
  and plain values only, loaded with ``weights_only=True``; absent when the task keeps none.

- ``_parts/rank<r>.json`` each rank's list of the files it wrote (name → bytes), uploaded after them;
- ``_COMMITTED``        written last by rank 0, after a barrier that follows every rank's upload, once it
  has checked that every rank's part list is there and every listed file has its size.

Each rank uploads its own files through :mod:`ssfer_dist.storage` (retried through transient faults for
``run.storage_retry_s``). Under Ray (Ray's ``checkpoint_upload_fn``) Ray merges the ranks' files into one
folder, keeps ``checkpoint.num_to_keep`` of them and hands the latest back through
``ray.train.get_checkpoint()`` after a failure or when a run is rerun with the same name; under torchrun
rank 0 prunes to ``num_to_keep`` and a restart resumes from :func:`latest_complete` (the launcher's
:class:`~ssfer_dist.distributed.context.WorkerContext` says which checkpoint to resume from).

**Elastic resume.** A checkpoint saved by another rank count (its ``train_state.json`` says how many) is
converted by DeepSpeed's ``ds_to_universal`` command into a universal checkpoint, which an engine built with
DeepSpeed's ``checkpoint.load_universal`` key loads; the manager reads the checkpoint before the engine is
built so that the config can say so. ZeRO-3 checkpoints are resumed on their own rank count only.

**No partial checkpoint survives.** A folder is complete when it has ``_COMMITTED``, or — crash between
the last upload and the marker — when every rank's part list is there and every listed file has its
size (then the marker is written). :func:`sweep_incomplete` deletes every other ``checkpoint_*`` folder;
rank 0 runs it before training (nothing else writes then) and the launcher after every run, failed or
not. :func:`latest_complete` is the "newest checkpoint" lookup for people and tools.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from ssfer_dist import storage
from ssfer_dist.distributed import collectives
from ssfer_dist.distributed.context import WorkerContext
from ssfer_dist.distributed.faults import PermanentFault
from ssfer_dist.tasks.base import Task
from ssfer_dist.train.state import TrainState

log = logging.getLogger(__name__)

__all__ = ["CheckpointManager", "Resume", "upload_part", "prune_committed", "DS_TAG", "checkpoint_dir_name",
           "sweep_incomplete", "latest_complete", "is_complete", "COMMIT_FILE", "STATE_FILE"]

DS_TAG = "ds"
STATE_FILE = "train_state.json"
EXTRA_FILE = "extra.pt"
COMMIT_FILE = "_COMMITTED"
PARTS_DIR = "_parts"
_CKPT_RE = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def upload_part(local_dir: str, dest_url: str, rank: int, world: int) -> None:
    """Upload this rank's files, then its part list ``_parts/rank<r>.json`` (names and sizes)."""
    files: Dict[str, int] = {}
    for root, _dirs, names in os.walk(local_dir):
        for n in names:
            p = os.path.join(root, n)
            files[os.path.relpath(p, local_dir).replace(os.sep, "/")] = os.path.getsize(p)
    for name in sorted(files):
        storage.put_file(os.path.join(local_dir, name), storage.join(dest_url, name))
    part = {"rank": rank, "world_size": world, "files": files}
    storage.put_bytes(storage.join(dest_url, PARTS_DIR, f"rank{rank}.json"), json.dumps(part).encode())


def prune_committed(run_url: str, num_to_keep: int) -> List[str]:
    """Delete all but the newest ``num_to_keep`` committed checkpoints (the torchrun launcher's retention;
    under Ray, Ray Train keeps ``checkpoint.num_to_keep``). Returns the names deleted."""
    done = sorted((n for n, files in _checkpoint_dirs(run_url).items() if COMMIT_FILE in files),
                  key=lambda n: int(_CKPT_RE.match(n).group(1)))
    old = done[:-num_to_keep] if num_to_keep > 0 else []
    for name in old:
        storage.delete_tree(storage.join(run_url, name))
    return old


def _commit(url: str, step: int) -> None:
    storage.put_bytes(storage.join(url, COMMIT_FILE), json.dumps({"step": step}).encode())


def is_complete(url: str, listing: Optional[Dict[str, int]] = None) -> bool:
    """Committed, or every rank's part list present with every listed file at its size."""
    files = storage.list_sizes(url) if listing is None else listing
    if COMMIT_FILE in files:
        return True
    parts = [f for f in files if f.startswith(PARTS_DIR + "/")]
    if not parts:
        return False
    try:
        first = json.loads(storage.get_bytes(storage.join(url, parts[0])))
        world = int(first["world_size"])
        for r in range(world):
            name = f"{PARTS_DIR}/rank{r}.json"
            if name not in files:
                return False
            part = json.loads(storage.get_bytes(storage.join(url, name)))
            for f, size in part["files"].items():
                if files.get(f) != size:
                    return False
    except (ValueError, KeyError, storage.StorageError):
        return False
    return True


def _checkpoint_dirs(run_url: str) -> Dict[str, Dict[str, int]]:
    """``checkpoint_*`` folder name → {relative file: size}."""
    out: Dict[str, Dict[str, int]] = {}
    for rel, size in storage.list_sizes(run_url).items():
        head, _, rest = rel.partition("/")
        if rest and _CKPT_RE.match(head):
            out.setdefault(head, {})[rest] = size
    return out


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def ray_registered(run_url: str) -> List[str]:
    """Checkpoint folders Ray Train has registered for this run (every rank reported them), read from
    its checkpoint-manager snapshot; [] when there is none or its format is unknown."""
    url = storage.join(run_url, RAY_SNAPSHOT)
    try:
        if not storage.exists(url):
            return []
        snap = json.loads(storage.get_bytes(url))
        return sorted({r["checkpoint_dir_name"] for r in snap.get("checkpoint_results", [])
                       if r.get("checkpoint_dir_name")})
    except (storage.StorageError, ValueError, KeyError, TypeError, AttributeError):
        return []


def sweep_incomplete(run_url: str, keep: Sequence[str] = ()) -> List[str]:
    """Delete every incomplete ``checkpoint_*`` folder of a run; commit the complete-but-unmarked ones and
    those Ray registered (``keep`` adds names). Returns the names deleted. Call only when no worker of the
    run is writing."""
    deleted = []
    registered = set(ray_registered(run_url)) | set(keep)
    for name, files in sorted(_checkpoint_dirs(run_url).items()):
        url = storage.join(run_url, name)
        if COMMIT_FILE in files:
            continue
        if name in registered or is_complete(url, files):
            m = _CKPT_RE.match(name)
            _commit(url, int(m.group(1)))
            continue
        log.warning("removing incomplete checkpoint %s (%d files, no commit marker)", url, len(files))
        storage.delete_tree(url)
        deleted.append(name)
    return deleted


def latest_complete(run_url: str) -> Optional[str]:
    """URL of the newest committed checkpoint of a run, or None."""
    done = [n for n, files in _checkpoint_dirs(run_url).items() if COMMIT_FILE in files]
    if not done:
        return None
    return storage.join(run_url, max(done, key=lambda n: int(_CKPT_RE.match(n).group(1))))




@dataclasses.dataclass(frozen=True)
class Resume:
    """The checkpoint a run resumes from, as its own files say: ``local_dir`` (a local copy, open while the
    :meth:`CheckpointManager.resuming` block runs), its TrainState, and whether it was saved by another rank
    count (``elastic``: loaded through DeepSpeed's universal checkpoint)."""

    path: str
    local_dir: str
    state: TrainState
    elastic: bool


class CheckpointManager:
    """A run's checkpoints on one worker: when to save (``every_steps`` and the last step), saving, committing
    and the launcher's retention (``num_to_keep``), finding and loading the one to resume from (on another
    rank count through DeepSpeed's universal checkpoint). Every rank makes one and calls it alike."""

    def __init__(self, ctx: WorkerContext, run_url: str, every_steps: int, num_to_keep: int, total_steps: int,
                 zero_stage: int, convert_timeout_s: float) -> None:
        self.ctx, self.run_url = ctx, run_url
        self.every_steps, self.num_to_keep, self.total_steps = int(every_steps), int(num_to_keep), int(total_steps)
        self.zero_stage = int(zero_stage)
        self.convert_timeout_s = float(convert_timeout_s)

    def should_save(self, step: int) -> bool:
        return step >= self.total_steps or (self.every_steps > 0 and step % self.every_steps == 0)

    @contextlib.contextmanager
    def resuming(self) -> Iterator[Optional[Resume]]:
        """The checkpoint to resume from (None: a fresh run), read before the engine is built: whether it is
        elastic decides the engine's config. Rank 0 first removes every partial checkpoint of the run (no
        worker writes now). A ZeRO-3 checkpoint of another rank count is refused (:class:`PermanentFault`)."""
        ref = self.ctx.latest_checkpoint()
        if self.ctx.rank == 0:
            keep = [os.path.basename(ref.path.rstrip("/"))] if ref is not None else []
            sweep_incomplete(self.run_url, keep=keep)
        if ref is None:
            yield None
            return
        with ref.as_directory() as d:
            yield self._resume(ref.path, d)

    def _resume(self, path: str, local_dir: str) -> Resume:
        if not os.path.exists(os.path.join(local_dir, COMMIT_FILE)):
            log.warning("checkpoint %s has no commit marker (Ray registered it: every rank reported)", path)
        state_path = os.path.join(local_dir, STATE_FILE)
        if not os.path.exists(state_path):
            raise RuntimeError(f"checkpoint {path} lacks {STATE_FILE}")
        with open(state_path, "r", encoding="utf-8") as f:
            state = TrainState.from_json(f.read())
        world = self.ctx.world_size
        elastic = bool(state.num_ranks) and state.num_ranks != world
        if elastic and self.zero_stage == 3:
            # the weights load exactly but the optimizer state does not (the losses drift from the first
            # update on), so ZeRO-3 is refused rather than resumed subtly wrong; a restart cannot fix it
            raise PermanentFault(f"checkpoint {path} was saved by {state.num_ranks} ranks; resuming a ZeRO-3 run "
                                 f"on {world} is not supported (ZeRO-1/2 are): set "
                                 f"scaling.num_workers={state.num_ranks}")
        return Resume(path=path, local_dir=local_dir, state=state, elastic=elastic)

    def load(self, resume: Resume, engine, task: Task) -> TrainState:
        """Load ``resume`` into the engine (built with ``checkpoint.load_universal`` when it is elastic) and
        the task; returns its TrainState. Every rank calls this."""
        load_dir, tag = resume.local_dir, DS_TAG
        if resume.elastic:
            load_dir = self._universal_copy(resume)
            tag = os.path.basename(load_dir)
            load_dir = os.path.dirname(load_dir)
        try:
            path, _ = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=True, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        finally:
            if resume.elastic:
                collectives.barrier()                # every rank of the node has read it: remove it
                if self.ctx.local_rank == 0:
                    shutil.rmtree(load_dir, ignore_errors=True)
        if path is None:
            raise RuntimeError(f"checkpoint {resume.path}: DeepSpeed found no '{tag}' checkpoint")
        if resume.elastic:
            log.info("loaded the %d-rank checkpoint %s on %d ranks (DeepSpeed universal checkpoint)",
                     resume.state.num_ranks, resume.path, self.ctx.world_size)
        extra_path = os.path.join(resume.local_dir, EXTRA_FILE)
        if os.path.exists(extra_path):
            task.load_state_dict(torch.load(extra_path, map_location="cpu", weights_only=True))
        return resume.state

    def _universal_copy(self, resume: Resume) -> str:
        """The checkpoint's DeepSpeed shards as a universal checkpoint in a node-local folder: this node's
        local rank 0 converts (DeepSpeed's ``ds_to_universal`` command), every rank waits at a barrier (no
        shared disk needed between nodes). Returns the folder (its name is the tag to load)."""
        key = hashlib.sha1(f"{resume.path}|{resume.state.num_ranks}|{self.ctx.world_size}".encode()).hexdigest()
        out = os.path.join(tempfile.gettempdir(), f"ssfer-universal-{key[:16]}", "universal")
        if self.ctx.local_rank == 0 and not os.path.exists(os.path.join(out, "zero")):
            shutil.rmtree(os.path.dirname(out), ignore_errors=True)
            to_universal(os.path.join(resume.local_dir, DS_TAG), out, self.convert_timeout_s)
        collectives.barrier()
        if not os.path.exists(os.path.join(out, "zero")):
            raise RuntimeError(f"checkpoint {resume.path}: no universal copy in {out} (converted by this node's "
                               "local rank 0)")
        return out

    def save(self, engine, task: Task, state: TrainState, metrics: Dict[str, Any]) -> None:
        """Save this rank's part of the checkpoint into ``<run_url>/checkpoint_<step>``, upload it, report it
        through the launcher's context with ``metrics``, and (rank 0, after a barrier that follows every rank's
        upload) commit it and apply the launcher's retention. Every rank calls this."""
        rank, world = self.ctx.rank, self.ctx.world_size
        name = checkpoint_dir_name(state.step)
        dest = storage.join(self.run_url, name)
        tmp = tempfile.mkdtemp(prefix="ssfer-ckpt-")
        try:
            engine.save_checkpoint(tmp, tag=DS_TAG, save_latest=False)
            if rank == 0:
                with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                    f.write(state.to_json())
                extra = task.state_dict()
                if extra:
                    torch.save(extra, os.path.join(tmp, EXTRA_FILE))
            self.ctx.report_checkpoint(metrics, tmp, name, lambda local: upload_part(local, dest, rank, world))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        collectives.barrier()                    # every rank's files and part list are uploaded ...
        if rank == 0:
            # ... checked, not assumed: a barrier torn down by a failing peer's shutdown can return early
            if not is_complete(dest):
                raise RuntimeError(f"checkpoint {dest}: not every rank's part arrived; not committed")
            _commit(dest, state.step)
            self.ctx.after_commit(self.run_url, self.num_to_keep)


def to_universal(ds_dir: str, out: str, timeout_s: float) -> None:
    """Convert the DeepSpeed checkpoint folder ``ds_dir`` into the universal checkpoint ``out`` with DeepSpeed's
    documented command (``python -m deepspeed.checkpoint.ds_to_universal``), bounded by ``timeout_s``; written
    to ``out.tmp`` first, so ``out`` exists only when complete."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", ds_dir,
           "--output_folder", out + ".tmp", "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"converting {ds_dir} to a universal checkpoint took over {timeout_s:.0f} s") from e
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"converting {ds_dir} to a universal checkpoint failed (exit {p.returncode}): "
                           + " | ".join(tail))
    os.replace(out + ".tmp", out)
