"""The torch backend config handed to Ray Train's controller: same fields as Ray's ``TorchConfig``, and a controller
that unpickles it imports no torch (the process groups themselves are exercised by every Ray test)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

from ssfer_dist.distributed import torchbackend


def test_the_config_has_ray_torch_configs_fields_and_framework():
    from ray.train.torch import TorchConfig

    ours, ray_cfg = torchbackend.backend_config("gloo", 123), TorchConfig(backend="gloo", timeout_s=123)
    assert type(ours).__name__ == "LightTorchConfig"
    assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(ray_cfg)]
    assert ours.to_dict() == ray_cfg.to_dict()
    assert ours.framework == ray_cfg.framework
    assert ours.backend_cls.share_cuda_visible_devices and not ours.backend_cls.has_replica_groups


def test_unpickling_the_config_and_its_backend_imports_no_torch():
    """What the controller does with it: unpickle, build the backend, enter nothing (the train-function
    context is entered in the workers)."""
    import ray.cloudpickle as cp

    cfg = torchbackend.backend_config("nccl", 60)
    blob = cp.dumps({"config": cfg, "backend": cfg.backend_cls(), "context": cfg.train_func_context})
    code = ("import sys, ray.cloudpickle as cp; d = cp.loads(sys.stdin.buffer.read()); "
            "assert d['config'].backend == 'nccl' and d['config'].timeout_s == 60; "
            "assert isinstance(d['backend'], d['config'].backend_cls); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().strip() == "[]"
