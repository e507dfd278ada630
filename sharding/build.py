"""``ssfer-shard build``: list a source, plan shards, build them (in-process, a process pool or Ray
tasks), then write ``report.json`` and — last — ``manifest.parquet``.

Determinism: records are sorted by key, shuffled with ``random.Random(seed)`` and cut into shards of
``samples_per_shard`` records (also cut before ``max_shard_bytes`` by the records' size hints, an
estimate from the source sizes). Each shard's content depends only on its records and the options,
so reruns, any ``--workers`` and Ray all give identical shards and the same manifest.

Resume: a shard whose ``_build/<name>.json`` sidecar (or, after a finished build, its entry in the
merged ``.build-state.json``) matches the plan (see ``writer.check_done``) is not rebuilt. Structural
input errors are raised while listing, before anything is written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import random
import sys
import threading
import time
import warnings
from collections import Counter
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from sharding.process import ProcessOptions
from sharding.sources import list_source
from sharding.sources.base import CompactRecords, FaceRecord, Skipped
from sharding.writer import (
    STATE_DIR,
    ShardPlan,
    WriterConfig,
    build_shard,
    check_done,
    info_from_dict,
    merge_sidecars,
    read_merged_state,
)
from ssfer_dist import storage
from ssfer_dist.detect import make_detector
from ssfer_dist.errors import UserError
from ssfer_dist.shards import manifest as mf
from ssfer_dist.shards.schema import REPORT_NAME
from ssfer_dist.worker_env import non_secret_env

__all__ = ["BuildConfig", "run_build", "plan_shards"]

log = logging.getLogger(__name__)

TAR_OVERHEAD = 3 * 1024  # three tar headers + padding per sample (approximate)
MAX_REPORTED_SKIPS = 1_000_000
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Everything ``ssfer-shard build`` takes, and the one place its defaults live: the CLI maps its flags
    and the ``--spec`` YAML's keys 1:1 onto these fields (its help texts read the defaults from here)."""

    format: str
    input: str
    output: str
    split: str = "train"
    image_size: int = 112
    samples_per_shard: int = 1000
    max_shard_bytes: int = 1 << 30
    workers: int = 1
    seed: int = 0
    name: Optional[str] = None
    detector: str = "none"
    no_face: str = "skip"          # with a detector: images where it finds no face are skipped, or "keep"
    num_classes: int = 7
    boxes: Optional[str] = None
    jpeg_quality: int = 95
    box_scale: float = 1.25
    max_pixels: int = 64 * 1024 * 1024
    ray: bool = False              # shard tasks on Ray (also when RAY_ADDRESS is set)
    allow_outside: bool = False    # label-file paths / links may resolve outside --input
    progress: bool = True


def _dedupe(records: List[FaceRecord], skipped: List[Skipped]) -> List[FaceRecord]:
    records.sort(key=lambda r: (r.key, r.source_id))
    out: List[FaceRecord] = []
    for r in records:
        if out and out[-1].key == r.key:
            skipped.append(Skipped("duplicate_key", r.source_id, f"key {r.key} already used by {out[-1].source_id}"))
            continue
        out.append(r)
    return out


def _plan_slice(records: CompactRecords, name: str, samples_per_shard: int, max_shard_bytes: int, seed: int,
                options_fp: str) -> List[ShardPlan]:
    """``plan_shards`` for :class:`CompactRecords` (numpy permutation, no per-record objects)."""
    perm = np.random.RandomState(seed).permutation(len(records))
    est = records.sizes[perm] + TAR_OVERHEAD
    bounds = [0]
    if int(est.max(initial=0)) * samples_per_shard <= max_shard_bytes:
        bounds = list(range(0, len(perm), samples_per_shard))
    else:
        cur, count = 0, 0
        for i, e in enumerate(est.tolist()):
            if count and (count >= samples_per_shard or cur + e > max_shard_bytes):
                bounds.append(i)
                cur, count = 0, 0
            cur += e
            count += 1
    bounds.append(len(perm))
    plans = []
    for j in range(len(bounds) - 1):
        part = records.take(perm[bounds[j]:bounds[j + 1]])
        h = hashlib.sha256(options_fp.encode())
        h.update(part.fingerprint_bytes())
        plans.append(ShardPlan(j, f"{name}-{j:06d}.tar", part, h.hexdigest()))
    return plans


def plan_shards(records, name: str, samples_per_shard: int, max_shard_bytes: int, seed: int,
                options_fp: str) -> List[ShardPlan]:
    """Shuffle (seeded) and cut ``records`` (already sorted and unique by key) into shard plans."""
    if isinstance(records, CompactRecords):
        return _plan_slice(records, name, samples_per_shard, max_shard_bytes, seed, options_fp)
    order = list(records)
    random.Random(seed).shuffle(order)
    plans: List[ShardPlan] = []
    cur: List[FaceRecord] = []
    cur_bytes = 0
    for r in order:
        est = r.size_hint + TAR_OVERHEAD
        if cur and (len(cur) >= samples_per_shard or cur_bytes + est > max_shard_bytes):
            plans.append(ShardPlan(len(plans), f"{name}-{len(plans):06d}.tar", cur))
            cur, cur_bytes = [], 0
        cur.append(r)
        cur_bytes += est
    if cur:
        plans.append(ShardPlan(len(plans), f"{name}-{len(plans):06d}.tar", cur))
    for p in plans:
        h = hashlib.sha256(options_fp.encode())
        h.update("\n".join(repr((r.key, r.load, r.cls, r.box, r.box_source)) for r in p.records).encode())
        p.fingerprint = h.hexdigest()
    return plans


# ------------------------------------------------------------------------------------------ executors
_WORKER: Dict[str, Any] = {}


def _pool_init(counter) -> None:
    logging.basicConfig(level=logging.WARNING)
    _WORKER["counter"] = counter


def _pool_task(plan: ShardPlan, wcfg: WriterConfig) -> Dict[str, Any]:
    counter = _WORKER["counter"]

    def progress(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    return build_shard(plan, wcfg, progress)


def _run_inprocess(plans, wcfg, bar, on_result):
    for p in plans:
        on_result(build_shard(p, wcfg, bar.update if bar else None))


def _pool_context():
    """``fork`` on Linux when no other Python thread runs; else ``spawn``.

    A forked worker starts from the parent's memory where a spawned one re-imports every module, which on
    a small build costs more than the second worker gains. The pool starts before listing, while the
    process is small. Python threads can hold locks a forked child would inherit (logging, boto3's
    pools), so any running one means ``spawn``. Native thread pools (OpenBLAS starts one when numpy
    is imported, OpenMP) are not counted: they re-initialise at fork and the workers do no BLAS or
    torch work. Python 3.12+ warns about forking a process with native threads; that warning is
    silenced here for that reason.
    """
    if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods() and threading.active_count() == 1:
        return mp.get_context("fork")
    return mp.get_context("spawn")


class _WorkerPool:
    """``--workers N`` processes, started before listing (while the process is still small and
    single-threaded). Each task builds one whole shard; a shared counter feeds the progress bar."""

    def __init__(self, workers: int):
        ctx = _pool_context()
        self.counter = ctx.Value("q", 0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            self.pool = ctx.Pool(workers, initializer=_pool_init, initargs=(self.counter,))

    def map(self, fn, items):
        """An ordered parallel ``map`` over the pool (the listing uses it)."""
        return self.pool.map(fn, items, chunksize=1)

    def run(self, plans, wcfg, bar, on_result) -> None:
        shown = 0
        pending = [self.pool.apply_async(_pool_task, (p, wcfg)) for p in plans]
        while pending:
            still = []
            for a in pending:
                if a.ready():
                    on_result(a.get())
                else:
                    still.append(a)
            pending = still
            if bar is not None:
                v = self.counter.value
                if v > shown:
                    bar.update(v - shown)
                    shown = v
            if pending:
                pending[0].wait(0.2)

    def close(self, ok: bool) -> None:
        if ok:
            self.pool.close()
        else:
            self.pool.terminate()
        self.pool.join()


def _forward_env() -> Dict[str, str]:
    """Non-secret ``AWS_*`` settings (endpoint, region); credentials come from the Ray nodes' own environment
    (a local Ray inherits this process's; KubeRay pods read the ssfer-s3 Secret), never the runtime env."""
    return non_secret_env([k for k in os.environ if k.startswith("AWS_")])


def _run_ray(plans, wcfg, bar, on_result):
    import ray

    if not ray.is_initialized():
        addr = os.environ.get("RAY_ADDRESS")
        ray.init(address=addr or None, log_to_driver=False, include_dashboard=False)
    env = _forward_env() if storage.is_s3(wcfg.output) else {}
    opts: Dict[str, Any] = {"num_cpus": 1, "max_retries": 2}
    if env:
        opts["runtime_env"] = {"env_vars": env}
    remote = ray.remote(_ray_task).options(**opts)
    cfg_ref = ray.put(wcfg)
    # bounded number of tasks in flight: the driver never holds 42k refs / plans' records at once
    max_in_flight = max(8, 4 * int(ray.cluster_resources().get("CPU", 1)))
    queue = list(reversed(plans))
    refs: Dict[Any, ShardPlan] = {}
    while refs or queue:
        while queue and len(refs) < max_in_flight:
            p = queue.pop()
            refs[remote.remote(p, cfg_ref)] = p
        done, _ = ray.wait(list(refs), num_returns=1)
        for r in done:
            p = refs.pop(r)
            res = ray.get(r)
            on_result(res)
            if bar is not None:
                bar.update(len(p.records))


def _ray_task(plan: ShardPlan, cfg: WriterConfig) -> Dict[str, Any]:
    return build_shard(plan, cfg)


# ------------------------------------------------------------------------------------------ the build
def _clean_stale_temps(output: str) -> None:
    """Remove ``.tmp-*.part`` files a killed local build left in ``output`` (never final names)."""
    if storage.is_s3(output) or not os.path.isdir(output):
        return
    for n in os.listdir(output):
        if n.startswith(".tmp-") and n.endswith(".part"):
            try:
                os.unlink(os.path.join(output, n))
                log.info("removed stale temporary file %s", n)
            except OSError:
                pass


def _build_all(cfg: BuildConfig, pool, use_ray: bool, executor_hook):
    """List, plan, resume-check and build the shards of ``cfg`` (see ``run_build``)."""
    listing = list_source(cfg.format, cfg.input, split=cfg.split, name=cfg.name, num_classes=cfg.num_classes,
                          boxes=cfg.boxes, map_fn=pool.map if pool is not None else None,
                          allow_outside=cfg.allow_outside)
    name = cfg.name or listing.dataset
    skipped_listing = list(listing.skipped)
    records = listing.records
    if not isinstance(records, CompactRecords):
        records = _dedupe(records, skipped_listing)
    if not len(records):
        raise UserError(f"{cfg.input}: no usable samples for --split {cfg.split} "
                        f"({len(skipped_listing)} skipped while listing)")
    if cfg.detector != "none":
        make_detector(cfg.detector)  # fail fast (missing package) before any work
    storage.check_writable(cfg.output)
    popts = ProcessOptions(image_size=cfg.image_size, jpeg_quality=cfg.jpeg_quality, box_scale=cfg.box_scale,
                           max_pixels=cfg.max_pixels, no_face=cfg.no_face)
    options_fp = json.dumps([FORMAT_VERSION, dataclasses.asdict(popts), cfg.detector, listing.num_classes],
                            sort_keys=True)
    plans = plan_shards(records, name, cfg.samples_per_shard, cfg.max_shard_bytes, cfg.seed, options_fp)
    wcfg = WriterConfig(output=cfg.output, process=popts, detector=cfg.detector, num_classes=listing.num_classes)

    results: Dict[str, Dict[str, Any]] = {}
    todo: List[ShardPlan] = []
    _clean_stale_temps(cfg.output)
    have_sidecar = {n[: -len(".json")] for n in storage.list_files(storage.join(cfg.output, STATE_DIR))
                    if n.endswith(".json")}
    merged = read_merged_state(cfg.output)          # a finished build's results (its sidecars, merged)
    for p in plans:
        if p.name in have_sidecar:
            done = check_done(p, wcfg)
        elif p.name in merged:
            done = check_done(p, wcfg, recorded=merged[p.name])
        else:
            done = None
        if done is not None:
            results[p.name] = done
        else:
            todo.append(p)
    resumed = len(results)
    if resumed:
        log.info("resuming: %d of %d shards already complete", resumed, len(plans))
    num_todo = sum(len(p.records) for p in todo)
    log.info("building %d shards (%d samples) into %s", len(todo), num_todo, cfg.output)

    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=num_todo, unit="img", unit_scale=True, desc=f"build {name}", smoothing=0.1)

    def on_result(res: Dict[str, Any]) -> None:
        if executor_hook is not None:
            executor_hook(res)
        results[res["shard"]["name"]] = res

    try:
        if not todo:
            pass
        elif use_ray:
            _run_ray(todo, wcfg, bar, on_result)
        elif pool is not None and len(todo) > 1:
            pool.run(todo, wcfg, bar, on_result)
        else:
            _run_inprocess(todo, wcfg, bar, on_result)
    finally:
        if bar is not None:
            bar.close()

    return results, plans, listing, skipped_listing, name, resumed, num_todo


def run_build(cfg: BuildConfig, executor_hook: Optional[Callable] = None) -> Dict[str, Any]:
    """Build verified shards for ``cfg``; returns the report dict (also written to ``report.json``).

    Raises ``UserError`` for structural input problems (before writing anything) and unusable
    outputs. ``executor_hook`` (tests) wraps each shard result as it arrives.
    """
    t0 = time.time()
    if cfg.image_size < 8:
        raise UserError(f"--image-size {cfg.image_size}: must be at least 8")
    if cfg.samples_per_shard < 1:
        raise UserError(f"--samples-per-shard {cfg.samples_per_shard}: must be at least 1")
    if cfg.detector not in ("none", "haar", "mtcnn"):
        raise UserError(f"--detector {cfg.detector}: expected none, haar or mtcnn")
    if cfg.no_face not in ("skip", "keep"):
        raise UserError(f"--no-face {cfg.no_face}: expected skip or keep")
    use_ray = cfg.ray or bool(os.environ.get("RAY_ADDRESS"))
    pool = _WorkerPool(cfg.workers) if cfg.workers > 1 and not use_ray else None
    ok = False
    try:
        results, plans, listing, skipped_listing, name, resumed, num_todo = _build_all(cfg, pool, use_ray,
                                                                                    executor_hook)
        ok = True
    finally:
        if pool is not None:
            pool.close(ok)
    ordered = [results[p.name] for p in plans]
    shards = [info_from_dict(r["shard"], cfg.output) for r in ordered]
    shards = [s for s in shards if s.num_samples > 0]
    elapsed = time.time() - t0
    report = _report(cfg, name, listing, skipped_listing, ordered, shards, resumed, elapsed, num_todo)
    report_url = storage.join(cfg.output, REPORT_NAME)
    storage.put_bytes(report_url, json.dumps(report, indent=1, sort_keys=True).encode())
    if not shards:
        raise UserError(f"{cfg.input}: every sample was skipped ({report['skipped_by_reason']}); see {report_url}")
    mf.write_manifest(cfg.output, shards, dataset=name, image_size=cfg.image_size, num_classes=listing.num_classes,
                      extra={"format": cfg.format, "split": cfg.split, "seed": cfg.seed,
                             "samples_per_shard": cfg.samples_per_shard, "detector": cfg.detector,
                             "no_face": cfg.no_face,
                             "box_scale": cfg.box_scale, "jpeg_quality": cfg.jpeg_quality})
    merge_sidecars(cfg.output, ordered)              # finished: no _build/ folder beside the shards
    return report


def _report(cfg, name, listing, skipped_listing, ordered, shards, resumed, elapsed, num_built) -> Dict[str, Any]:
    skipped = [s.as_dict() for s in skipped_listing]
    counts: Counter = Counter()
    for r in ordered:
        skipped.extend(r["skipped"])
        counts.update(r["counts"])
    by_reason = Counter(s["reason"] for s in skipped)
    num_samples = sum(s.num_samples for s in shards)
    return {
        "dataset": name,
        "format": cfg.format,
        "input": cfg.input,
        "output": cfg.output,
        "split": cfg.split,
        "num_listed": len(listing.records) + len(listing.skipped),
        "num_samples": num_samples,
        "num_shards": len(shards),
        "num_bytes": sum(s.num_bytes for s in shards),
        "num_classes": listing.num_classes,
        "class_hist": [sum(s.class_hist[i] for s in shards) for i in range(listing.num_classes)],
        "num_skipped": len(skipped),
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "skipped": skipped[:MAX_REPORTED_SKIPS],
        "skipped_truncated": len(skipped) > MAX_REPORTED_SKIPS,
        "box_sources": {k[4:]: v for k, v in sorted(counts.items()) if k.startswith("box_")},
        "fallback_boxes": counts.get("box_fallback", 0),
        "passed_through": counts.get("passed_through", 0),
        "reencoded": counts.get("reencoded", 0),
        "resumed_shards": resumed,
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(num_built / elapsed, 1) if elapsed > 0 else None,
        "source_info": listing.info,
    }
