"""Checkpoints: every rank saves its DeepSpeed shard into a local folder, uploads it and reports it to its launcher.

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
rank 0 prunes to ``num_to_keep`` and a restart resumes from :func:`latest_complete`
(:mod:`ssfer_dist.distributed.context`).

**No partial checkpoint survives.** A folder is complete when it has ``_COMMITTED``, or — crash between
the last upload and the marker — when every rank's part list is there and every listed file has its
size (then the marker is written). :func:`sweep_incomplete` deletes every other ``checkpoint_*`` folder;
rank 0 runs it before training (nothing else writes then) and the launcher after every run, failed or
not. :func:`latest_complete` is the "newest checkpoint" lookup for people and tools.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import torch

from ssfer_dist import storage
from ssfer_dist.distributed import collectives

from ssfer_dist.tasks.base import Task
from ssfer_dist.train.state import TrainState

log = logging.getLogger(__name__)

__all__ = ["save_and_report", "restore", "prune_committed", "DS_TAG", "checkpoint_dir_name", "sweep_incomplete",
           "latest_complete", "is_complete", "COMMIT_FILE"]

DS_TAG = "ds"
STATE_FILE = "train_state.json"
EXTRA_FILE = "extra.pt"
COMMIT_FILE = "_COMMITTED"
PARTS_DIR = "_parts"
_CKPT_RE = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def _upload_part(local_dir: str, dest_url: str, rank: int, world: int, fail_half_way: bool = False) -> None:
    """Upload this rank's files, then its part list ``_parts/rank<r>.json`` (names and sizes).
    ``fail_half_way``: test-only — raise ENOSPC after half of the files, as a full disk would."""
    files: Dict[str, int] = {}
    for root, _dirs, names in os.walk(local_dir):
        for n in names:
            p = os.path.join(root, n)
            files[os.path.relpath(p, local_dir).replace(os.sep, "/")] = os.path.getsize(p)
    for i, name in enumerate(sorted(files)):
        if fail_half_way and i >= len(files) // 2:
            target = storage.join(dest_url, name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)
        storage.put_file(os.path.join(local_dir, name), storage.join(dest_url, name))
    part = {"rank": rank, "world_size": world, "files": files}
    storage.put_bytes(storage.join(dest_url, PARTS_DIR, f"rank{rank}.json"), json.dumps(part).encode())


def save_and_report(ctx, engine, task: Task, state: TrainState, metrics: Dict[str, Any], run_url: str,
                    upload_fault: bool = False, num_to_keep: int = 0) -> None:
    """Save this rank's part of the checkpoint into ``<run_url>/checkpoint_<step>``, upload it, report it
    through the launcher's context (:mod:`ssfer_dist.distributed.context`), and (rank 0, after a barrier
    that follows every rank's upload) commit it. Every rank calls this."""
    rank, world = ctx.rank, ctx.world_size
    name = checkpoint_dir_name(state.step)
    dest = storage.join(run_url, name)

    def upload(local_dir: str) -> None:
        _upload_part(local_dir, dest, rank, world, fail_half_way=upload_fault)

    tmp = tempfile.mkdtemp(prefix="ssfer-ckpt-")
    try:
        engine.save_checkpoint(tmp, tag=DS_TAG, save_latest=False)
        if rank == 0:
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                f.write(state.to_json())
            extra = task.state_dict()
            if extra:
                torch.save(extra, os.path.join(tmp, EXTRA_FILE))
        ctx.report_checkpoint(metrics, tmp, name, upload)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    collectives.barrier()                    # every rank's files and part list are uploaded ...
    if rank == 0:
        # ... checked, not assumed: a barrier torn down by a failing peer's shutdown can return early
        if not is_complete(dest):
            raise RuntimeError(f"checkpoint {dest}: not every rank's part arrived; not committed")
        _commit(dest, state.step)
        ctx.after_commit(run_url, num_to_keep)


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


def _ds_safe_globals():
    """The few DeepSpeed classes its checkpoints pickle besides tensors and builtins."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def weights_only_loads(engine) -> None:
    """Make DeepSpeed read its checkpoint files with ``torch.load(weights_only=True)`` (allow-listing only
    the DeepSpeed classes above) instead of its default full unpickling."""
    ce = engine.checkpoint_engine

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(_ds_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = load


def universal_copy(ds_dir: str, name: str, saved_ranks: int, world: int) -> str:
    """The DeepSpeed checkpoint in ``ds_dir`` (saved by ``saved_ranks`` ranks) as a universal checkpoint in a
    node-local folder: its rank with ``LOCAL_RANK`` 0 converts (``deepspeed.checkpoint.ds_to_universal``,
    in-process), every rank waits at a barrier (no shared disk needed between nodes). Returns the folder."""
    import argparse
    import hashlib
    import contextlib
    import io

    key = hashlib.sha1(f"{name}|{saved_ranks}|{world}".encode()).hexdigest()[:16]
    out = os.path.join(tempfile.gettempdir(), f"ssfer-universal-{key}", "universal")
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and not os.path.exists(os.path.join(out, "zero")):
        from deepspeed.checkpoint.ds_to_universal import main as to_universal

        shutil.rmtree(os.path.dirname(out), ignore_errors=True)
        args = argparse.Namespace(input_folder=ds_dir, output_folder=out + ".tmp", num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()):      # its progress prints
            to_universal(args)
        os.replace(out + ".tmp", out)
    collectives.barrier()
    if not os.path.exists(os.path.join(out, "zero")):
        raise RuntimeError(f"checkpoint {name}: no universal copy in {out} (converted by this node's local rank 0)")
    return out


def restore(checkpoint, engine, task: Task) -> Optional[TrainState]:
    """Load a reported checkpoint into the engine and task; returns its TrainState (None: fresh run)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        if not os.path.exists(os.path.join(d, COMMIT_FILE)):
            log.warning("checkpoint %s has no commit marker (Ray registered it: every rank reported)",
                        checkpoint.path)
        state_path = os.path.join(d, STATE_FILE)
        if not os.path.exists(state_path):
            raise RuntimeError(f"checkpoint {checkpoint.path} lacks {STATE_FILE}")
        with open(state_path, "r", encoding="utf-8") as f:
            state = TrainState.from_json(f.read())
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        elastic = bool(state.num_ranks) and state.num_ranks != world
        if elastic and engine.zero_optimization_stage() == 3:
            from ssfer_dist.distributed.faults import PermanentFault     # not retried: a restart cannot fix it

            # measured: the weights load exactly but the optimizer state does not (the losses drift from the
            # first update on), so ZeRO-3 is refused rather than resumed subtly wrong
            raise PermanentFault(f"checkpoint {checkpoint.path} was saved by {state.num_ranks} ranks; resuming a "
                                 f"ZeRO-3 run on {world} is not supported (ZeRO-1/2 are): set "
                                 f"scaling.num_workers={state.num_ranks}")
        weights_only_loads(engine)
        load_dir, tag = d, DS_TAG
        if elastic:                                  # another rank count: through a universal checkpoint
            uni = universal_copy(os.path.join(d, DS_TAG), checkpoint.path, state.num_ranks, world)
            load_dir, tag = os.path.dirname(uni), os.path.basename(uni)
            engine._config.load_universal_checkpoint = True
        try:
            path, _ = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=True, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        finally:
            if elastic:
                engine._config.load_universal_checkpoint = False
                collectives.barrier()                # every rank of the node has read it: remove it
                if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                    shutil.rmtree(load_dir, ignore_errors=True)
        if elastic:
            log.info("loaded the %d-rank checkpoint %s on %d ranks (DeepSpeed universal checkpoint)",
                     state.num_ranks, checkpoint.path, world)
        if path is None:
            raise RuntimeError(f"checkpoint {checkpoint.path}: DeepSpeed found no '{DS_TAG}' checkpoint")
        extra_path = os.path.join(d, EXTRA_FILE)
        if os.path.exists(extra_path):
            task.load_state_dict(torch.load(extra_path, map_location="cpu", weights_only=True))
    return state
