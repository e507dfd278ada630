"""Start-up (issue 16): the collector's thresholds are raised while a process imports (``ssfer_dist.startup``),
put back once a training worker is built, and every Ray worker process of a private local Ray starts with
them (its ``worker_process_setup_hook``)."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap

import pytest

from ssfer_dist import startup


def test_relax_then_settle_restores_the_thresholds_and_freezes(monkeypatch):
    monkeypatch.setattr(startup, "_saved", None)
    before = gc.get_threshold()
    startup.settle_gc()                              # nothing relaxed: a no-op (no freeze in a test process)
    frozen = gc.get_freeze_count()
    assert gc.get_threshold() == before
    try:
        startup.relax_gc()
        startup.relax_gc()                           # idempotent: the first call's thresholds are kept
        assert gc.get_threshold() == startup.START_THRESHOLDS
        startup.settle_gc()
        assert gc.get_threshold() == before and gc.get_freeze_count() > frozen
        startup.settle_gc()
        assert gc.get_threshold() == before
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


@pytest.mark.timeout(240)
def test_a_private_local_ray_starts_its_workers_with_the_relaxed_collector():
    script = textwrap.dedent("""
        import gc, json, ray
        from ssfer_dist.config import Config
        from ssfer_dist.distributed import launch, localray
        launch.ensure_ray(Config())
        assert localray.is_private()

        @ray.remote(num_cpus=0)
        def thresholds():
            return gc.get_threshold()

        print("RESULT", json.dumps(ray.get(thresholds.remote(), timeout=120)))
        localray.finish(ok=True)            # shut down, its temp folder removed
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=200)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stdout[-2000:] + p.stderr[-3000:]
    assert tuple(json.loads(line[0].split(" ", 1)[1])) == startup.START_THRESHOLDS
