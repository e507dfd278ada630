"""Ray Train's torch process-group backend, without torch in Ray Train's controller.

``TorchTrainer(torch_config=TorchConfig(...))`` sends the config to the run's controller actor, and unpickling
it imports ``ray.train.torch.config``, which imports torch: 1.8-2 s of the controller's start on a 2-core
machine, before it asks for a single worker — the controller itself never touches a tensor. :func:`backend_config`
returns a config with the same fields whose module imports no torch; its backend does in the controller
what Ray's ``_TorchBackend`` does for a GPU or CPU group (choose nccl/gloo, rank 0's address and a free port,
``env://``) and calls Ray's own worker-side functions (``_set_torch_distributed_env_vars``,
``_setup_torch_process_group``, ``_shutdown_torch``, ``TorchConfigContextManager``) in the workers, where torch
is imported anyway. TPU groups are not ours to start; a Ray whose private names moved gets its own
``TorchConfig`` back (slower, never wrong).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Dict, Optional

__all__ = ["backend_config"]


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


def _set_dist_env() -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()


def _setup_process_group(**kwargs: Any) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(**kwargs)


def _shutdown(destroy_process_group: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


class _TrainFuncContext:
    """Ray's ``TorchConfigContextManager`` (the CUDA device of the worker's thread), created in the worker."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self._cm = TorchConfigContextManager()
        return self._cm.__enter__()

    def __exit__(self, *exc: Any):
        return self._cm.__exit__(*exc)


try:
    from ray.exceptions import GetTimeoutError
    from ray.train._internal.utils import get_address_and_port
    from ray.train.backend import Backend, BackendConfig
    from ray.train.v2._internal.util import TrainingFramework
except ImportError:  # pragma: no cover - another Ray layout: Ray's TorchConfig is used
    Backend = BackendConfig = None

if BackendConfig is not None:
    class LightTorchBackend(Backend):
        """Ray's ``_TorchBackend`` for GPU (nccl) and CPU (gloo) groups; torch only in the workers."""

        share_cuda_visible_devices: bool = True

        def on_start(self, worker_group, backend_config) -> None:
            import ray

            backend = backend_config.backend
            if backend is None:
                gpus = worker_group.get_resources_per_worker().get("GPU", 0)
                backend = "nccl" if gpus > 0 else "gloo"
            addr, port = worker_group.execute_single(0, get_address_and_port)
            worker_group.execute(_set_master, addr=addr, port=port)
            worker_group.execute(_set_dist_env)
            n = len(worker_group)
            ray.get([worker_group.execute_single_async(i, _setup_process_group, backend=backend, world_rank=i,
                                                       world_size=n, init_method="env://",
                                                       timeout_s=backend_config.timeout_s)
                     for i in range(n)])

        def on_shutdown(self, worker_group, backend_config) -> None:
            import ray

            futures = worker_group.execute_async(_shutdown, destroy_process_group=len(worker_group) > 1)
            timeout = float(os.environ.get("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", 30))
            try:
                ray.get(futures, timeout=timeout)
            except GetTimeoutError:
                logging.getLogger(__name__).warning("torch process group shutdown timed out after %g s", timeout)

    @dataclasses.dataclass
    class LightTorchConfig(BackendConfig):
        """``TorchConfig``'s fields (``init_method`` is always ``env``)."""

        backend: Optional[str] = None
        init_method: str = "env"
        timeout_s: int = 1800

        @property
        def backend_cls(self):
            return LightTorchBackend

        @property
        def train_func_context(self):
            return _TrainFuncContext

        @property
        def framework(self):
            return TrainingFramework.TORCH

        def to_dict(self) -> Dict[str, Any]:
            return {"backend": self.backend, "init_method": self.init_method, "timeout_s": self.timeout_s}


def backend_config(backend: Optional[str], timeout_s: int):
    """The ``torch_config`` for a ``TorchTrainer``: :class:`LightTorchConfig`, or Ray's ``TorchConfig`` where
    this Ray lacks the names it builds on."""
    if BackendConfig is None:  # pragma: no cover
        from ray.train.torch import TorchConfig

        return TorchConfig(backend=backend, timeout_s=timeout_s)
    return LightTorchConfig(backend=backend, timeout_s=timeout_s)
