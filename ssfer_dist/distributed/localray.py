"""A local Ray private to one ``ssfer run``: its own temp/session folder, lean enough to start fast.

Two runs on one machine never find each other: each has its own temp folder (``ray.init(_temp_dir=…)``),
and Ray's helpers that look for "the" local cluster through the state API are not started (no dashboard
unless ``run.ray_dashboard``; with it, ``RAY_API_SERVER_ADDRESS`` points them at this run's dashboard,
bound to 127.0.0.1). (Ray 2.60 offers no setting that binds the GCS and raylet ports to loopback.)

Start-up (issue 16). On a 2-core machine every Ray process costs seconds: Ray Train starts eight actor
processes around a two-worker run, each importing Ray (and the controller, torch). On this process's own
instance — which dies with it — three of them guard against things that cannot happen here, and are left out:

- ``PlacementGroupCleaner`` (detached; removes the run's placement group if the controller dies while the
  cluster lives on: here the cluster dies with the driver), which also needs the dashboard's state API;
- ``DatasetManager`` (Ray Data shards: the runs read WebDataset shards themselves and pass no datasets);
- ``PreemptionWatcher`` (spot-node preemption notices: a local machine has none);
- ``_AutoscalingCoordinatorActor``, to which the fixed-size scaling policy sends the run's resource request
  for a cluster autoscaler: a private instance has no autoscaler and its resources are all there. The
  controller waited on this actor's start (it imports Ray Data) before placing the workers: ~1.5 s.

Ray Train's Prometheus metrics (``RAY_TRAIN_METRICS_ENABLED``) are off too: nothing scrapes a private
instance, and on two cores their export costs training time (the run's own metrics are in metrics.jsonl).

The controller polls its workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (Ray's default 2 s) and takes two
polls to see a finished run and shut the group down: measured 4.0 s between the train function's return and
"Shutting down 2 workers". Here the interval is 0.5 s unless the user set one (a poll is one small actor call
per worker; a poll that does not answer in time is a missed health check, not a failure).

Every Ray worker process of a private instance starts with the garbage collector's thresholds raised for
its imports (``SETUP_HOOK``, see :mod:`ssfer_dist.startup`).

``SYSTEM_CONFIG``: workers at nice 0 (Ray starts them at 15: here the workers are the run), and no idle
workers prestarted for the driver (none of Ray Train's actors could use them: each has its own runtime env).
On a cluster (``RAY_ADDRESS``) nothing here applies.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import socket
import tempfile
import threading
from typing import Any, Dict, Optional

__all__ = ["private_init_kwargs", "free_port", "mark_private", "is_private", "current_private", "finish",
           "lean_trainer_class", "SYSTEM_CONFIG", "TRAIN_ENV", "TRAIN_ENV_DEFAULTS", "train_env"]

SETUP_HOOK = "ssfer_dist.startup.relax_gc"      # every worker process of a private instance, at its start
SYSTEM_CONFIG = {"worker_niceness": 0, "prestart_worker_first_driver": False}
TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}
TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}     # set only where the user has not
_LEFT_OUT = ("PlacementGroupCleanerCallback", "DatasetsCallback")

_private_gcs: Optional[str] = None
_private_temp: Optional[str] = None      # its temp/session folder (Ray's own logs)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def private_init_kwargs(runtime_env: Dict[str, Any], dashboard: bool = False) -> Dict[str, Any]:
    """``ray.init`` arguments for a private local instance (``runtime_env`` is extended, not replaced)."""
    kw: Dict[str, Any] = {"_temp_dir": tempfile.mkdtemp(prefix="ssfer-ray-"), "runtime_env": dict(runtime_env or {})}
    kw["runtime_env"].setdefault("worker_process_setup_hook", SETUP_HOOK)
    if dashboard:
        port = free_port()
        env = kw["runtime_env"]
        env["env_vars"] = dict(env.get("env_vars", {}), RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{port}")
        kw.update(dashboard_host="127.0.0.1", dashboard_port=port)
    return kw


def mark_private(temp_dir: Optional[str] = None) -> None:
    """Remember that the Ray this process is connected to is the one it just started (in ``temp_dir``)."""
    global _private_gcs, _private_temp
    import ray

    _private_gcs = ray.get_runtime_context().gcs_address
    _private_temp = temp_dir


def current_private() -> Optional[str]:
    """The temp folder of the private Ray this process started (None: none)."""
    return _private_temp


def finish(ok: bool) -> Optional[str]:
    """At the end of a command: shut this process's private Ray down, and remove its temp folder (Ray's own
    logs; the run's log file has every worker line) when the command succeeded, unless ``SSFER_KEEP_RAY_LOGS``
    is set. Returns the folder kept (None: nothing kept, or no private Ray)."""
    global _private_gcs, _private_temp
    import shutil

    if _private_temp is None:
        return None
    temp, _private_temp = _private_temp, None
    try:
        import ray

        if is_private():
            ray.shutdown()
    finally:
        _private_gcs = None
    if not ok or os.environ.get("SSFER_KEEP_RAY_LOGS"):
        return temp
    shutil.rmtree(temp, ignore_errors=True)
    # a daemon of the instance still exiting can recreate its (empty) session folder: once more at exit
    atexit.register(shutil.rmtree, temp, ignore_errors=True)
    return None


def is_private() -> bool:
    """Whether this process is connected to the Ray it started itself (not a cluster, not a test's)."""
    import ray

    return (_private_gcs is not None and ray.is_initialized()
            and ray.get_runtime_context().gcs_address == _private_gcs)


def import_train() -> None:
    try:
        import ray.train.torch  # noqa: F401
        import ssfer_dist.train.loop  # noqa: F401
    except Exception:  # noqa: BLE001 - an import error resurfaces where the module is needed
        pass


def warm_imports() -> threading.Thread:
    """Import Ray Train and the worker loop (torch) in a thread, started before ``ray.init``: the driver then
    spends its wait for Ray's daemons on them (~2 s of a small run's start-up on two cores)."""
    t = threading.Thread(target=import_train, name="ssfer-warm-imports", daemon=True)
    t.start()
    return t


@contextlib.contextmanager
def train_env():
    """``TRAIN_ENV`` (and ``TRAIN_ENV_DEFAULTS`` not set by the user) set in this process while a run starts
    (Ray Train reads them in the driver and passes ``RAY_TRAIN_*`` on to its controller), the previous
    values back afterwards."""
    old = {k: os.environ.get(k) for k in (*TRAIN_ENV, *TRAIN_ENV_DEFAULTS)}
    os.environ.update(TRAIN_ENV)
    for k, v in TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _without_autoscaler_requests(policy):
    """Ray Train's fixed-size scaling policy, minus its resource requests to the autoscaling coordinator
    actor (see the module docstring). Any other policy (elastic) is returned as it is."""
    try:
        from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
    except ImportError:        # another Ray layout: keep Ray's policy (slower, never wrong)
        return policy
    if type(policy) is not FixedScalingPolicy:
        return policy

    class PrivateFixedScalingPolicy(FixedScalingPolicy):
        def after_controller_start(self, train_run_context):
            pass

        def _maybe_send_resource_request(self):
            pass

        def _send_resource_request(self):
            pass

    return PrivateFixedScalingPolicy(policy.scaling_config)


def lean_trainer_class():
    """``TorchTrainer`` without the callbacks of ``_LEFT_OUT`` and without autoscaler requests (see the module
    docstring). Callbacks are matched by class name, so a Ray that renames them only keeps them (slower,
    never wrong); the datasets callback is kept whenever the trainer is given datasets."""
    from ray.train.torch import TorchTrainer

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            drop = set(_LEFT_OUT) if not getattr(self, "datasets", None) else {"PlacementGroupCleanerCallback"}
            return [c for c in callbacks if type(c).__name__ not in drop]

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            if "scaling_policy" in controller_init_kwargs:
                controller_init_kwargs["scaling_policy"] = _without_autoscaler_requests(
                    controller_init_kwargs["scaling_policy"])
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    return LeanTorchTrainer
