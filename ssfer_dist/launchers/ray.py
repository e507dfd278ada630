"""The Ray Train launcher: a stock ``TorchTrainer`` per stage, on the cluster in ``RAY_ADDRESS`` or on a local
Ray private to this command.

- Workers run :func:`train_fn`: a :class:`RayContext` and the one loop (``run_worker``). Each writes its log
  records to ``<run>/logs/worker-<rank>.log``; Ray is started with ``log_to_driver=False``, so no worker output
  reaches the driver. Rank 0 puts each log step's record into a ``ray.util.queue.Queue`` that the driver
  reads and prints. Only checkpoints (and the last step, which always saves one) go through
  ``ray.train.report``: Ray Train takes a worker's reports one at a time at its controller's poll interval
  (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, default 2 s), so a report per log step would hold every fast step
  back to that pace.
- A permanent fault (missing shard, full disk, access denied) is recorded by the worker that hits it; Ray
  restarts the group (``failure.max_failures``), and a restarted worker that finds the record raises it at
  once, so the run ends with that one-line cause after a few quick restarts, never a hang.
- The local Ray has its own temp folder (two runs on one machine never find each other), no dashboard unless
  ``run.ray_dashboard``; the CLI shuts it down at the end of the command and removes its folder after success.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import traceback
from typing import Any, Dict, List, Optional

from ssfer_dist import console, storage
from ssfer_dist.config import Config, to_dict
from ssfer_dist.distributed import arrowfs, faults
from ssfer_dist.train.checkpoint import latest_complete, sweep_incomplete
from ssfer_dist.distributed.context import CheckpointRef, Upload, WorkerContext
from ssfer_dist.errors import UserError
from ssfer_dist.launchers.base import (Launcher, RunResult, abs_storage, check_fast_path_local, check_gpus,
                                       export_url, gpus_needed, on_cluster)
from ssfer_dist.train.loop import run_worker
from ssfer_dist.plan import LaunchPlan
from ssfer_dist.worker_env import non_secret_env

log = logging.getLogger(__name__)

__all__ = ["RayLauncher", "RayContext", "train_fn", "ensure_ray", "run_stage", "check_gpus_local",
           "check_gpus_cluster", "current_private", "finish", "FORWARD_ENV"]

# Non-secret settings forwarded to the workers (they may run on other nodes or in a Ray started earlier).
# Credentials are never forwarded (see ssfer_dist/worker_env.py): workers read them from their own process
# environment (a local Ray inherits the driver's; KubeRay pods read the ssfer-s3 Secret).
FORWARD_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EC2_METADATA_DISABLED",
               "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS")

_private: Dict[str, Optional[str]] = {"gcs": None, "temp": None}     # the local Ray this process started


# ------------------------------------------------------------------------------------------ workers


class RayContext(WorkerContext):
    """Ray Train's worker. Checkpoints are reported to Ray (``ray.train.report(..., checkpoint_upload_fn=...)``):
    Ray keeps ``checkpoint.num_to_keep`` of them and hands the latest back after a worker-group restart."""

    name = "ray"

    def __init__(self, run_url: str = "", progress: Any = None) -> None:
        import ray.train

        self.run_url = run_url
        self._progress = progress          # the driver's queue of rank 0's records (None: nobody prints them)
        self._train = ray.train
        ctx = ray.train.get_context()
        self._ctx = ctx
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    def latest_checkpoint(self):
        """Ray's own (after a worker-group restart, or its snapshot of an earlier run of this name); else the
        run folder's newest committed checkpoint — one a torchrun run wrote."""
        ckpt = self._train.get_checkpoint()
        if ckpt is None and self.run_url:
            url = latest_complete(self.run_url)
            if url:
                log.info("resuming from %s (not registered with Ray: written by another launcher)", url)
                return CheckpointRef(url)
        return ckpt

    def report(self, metrics: Dict[str, Any]) -> None:
        if self.rank == 0:
            offer_progress(self._progress, metrics)

    def report_checkpoint(self, metrics: Dict[str, Any], local_dir: str, name: str, upload: Upload) -> None:
        self.report(metrics)
        train, ctx = self._train, self._ctx

        def upload_fn(checkpoint, dir_name: str):
            upload(checkpoint.path)
            st = ctx.get_storage()
            return train.Checkpoint(path=f"{st.experiment_fs_path}/{dir_name}", filesystem=st.storage_filesystem)

        train.report(metrics, checkpoint=train.Checkpoint.from_directory(local_dir), checkpoint_dir_name=name,
                     checkpoint_upload_fn=upload_fn)


def train_fn(payload: Dict[str, Any]) -> None:
    """Ray Train's train function: this worker's log file, the recorded-fault check, then the loop."""
    plan: LaunchPlan = payload["plan"]
    ctx = RayContext(plan.run_url, payload.get("progress"))
    console.worker_setup()
    with console.log_file(plan.run_url, f"worker-{ctx.rank}.log"):
        # a permanent fault recorded since this launch started: a restart cannot help, so stop at once
        rec = faults.permanent_cause(plan.run_url, float(payload.get("launched_at", time.time())))
        if rec is not None:
            log.error("rank %d: stopping: rank %s hit a permanent fault: %s", ctx.rank, rec["rank"], rec["cause"])
            raise faults.PermanentFault(rec["cause"])
        run_worker(payload, ctx)


def offer_progress(queue: Any, record: Dict[str, Any]) -> None:
    """Hand a log step's record to the driver's printer; a queue that is gone costs the line, never the run."""
    if queue is None:
        return
    try:
        queue.put_nowait(dict(record))
    except Exception:  # noqa: BLE001 - progress lines are never worth a training failure
        pass


class _ProgressPrinter:
    """Driver side: prints the records rank 0 queues, as console lines of stage ``label``."""

    def __init__(self, label: str, total: int) -> None:
        from ray.util.queue import Queue

        self.label, self.total = label, total
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ssfer-progress", daemon=True)

    def __enter__(self) -> "_ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        self.queue.shutdown()

    def _show(self, rec: Dict[str, Any]) -> None:
        for line in console.report_lines(self.label, self.total, rec):
            log.info("%s", line)

    def _loop(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                rec = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue's actor is gone: nothing more to print
                return
            self._show(rec)

    def _drain(self) -> None:
        try:
            while not self.queue.empty():
                self._show(self.queue.get_nowait())
        except Exception:  # noqa: BLE001 - the queue's actor is gone
            pass


# ------------------------------------------------------------------------------------------ Ray itself


def _worker_env(use_gpu: bool = False) -> Dict[str, str]:
    """Environment for the workers. ``DS_ACCELERATOR`` follows ``scaling.use_gpu`` (not the driver's own
    hardware: a CPU-only head may drive GPU workers); the worker re-checks against its own devices."""
    env = non_secret_env(FORWARD_ENV)
    env.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ssfer-torch-extensions"))
    return env


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def ensure_ray(cfg: Config) -> None:
    """Connect to ``RAY_ADDRESS`` when set, reuse an initialised Ray, else start a local one of our own.

    The local Ray's raylet and workers are children of this process and inherit its environment (S3
    credentials included); the runtime env carries only non-secret settings."""
    import ray

    console.adopt_library_loggers()        # importing Ray configured its loggers
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    env = {"env_vars": _worker_env(cfg.scaling.use_gpu)}
    if not address:
        return _start_private(cfg, env)
    log.info("connecting to Ray at %s", address)
    try:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    except Exception as e:   # unreachable cluster, start-up timeout: one line naming the address
        raise UserError(f"RAY_ADDRESS={address}: could not connect to Ray: {_first_line(e)}") from None


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _start_private(cfg: Config, env: Dict[str, Any]) -> None:
    import ray

    log.info("starting a local Ray instance (set RAY_ADDRESS to use a running cluster)")
    need = max(1, int(round(cfg.scaling.num_workers * max(cfg.scaling.cpus_per_worker, 1.0))))
    temp = tempfile.mkdtemp(prefix="ssfer-ray-")
    kw: Dict[str, Any] = {}
    if cfg.run.ray_dashboard:
        kw.update(dashboard_host="127.0.0.1", dashboard_port=_free_port())
    try:
        # address="local": a new instance even when `ray start` left one running on this machine; its own temp
        # folder, so two runs on one machine never find each other
        ray.init(address="local", num_cpus=max(need, os.cpu_count() or 1), include_dashboard=cfg.run.ray_dashboard,
                 object_store_memory=256 * 1024 * 1024, log_to_driver=False, runtime_env=env, _temp_dir=temp, **kw)
    except Exception as e:   # e.g. a start-up timeout: one line, not a traceback
        raise UserError(f"could not start a local Ray: {_first_line(e)} (logs: {temp})") from None
    _private.update(gcs=ray.get_runtime_context().gcs_address, temp=temp)
    log.info("started a private local Ray in %s (dashboard %s)", temp,
             f"http://127.0.0.1:{kw['dashboard_port']}" if kw else "off: run.ray_dashboard=true starts it")


def current_private() -> Optional[str]:
    """The temp folder of the local Ray this process started (None: none)."""
    return _private["temp"]


def _is_private() -> bool:
    import ray

    return (_private["gcs"] is not None and ray.is_initialized()
            and ray.get_runtime_context().gcs_address == _private["gcs"])


def finish(ok: bool) -> Optional[str]:
    """At the end of a command: shut this process's local Ray down, and remove its temp folder (Ray's own
    logs; the run's log files have every line of ours) when the command succeeded, unless
    ``SSFER_KEEP_RAY_LOGS`` is set. Returns the folder kept (None: nothing kept, or no local Ray of ours)."""
    temp = _private["temp"]
    if temp is None:
        return None
    try:
        if _is_private():
            import ray

            ray.shutdown()
    finally:
        _private.update(gcs=None, temp=None)
    if not ok or os.environ.get("SSFER_KEEP_RAY_LOGS"):
        return temp
    shutil.rmtree(temp, ignore_errors=True)
    # a daemon of the instance still exiting can recreate its (empty) session folder: once more at exit
    atexit.register(shutil.rmtree, temp, ignore_errors=True)
    return None


# ------------------------------------------------------------------------------------------ checks


def check_gpus_cluster(cfg: Config) -> None:
    """Connected to Ray: a cluster without any GPU fails fast unless it can still add GPU nodes.
    An in-process local Ray (no ``RAY_ADDRESS``) must hold the GPUs now; a remote cluster may autoscale
    GPU groups from zero nodes, so there it is a warning."""
    need = gpus_needed(cfg)
    if not need:
        return
    import ray

    have = float(ray.cluster_resources().get("GPU", 0.0))
    if have >= need:
        return
    msg = f"scaling.use_gpu: the run needs {need:g} GPUs, the Ray cluster has {have:g} now"
    if not on_cluster():
        raise UserError(msg + "; set scaling.use_gpu: false or start Ray with GPUs")
    log.warning("%s: waiting for the autoscaler to add GPU nodes", msg)


def check_gpus_local(cfg: Config, ray_is_ours: Optional[bool] = None) -> None:
    """``scaling.use_gpu`` on a local run: this machine (or the Ray this process already started) must have
    the GPUs, else one clear error before any worker starts (Ray would wait for them forever). A CPU-only
    head driving GPU workers of a cluster is checked by :func:`check_gpus_cluster`."""
    if not gpus_needed(cfg) or on_cluster():
        return
    if ray_is_ours is None:
        import ray

        ray_is_ours = ray.is_initialized()
    if ray_is_ours:                    # a Ray this process started: its resources are this machine's
        return check_gpus_cluster(cfg)
    check_gpus(cfg)


def _storage_args(url: str, retry_s: float = 120.0) -> Dict[str, Any]:
    """RunConfig storage arguments: a local folder, or a pyarrow S3 filesystem built from the AWS_* env
    (what Ray Train itself writes there — its checkpoint-manager snapshot — retried for ``retry_s``,
    see :mod:`ssfer_dist.distributed.arrowfs`)."""
    if not storage.is_s3(url):
        return {"storage_path": os.path.abspath(url)}
    import pyarrow.fs as pafs

    bucket, prefix = storage.parse_s3(url)
    storage.ensure_dir(url)
    kw: Dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kw.update(endpoint_override=host or endpoint, scheme=scheme if host else "https")
    # No explicit keys: the AWS SDK's default chain reads them from each process's own environment, so the
    # pickled filesystem (sent to the Ray Train controller and workers, kept in the run's trainer state)
    # holds no credential.
    kw["region"] = os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1"))
    kw["retry_strategy"] = pafs.AwsDefaultS3RetryStrategy(max_attempts=3)
    # The SDK's retries miss a refused connection; every call is retried for run.storage_retry_s (arrowfs).
    fs = arrowfs.retrying(pafs.S3FileSystem(**kw), retry_s)
    return {"storage_path": f"{bucket}/{prefix}".rstrip("/"), "storage_filesystem": fs}


# ------------------------------------------------------------------------------------------ the launcher


def _trainer(cfg: Config, payload: Dict[str, Any]) -> Any:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    sc, fc = cfg.scaling, cfg.failure
    res: Dict[str, float] = {"CPU": float(sc.cpus_per_worker)}
    if sc.use_gpu:
        res["GPU"] = float(sc.gpus_per_worker or 1.0)
    res.update(sc.resources_per_worker)
    # Ray Train's documented timeouts (its own errors name them), read by its controller from the driver's
    # environment: a worker group that cannot be placed fails the attempt after start_timeout_s instead of
    # waiting in silence
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(float(fc.start_timeout_s))
    os.environ.setdefault("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S", str(float(max(60.0, fc.stall_timeout_s or 600.0))))
    run_config = ray.train.RunConfig(
        name=cfg.run.name,
        # start failures are retried max(2, max_failures) times, never forever (Ray's default: -1)
        failure_config=ray.train.FailureConfig(max_failures=fc.max_failures,
                                               controller_failure_limit=max(2, fc.max_failures)),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        **_storage_args(abs_storage(cfg.run.storage), cfg.run.storage_retry_s))
    return TorchTrainer(train_fn, train_loop_config=payload, run_config=run_config,
                        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                                               resources_per_worker=res),
                        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo",
                                                 timeout_s=int(fc.collective_timeout_s)))


class RayLauncher(Launcher):
    name = "ray"

    def check_machine(self, cfg: Config) -> None:
        check_gpus_local(cfg)
        check_fast_path_local(cfg)

    def run(self, cfg: Config, plan: Optional[LaunchPlan] = None, label: Optional[str] = None) -> RunResult:
        """Every line of the run (ours and Ray's driver-side lines) goes to ``<run>/logs/ssfer.log``, each
        worker's to ``<run>/logs/worker-<rank>.log``; the console shows only ours."""
        storage.set_retry_budget(cfg.run.storage_retry_s)
        self.check_machine(cfg)            # before the pre-flight writes anything or any worker starts
        return super().run(cfg, plan, label)

    def start(self, cfg: Config, plan: LaunchPlan, label: str) -> Dict[str, Any]:
        sc = cfg.scaling
        log.info("[%s] run %s (%s): %d workers, %d steps, global batch %d, lr %.3g → %s", label, cfg.run.name,
                 cfg.train.stage, sc.num_workers, plan.total_steps, plan.global_batch, plan.effective_lr,
                 plan.run_url)
        ensure_ray(cfg)
        check_gpus_cluster(cfg)
        launched = time.time() - 1.0
        payload = {"config": to_dict(cfg), "plan": plan, "env": _worker_env(sc.use_gpu), "label": label,
                   "launched_at": launched}
        return {"cfg": cfg, "plan": plan, "label": label, "payload": payload, "launched": launched}

    def wait(self, run: Dict[str, Any]) -> RunResult:
        cfg, plan, label = run["cfg"], run["plan"], run["label"]
        with console.log_file(plan.run_url) as log_path, _ProgressPrinter(label, plan.total_steps) as progress:
            trainer = _trainer(cfg, dict(run["payload"], progress=progress.queue))
            log.info("[%s] starting %d Ray Train workers (full log: %s)", label, cfg.scaling.num_workers, log_path)
            t0 = time.time()
            try:
                result, error = trainer.fit(), None
                error = getattr(result, "error", None)
            except Exception as e:
                result, error = None, e
        return self._outcome(cfg, plan, label, result, error, log_path, t0, run["launched"])

    def _outcome(self, cfg: Config, plan: LaunchPlan, label: str, result: Any, error: Optional[BaseException],
                 log_path: str, t0: float, launched: float) -> RunResult:
        try:
            sweep_incomplete(plan.run_url)         # no partial checkpoint survives a failed (or any) run
        except UserError as e:
            log.warning("could not sweep incomplete checkpoints: %s", e)
        if error is not None:
            log.debug("[%s] the run's error in full:\n%s", label, "".join(traceback.format_exception(error)))
            why = faults.one_line(error, faults.read_causes(plan.run_url, launched))
            log.info("[%s] full log of the failed run: %s (workers: worker-<rank>.log beside it)", label, log_path)
            raise faults.RunFailed(f"run {cfg.run.name} failed: {why}") from error
        export = export_url(plan.run_url)
        log.info("[%s] done in %.0f s: weights %s, metrics %s, log %s", label, time.time() - t0, export,
                 storage.join(plan.run_url, "metrics.jsonl"), log_path)
        ck = result.checkpoint.path if result.checkpoint is not None else None
        return RunResult(run_url=plan.run_url, export_path=export, metrics=dict(result.metrics or {}), checkpoint=ck)

    def run_from_cli(self, config_path: str, overrides: List[str], cfg: Config) -> int:
        plan = self.plan(cfg)              # the inputs first: a bad one is reported before Ray starts
        result = self.run(cfg, plan)
        print(json.dumps({"run": result.run_url, "export": result.export_path,
                          "final": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}},
                         sort_keys=True))
        return 0

    def finish(self, ok: bool) -> Optional[str]:
        return finish(ok)


def run_stage(cfg: Config, plan: Optional[LaunchPlan] = None, label: Optional[str] = None) -> RunResult:
    """One stage on Ray to its final step (resuming from the run's latest checkpoint if any)."""
    return RayLauncher().run(cfg, plan, label)
