"""``ssfer run`` / ``ssfer pipeline``: pre-flight checks, then a Ray Train TorchTrainer per stage.

Pre-flight (before any worker starts): the config is valid, every shard manifest and shard URL is
readable, ``init.weights`` exists, the storage is writable. Each failure is a one-line ``UserError``
naming the key path or URL. Then a TorchTrainer runs :func:`ssfer_dist.train.loop.train_loop_per_worker`
with ScalingConfig / RunConfig(storage_path, FailureConfig, CheckpointConfig) from the config.
Connects to ``RAY_ADDRESS`` when set (``ray job submit -- ssfer run CONFIG``), else starts a small
local Ray.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional

import yaml

from ssfer_dist import storage
from ssfer_dist.config import Config, absolute_paths, derived, load_pipeline, to_dict
from ssfer_dist.errors import UserError
from ssfer_dist.stages import get_stage, load_stage_config
from ssfer_dist.plan import LaunchPlan, UnlabeledPlan
from ssfer_dist.worker_env import non_secret_env

log = logging.getLogger(__name__)

__all__ = ["RunResult", "run_stage", "run_from_cli", "pipeline_from_cli", "preflight", "run_pipeline"]

# Non-secret settings forwarded to the workers (they may run on other nodes or in a Ray started earlier).
# Credentials are never forwarded (see ssfer_dist/worker_env.py): workers read them from their own process
# environment (a local Ray inherits the driver's; KubeRay pods read the ssfer-s3 Secret).
FORWARD_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EC2_METADATA_DISABLED",
               "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS", "SSFER_COMM_GUARD")


@dataclasses.dataclass
class RunResult:
    """What a finished stage left behind."""

    run_url: str
    export_path: str
    metrics: Dict[str, Any]
    checkpoint: Optional[str] = None


def run_url(cfg: Config) -> str:
    return storage.join(_abs_storage(cfg.run.storage), cfg.run.name)


def _abs_storage(url: str) -> str:
    return url if storage.is_s3(url) else os.path.abspath(url)


def _read_manifest(url: str, key: str):
    from ssfer_dist.shards.manifest import read_manifest

    try:
        return read_manifest(url, with_index=False)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None


def _check_shards(manifest, key: str) -> List[str]:
    urls = manifest.shard_urls()
    if not urls:
        raise UserError(f"{key}: {manifest.url}: the manifest lists no shards")
    # One listing of the manifest's folder (a few requests for thousands of shards on S3) instead of a
    # request per shard; shards stored elsewhere are checked one by one.
    base = manifest.url.rstrip("/") + "/"
    present = set(storage.list_files(manifest.url))
    for u in urls:
        found = u[len(base):] in present if u.startswith(base) else storage.exists(u)
        if not found:
            raise UserError(f"{key}: shard {u} listed in {manifest.url}/manifest.parquet is missing")
    return urls


def preflight(cfg: Config, check_storage: bool = True) -> LaunchPlan:
    """Validate everything a run needs before a worker starts; returns the launch plan (derived once)."""
    cfg = absolute_paths(cfg)
    stage = get_stage(cfg.train.stage)
    labeled = _read_manifest(cfg.data.shards, "data.shards")
    urls = _check_shards(labeled, "data.shards")
    if stage.needs_labels and labeled.num_classes == 0:
        raise UserError(f"data.shards: {labeled.url} is unlabeled; stage {stage.name!r} needs labeled shards")
    unl = []
    datasets = [labeled.dataset]
    first = 0  # sample ids run over all unlabeled sources: source after source, shard after shard
    for i, u in enumerate(cfg.data.unlabeled if stage.needs_unlabeled else []):
        key = f"data.unlabeled[{i}].shards"
        m = _read_manifest(u.shards, key)
        datasets.append(m.dataset)
        offsets = []
        for s in m.shards:
            offsets.append(first)
            first += s.num_samples
        unl.append(UnlabeledPlan(urls=tuple(_check_shards(m, key)), weight=u.weight, num_samples=m.num_samples,
                                 offsets=tuple(offsets), counts=tuple(int(s.num_samples) for s in m.shards)))
    if cfg.init.weights:
        w = cfg.init.weights
        if os.path.isdir(w):
            w = os.path.join(w, "model.safetensors")
        if not storage.exists(w):
            raise UserError(f"init.weights: {w}: weights file not found")
    eval_urls: List[str] = []
    eval_n = 0
    if cfg.eval.shards:
        em = _read_manifest(cfg.eval.shards, "eval.shards")
        if em.num_classes == 0:
            raise UserError(f"eval.shards: {em.url} is unlabeled; evaluation needs labeled shards")
        if em.num_classes != labeled.num_classes:
            raise UserError(f"eval.shards: {em.url} has {em.num_classes} classes, data.shards "
                            f"{labeled.num_classes}")
        eval_urls, eval_n = _check_shards(em, "eval.shards"), em.num_samples
    d = derived(cfg, labeled.num_samples)
    plan = LaunchPlan(
        stage=stage.name, run_url=run_url(cfg), shard_urls=tuple(urls), num_samples=labeled.num_samples,
        image_size=labeled.image_size, num_ranks=d["num_ranks"], batch_size_per_rank=d["batch_size_per_rank"],
        grad_accum=d["grad_accum"], global_batch=d["global_batch"], effective_lr=d["effective_lr"],
        steps_per_epoch=d["steps_per_epoch"], total_steps=d["total_steps"], warmup_steps=d["warmup_steps"],
        num_classes=labeled.num_classes if stage.needs_labels else 0,
        class_names=tuple(labeled.class_names) if stage.needs_labels else (),
        unlabeled=tuple(unl), num_unlabeled=first,
        register_s3=any(storage.is_s3(x) for x in [cfg.data.shards, cfg.eval.shards or ""]
                        + [u.shards for u in cfg.data.unlabeled]),
        datasets=tuple(dict.fromkeys(d for d in datasets if d)), eval_urls=tuple(eval_urls), eval_num_samples=eval_n,
        shard_counts=tuple(int(s.num_samples) for s in labeled.shards))
    from ssfer_dist.stages.base import StageConfigs      # torch: not imported by `import launch`

    stage.preflight(StageConfigs.of(cfg), plan)
    if check_storage:
        try:
            storage.check_writable(_abs_storage(cfg.run.storage))
        except UserError as e:
            raise UserError(f"run.storage: {e}") from None
    return plan


def dry_run_text(cfg: Config, source: str) -> str:
    """The resolved config and the batch arithmetic (manifest sample count when readable)."""
    num_samples = None
    note = ""
    try:
        num_samples = _read_manifest(cfg.data.shards, "data.shards").num_samples
    except UserError as e:
        note = f"# manifest not readable ({e}); steps per epoch unknown\n"
    d = derived(cfg, num_samples)
    lines = [f"# resolved config: {source}", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "",
             "# derived (computed, never written back)"]
    lines += [f"{k}: {v}" for k, v in d.items()]
    lines.append(f"# global_batch = batch_size_per_rank {cfg.data.batch_size_per_rank} x ranks "
                 f"{cfg.scaling.num_workers} x grad_accum {cfg.train.grad_accum} = {d['global_batch']}")
    if cfg.optim.lr is None:
        lines.append(f"# effective_lr = base_lr {cfg.optim.base_lr:g} x {d['global_batch']} / 256"
                     f" = {d['effective_lr']:g}")
    lines += ["", "# fast path on this machine (each worker resolves the automatic switches on its own device)"]
    lines += fast_path_lines(cfg)
    return "\n".join(lines) + "\n" + note


def local_device(cfg: Config) -> str:
    """The device type a worker on this machine would train on."""
    import torch

    return "cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu"


def fast_path_lines(cfg: Config) -> List[str]:
    from ssfer_dist.train import fastpath
    from ssfer_dist.typed import ConfigError

    dev = local_device(cfg)
    try:
        lines = fastpath.describe(fastpath.resolve(cfg, dev))
    except ConfigError as e:
        return [f"# error on this machine: {e}"]
    if cfg.scaling.use_gpu and dev == "cpu":
        lines.append("# scaling.use_gpu: true but this machine has no CUDA: on CUDA workers the automatic switches "
                     "(null) turn on data.pin_memory, optim.fused, train.compile (ZeRO 0-2), and train.tf32 applies")
    return lines


# ------------------------------------------------------------------------------------------------ ray


def _worker_env(use_gpu: bool = False) -> Dict[str, str]:
    """Environment for the workers. ``DS_ACCELERATOR`` follows ``scaling.use_gpu`` (not the driver's own
    hardware: a CPU-only head may drive GPU workers); the worker re-checks against its own devices."""
    env = non_secret_env(FORWARD_ENV)
    env.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ssfer-torch-extensions"))
    return env


def ensure_ray(cfg: Config, warm: bool = True) -> None:
    """Connect to ``RAY_ADDRESS`` when set, reuse an initialised Ray, else start a small local one.

    The local Ray's raylet and workers are children of this process and inherit its environment (S3
    credentials included); the runtime env carries only non-secret settings."""
    import ray

    from ssfer_dist import console

    if ray.is_initialized():
        console.route_ray_output()
        return
    console.prepare_ray_import()
    address = os.environ.get("RAY_ADDRESS")
    env = {"env_vars": _worker_env(cfg.scaling.use_gpu)}
    if address:
        log.info("connecting to Ray at %s", address)
        try:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        except Exception as e:   # unreachable cluster, start-up timeout: one line naming the address
            why = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserError(f"RAY_ADDRESS={address}: could not connect to Ray: {type(e).__name__}: {why}") from None
        console.route_ray_output()
        return
    log.info("starting a local Ray instance (set RAY_ADDRESS to use a running cluster)")
    need = max(1, int(round(cfg.scaling.num_workers * max(cfg.scaling.cpus_per_worker, 1.0))))
    from ssfer_dist.distributed import localray

    kw = localray.private_init_kwargs(env, dashboard=cfg.run.ray_dashboard)
    warm_t = localray.warm_imports() if warm else None   # ray.init mostly waits on its daemons: import meanwhile
    try:
        # address="local": a new instance even when `ray start` left one running on this machine.
        # The dashboard (run.ray_dashboard) is off by default: its ten head processes cost ~5 s of a small
        # run's start-up, and a private instance has no placement-group cleaner polling its state API.
        ray.init(address="local", num_cpus=max(need, os.cpu_count() or 1), include_dashboard=cfg.run.ray_dashboard,
                 object_store_memory=256 * 1024 * 1024, log_to_driver=True,
                 _system_config=localray.SYSTEM_CONFIG, **kw)
        if warm_t is not None:
            warm_t.join(timeout=120)
        localray.mark_private(kw["_temp_dir"])
        log.info("started a private local Ray in %s (dashboard %s)", kw["_temp_dir"],
                 kw["runtime_env"]["env_vars"]["RAY_API_SERVER_ADDRESS"] if cfg.run.ray_dashboard
                 else "off: run.ray_dashboard=true starts it")
    except Exception as e:   # e.g. a start-up timeout: one line, not a traceback
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"could not start a local Ray: {type(e).__name__}: {why} (logs: {kw['_temp_dir']})") from None
    console.route_ray_output()


def _storage_args(url: str, retry_s: float = 120.0) -> Dict[str, Any]:
    """RunConfig storage arguments: a local folder, or a pyarrow S3 filesystem built from the AWS_* env
    (what Ray Train itself writes there — its checkpoint-manager snapshot — retried for ``retry_s``,
    see :mod:`ssfer_dist.distributed.arrowfs`)."""
    if not storage.is_s3(url):
        return {"storage_path": os.path.abspath(url)}
    import pyarrow.fs as pafs

    from ssfer_dist.distributed import arrowfs

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


def on_cluster() -> bool:
    """``RAY_ADDRESS`` names a cluster (``local`` asks Ray for a new local instance: this machine)."""
    return os.environ.get("RAY_ADDRESS", "") not in ("", "local")


def gpus_needed(cfg: Config) -> float:
    sc = cfg.scaling
    return sc.num_workers * float(sc.gpus_per_worker or 1.0) if sc.use_gpu else 0.0


def check_gpus_local(cfg: Config, ray_is_ours: Optional[bool] = None) -> None:
    """``scaling.use_gpu`` on a local run (no ``RAY_ADDRESS``, no Ray started by the caller): this machine
    must have the GPUs, else one clear error before any worker starts (Ray would wait for them forever).
    A CPU-only head driving GPU workers of a cluster is fine: that is checked by :func:`check_gpus_cluster`."""
    need = gpus_needed(cfg)
    if not need or on_cluster():
        return
    if ray_is_ours is None:
        import ray

        ray_is_ours = ray.is_initialized()
    if ray_is_ours:                    # a Ray this process started: its resources are this machine's
        return check_gpus_cluster(cfg)
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have == 0:
        raise UserError("scaling.use_gpu: true, but this machine has no CUDA GPU (torch.cuda.is_available() is "
                        "False) and no Ray cluster is given (RAY_ADDRESS); set scaling.use_gpu: false to train on "
                        "the CPU, or submit the run to a GPU cluster")
    if have < need:
        raise UserError(f"scaling.use_gpu: {cfg.scaling.num_workers} workers x {cfg.scaling.gpus_per_worker or 1.0:g} "
                        f"GPU need {need:g} GPUs, this machine has {have}; lower scaling.num_workers")


def check_fast_path_local(cfg: Config) -> None:
    """On a local run the workers share this machine: an explicit ``train.compile: true`` without a compiler
    fails here, before any worker starts (on a cluster each worker checks its own machine)."""
    if on_cluster():
        return
    from ssfer_dist.train import fastpath

    fastpath.resolve(cfg, local_device(cfg))


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
    msg = (f"scaling.use_gpu: the run needs {need:g} GPUs, the Ray cluster has {have:g} now")
    if not on_cluster():
        raise UserError(msg + "; set scaling.use_gpu: false or start Ray with GPUs")
    log.warning("%s: waiting for the autoscaler to add GPU nodes", msg)


def run_stage(cfg: Config, plan: Optional[LaunchPlan] = None, label: Optional[str] = None) -> RunResult:
    """Run one stage to its final step on Ray (resuming from the run's latest checkpoint if any).
    ``label`` tags its progress lines (default: the stage name). Every line of the run (ours, Ray's, the
    workers') goes to ``<run>/logs/ssfer.log``; the console shows only ours (:mod:`ssfer_dist.console`)."""
    from ssfer_dist import console

    cfg = absolute_paths(cfg)          # configs built in code (from_dict) may hold relative paths
    storage.set_retry_budget(cfg.run.storage_retry_s)
    check_gpus_local(cfg)              # before the pre-flight writes anything or any worker starts
    check_fast_path_local(cfg)
    if plan is None:
        plan = preflight(cfg)
    with console.log_file(plan.run_url) as log_path:
        return _run_stage(cfg, plan, label or plan.stage, log_path)


def train_loop_per_worker(payload: Dict[str, Any]) -> None:
    """Ray Train's worker entry: the loop with Ray's worker context."""
    from ssfer_dist.distributed.context import RayContext
    from ssfer_dist.train.loop import run_worker

    run_worker(payload, RayContext(payload["plan"].run_url))


def _run_stage(cfg: Config, plan: LaunchPlan, label: str, log_path: str) -> RunResult:
    sc = cfg.scaling
    log.info("[%s] run %s (%s): %d workers, %d steps, global batch %d, lr %.3g → %s", label, cfg.run.name,
             cfg.train.stage, sc.num_workers, plan.total_steps, plan.global_batch, plan.effective_lr, plan.run_url)
    ensure_ray(cfg)
    check_gpus_cluster(cfg)
    import ray.train
    from ray.train.torch import TorchTrainer

    from ssfer_dist.distributed import localray, torchbackend
    res: Dict[str, float] = {"CPU": float(sc.cpus_per_worker)}
    if sc.use_gpu:
        res["GPU"] = float(sc.gpus_per_worker or 1.0)
    res.update(sc.resources_per_worker)
    scaling = ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=res)
    fc = cfg.failure
    # Ray Train reads these in its controller (propagated from the driver's environment): a worker group
    # that cannot be placed fails the attempt after start_timeout_s instead of waiting in silence.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(float(fc.start_timeout_s))
    os.environ.setdefault("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S",
                          str(float(max(60.0, fc.stall_timeout_s or 600.0))))
    # start failures are retried max(2, max_failures) times, never forever (Ray's default: -1)
    start_retries = max(2, fc.max_failures)
    run_config = ray.train.RunConfig(
        name=cfg.run.name,
        failure_config=ray.train.FailureConfig(max_failures=fc.max_failures, controller_failure_limit=start_retries),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        **_storage_args(_abs_storage(cfg.run.storage), cfg.run.storage_retry_s),
    )
    payload = {"config": to_dict(cfg), "plan": plan, "env": _worker_env(sc.use_gpu), "label": label}
    private = localray.is_private()   # this process's own Ray: no cluster-only helper actors (see localray)
    trainer_cls = localray.lean_trainer_class() if private else TorchTrainer
    trainer = trainer_cls(train_loop_per_worker, train_loop_config=payload, scaling_config=scaling,
                           run_config=run_config,
                           torch_config=torchbackend.backend_config("nccl" if sc.use_gpu else "gloo",
                                                                    int(fc.collective_timeout_s)))
    log.info("[%s] starting %d Ray Train workers (full log: %s)", label, sc.num_workers, log_path)
    from ssfer_dist.distributed import faults
    from ssfer_dist.train.checkpoint import sweep_incomplete

    t0 = time.time()
    started = t0 - 1.0
    try:
        with _permanent_faults_not_retried(), (localray.train_env() if private else contextlib.nullcontext()):
            result = trainer.fit()
        error = getattr(result, "error", None)
    except Exception as e:
        error = e
    try:
        sweep_incomplete(plan.run_url)         # no partial checkpoint survives a failed (or any) run
    except UserError as e:
        log.warning("could not sweep incomplete checkpoints: %s", e)
    if error is not None:
        why = faults.one_line(error, faults.read_causes(plan.run_url, started))
        log.info("[%s] full log of the failed run: %s", label, log_path)
        raise faults.RunFailed(f"run {cfg.run.name} failed: {why}") from error
    export = storage.join(plan.run_url, "export", "model.safetensors")
    log.info("[%s] done in %.0f s: weights %s, metrics %s, log %s", label, time.time() - t0, export,
             storage.join(plan.run_url, "metrics.jsonl"), log_path)
    ck = result.checkpoint.path if result.checkpoint is not None else None
    return RunResult(run_url=plan.run_url, export_path=export, metrics=dict(result.metrics or {}), checkpoint=ck)


@contextlib.contextmanager
def _permanent_faults_not_retried():
    """Give Ray Train a failure policy that raises a permanent fault (missing shard, full disk, access
    denied) at once instead of restarting the worker group. Ray has no public hook for this; the factory
    name is swapped for the duration of ``fit()`` and, without it, Ray's default policy applies."""
    from ssfer_dist.distributed.faults import failure_policy_factory

    try:
        import ray.train.v2.api.data_parallel_trainer as dpt
    except ImportError:
        yield
        return
    factory = failure_policy_factory()
    if factory is None or not hasattr(dpt, "create_failure_policy"):
        log.warning("this Ray has no failure-policy hook; permanent faults use max_failures restarts")
        yield
        return
    saved = dpt.create_failure_policy
    dpt.create_failure_policy = factory
    try:
        yield
    finally:
        dpt.create_failure_policy = saved


# ------------------------------------------------------------------------------------------------ CLI


def run_from_cli(config_path: str, overrides: List[str], dry_run: bool = False, launcher: str = "ray") -> int:
    """``ssfer run CONFIG [--set k=v ...] [--dry-run] [--launcher ray|torchrun]`` → exit code."""
    cfg = load_stage_config(config_path, overrides)
    if dry_run:
        sys.stdout.write(dry_run_text(cfg, config_path))
        return 0
    if launcher == "torchrun":
        check_gpus_local(cfg)          # the machine first: nothing is read or written when it cannot run
        check_fast_path_local(cfg)
        return run_torchrun(config_path, overrides, cfg.scaling.num_workers)
    plan = _checked_plan(cfg)
    result = run_stage(cfg, plan)
    print(json.dumps({"run": result.run_url, "export": result.export_path,
                      "final": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}},
                     sort_keys=True))
    return 0


def _check_and_plan(cfg: Config, ray_is_ours: Optional[bool] = None) -> LaunchPlan:
    check_gpus_local(cfg, ray_is_ours)  # the machine first: nothing is read or written when it cannot run
    check_fast_path_local(cfg)
    return preflight(cfg)


def _checked_plan(cfg: Config) -> LaunchPlan:
    """The machine checks and the pre-flight, and on a run that starts its own local Ray, that Ray's start
    beside them: ``ray.init`` mostly waits on its daemons, and the pre-flight's imports (torch, the stage)
    and reads take ~2 s of a small run's start-up on two cores. ``ray.init`` stays on the main thread (its
    daemons die with the thread that started them). A bad input is still reported as its own one-line error,
    once the Ray start has returned, and that Ray is shut down and its folder removed: nothing ran on it."""
    import threading

    import ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return _check_and_plan(cfg)
    from ssfer_dist.distributed import localray

    box: Dict[str, Any] = {}

    def work() -> None:
        try:
            box["plan"] = _check_and_plan(cfg, ray_is_ours=False)    # checked as before ray.init
        except BaseException as e:  # noqa: BLE001 - handled on the main thread
            box["error"] = e
            return
        localray.import_train()        # what the driver needs next (this thread's imports, one at a time)

    t = threading.Thread(target=work, name="ssfer-preflight", daemon=True)
    t.start()
    try:
        ensure_ray(cfg, warm=False)
    except BaseException:
        t.join()
        if isinstance(box.get("error"), UserError):    # the input's own error first
            raise box["error"] from None
        raise
    t.join()
    err = box.get("error")
    try:
        if err is None:
            return box["plan"]
        if isinstance(err, UserError):
            raise err
        # not the input's fault (e.g. an import raced ray.init's): checked again here
        log.debug("pre-flight beside the Ray start failed (%s: %s); repeating it", type(err).__name__, err)
        return _check_and_plan(cfg, ray_is_ours=False)
    except UserError:
        localray.finish(ok=True)       # nothing ran on it
        raise


def torchrun_command(config_path: str, overrides: List[str], nproc: int) -> List[str]:
    """The command ``ssfer run --launcher torchrun`` runs: torchrun on this machine, ``nproc`` ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nproc)}",
           "-m", "ssfer_dist.train", config_path]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def run_torchrun(config_path: str, overrides: List[str], nproc: int, timeout_s: Optional[float] = None) -> int:
    """Run one stage under torchrun on this machine; its ranks print the progress and the result line."""
    import subprocess

    cmd = torchrun_command(config_path, overrides, nproc)
    log.info("starting %d ranks under torchrun: %s", nproc, " ".join(cmd[1:]))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")      # torchrun's default too; the loop sets its own thread count
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


def run_config(cfg: Config, launcher: str = "ray", label: Optional[str] = None,
               config_dir: Optional[str] = None, file_stem: Optional[str] = None) -> RunResult:
    """One stage from a config built in code, on either launcher: ``run_stage`` on Ray, or torchrun with the
    config written as YAML (its ranks read a file) to ``config_dir/<file_stem or run.name>.yaml`` (kept for
    the user) or to a temporary folder."""
    if launcher == "ray":
        return run_stage(cfg, label=label)
    import tempfile

    with contextlib.ExitStack() as stack:
        folder = config_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="ssfer-config-"))
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{file_stem or cfg.run.name}.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        rc = run_torchrun(path, [], cfg.scaling.num_workers)
    url = run_url(cfg)
    if rc != 0:
        raise UserError(f"run {cfg.run.name} failed under torchrun (exit {rc}); see "
                        f"{storage.join(url, 'logs', 'ssfer.log')}")
    return RunResult(run_url=url, export_path=storage.join(url, "export", "model.safetensors"), metrics={})


_PIPE_STAGES = ("pretrain", "finetune", "semisup")


def _split_pipeline_overrides(overrides: List[str]):
    """``pretrain.x.y=v`` → stage override (unless x is config/overrides); ``*.x.y=v`` → every stage."""
    own, per_stage = [], {s: [] for s in _PIPE_STAGES}
    for o in overrides or []:
        head, _, rest = o.partition(".")
        second = rest.split("=", 1)[0].split(".", 1)[0]
        if head == "*" and rest:
            for s in _PIPE_STAGES:
                per_stage[s].append(rest)
        elif head in _PIPE_STAGES and rest and second not in ("config", "overrides"):
            per_stage[head].append(rest)
        else:
            own.append(o)
    return own, per_stage


def pipeline_configs(path: str, overrides: List[str]) -> List[Config]:
    """The three stage configs of a pipeline, each stage's ``init.weights`` set to the previous export.
    Later stages are validated against the previous stage's export path (not yet existing)."""
    own, per_stage = _split_pipeline_overrides(overrides)
    pcfg = load_pipeline(path, own)
    cfgs: List[Config] = []
    prev_export: Optional[str] = None
    for name in _PIPE_STAGES:
        st = getattr(pcfg, name)
        ov = list(st.overrides)
        if pcfg.storage:
            ov.append(f"run.storage={pcfg.storage}")
        ov += per_stage[name]
        if prev_export is not None:
            ov.append(f"init.weights={prev_export}")
        cfg = load_stage_config(st.config, ov)
        expected = {"pretrain": "mae", "finetune": "facemix", "semisup": "semisup"}[name]
        if cfg.train.stage != expected:
            raise UserError(f"{path}: {name}.config: {st.config} has train.stage={cfg.train.stage!r}, "
                            f"expected {expected!r}")
        cfgs.append(cfg)
        prev_export = storage.join(run_url(cfg), "export", "model.safetensors")
    return cfgs


def planned_steps(cfg: Config) -> int:
    """A stage's optimizer steps as far as known before it starts (0 when its manifest is unreadable)."""
    try:
        num = _read_manifest(cfg.data.shards, "data.shards").num_samples
    except UserError:
        num = None
    return int(derived(cfg, num).get("total_steps") or 0)


def run_pipeline(path: str, overrides: List[str]) -> List[RunResult]:
    """pretrain → FaceMix → semi-supervised, each from the previous export, on one Ray instance."""
    from ssfer_dist import console

    cfgs = pipeline_configs(path, overrides)
    first = _checked_plan(cfgs[0])     # fail early for the first stage; later stages are checked before they start
    steps = [planned_steps(c) for c in cfgs]
    results = []
    for i, (name, cfg) in enumerate(zip(_PIPE_STAGES, cfgs)):
        with console.stage(i + 1, len(cfgs), name, future_steps=steps[i + 1:]):
            results.append(run_stage(cfg, first if i == 0 else preflight(cfg), label=name))
    return results


def pipeline_from_cli(config_path: str, overrides: List[str], dry_run: bool = False) -> int:
    """``ssfer pipeline CONFIG [--set ...] [--dry-run]`` → exit code."""
    if dry_run:
        for cfg in pipeline_configs(config_path, overrides):
            sys.stdout.write(dry_run_text(cfg, f"{config_path} [{cfg.train.stage}]") + "\n")
        return 0
    results = run_pipeline(config_path, overrides)
    print(json.dumps({"stages": [{"run": r.run_url, "export": r.export_path} for r in results]}, sort_keys=True))
    return 0
