"""The launchers' driver side without a training run: one-line start-up failures, the local Ray's folder, the
inputs checked before Ray starts, the progress queue, recorded permanent faults, the torchrun command."""
from __future__ import annotations

import os

import pytest

from ssfer_dist import launchers
from ssfer_dist.config import Config
from ssfer_dist.distributed import faults
from ssfer_dist.errors import UserError
from ssfer_dist.launchers import ray as ray_launcher
from ssfer_dist.launchers.torchrun import torchrun_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ray_start_up_failures_are_one_line(monkeypatch):
    import ray

    def boom(*a, **kw):
        raise TimeoutError("Timed out after 60 seconds waiting for the GCS to start.\nmore detail")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", boom)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    with pytest.raises(UserError, match=r"^RAY_ADDRESS=10.0.0.9:6379: could not connect to Ray: TimeoutError: "
                                        r"Timed out after 60 seconds waiting for the GCS to start.$"):
        ray_launcher.ensure_ray(Config())
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(UserError,
                       match=r"^could not start a local Ray: TimeoutError: Timed out .*\(logs: .*ssfer-ray-") as e:
        ray_launcher.ensure_ray(Config())
    kept = str(e.value).rsplit("(logs: ", 1)[1].rstrip(")")
    assert os.path.isdir(kept)                  # kept for the user to read; removed here
    os.rmdir(kept)


def test_a_local_rays_temp_folder_is_removed_after_success_and_kept_after_failure(tmp_path, monkeypatch):
    for ok in (True, False):
        temp = tmp_path / f"ssfer-ray-{ok}"
        (temp / "session_x" / "logs").mkdir(parents=True)
        (temp / "session_x" / "logs" / "raylet.out").write_text("raylet log")
        monkeypatch.setitem(ray_launcher._private, "temp", str(temp))
        monkeypatch.setitem(ray_launcher._private, "gcs", None)      # no Ray connected: nothing to shut down
        kept = launchers.finish_local_ray(ok=ok)
        assert (kept is None) == ok and temp.exists() == (not ok)
        assert launchers.local_ray_started() is None and launchers.finish_local_ray(ok=ok) is None      # once


def test_bad_input_is_reported_before_ray_starts(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_launcher, "ensure_ray", lambda cfg: pytest.fail("Ray started"))
    with pytest.raises(UserError, match="^data.shards: "):
        launchers.run_from_cli(os.path.join(ROOT, "configs", "debug_cpu_pretrain.yaml"),
                               [f"data.shards={tmp_path / 'nowhere'}", f"run.storage={tmp_path / 'runs'}"])
    assert not (tmp_path / "runs").exists()


def test_progress_offers_a_copy_and_never_fails_the_run():
    class Q:
        def __init__(self, broken=False):
            self.items, self.broken = [], broken

        def put_nowait(self, item):
            if self.broken:
                raise RuntimeError("the queue's actor is gone")
            self.items.append(item)

    q, rec = Q(), {"step": 3, "loss": 1.0}
    ray_launcher.offer_progress(q, rec)
    rec["step"] = 4                                  # the record the loop goes on with is not the one queued
    assert q.items == [{"step": 3, "loss": 1.0}]
    ray_launcher.offer_progress(Q(broken=True), rec)   # a printer that is gone costs the line, not the run
    ray_launcher.offer_progress(None, rec)


def test_a_recorded_permanent_fault_names_the_rank_that_hit_it(tmp_path):
    run = str(tmp_path / "run")
    since = 1.0
    faults.write_cause(run, 0, "rank 0 made no progress for 20 s", "stall")
    assert faults.permanent_cause(run, since) is None
    faults.write_cause(run, 1, "/r/checkpoint_00000004/x: No space left on device (ENOSPC)", "permanent")
    rec = faults.permanent_cause(run, since)
    assert rec["rank"] == 1 and rec["cause"].endswith("(ENOSPC)")
    # the restarted group stopped on rank 0 with the same cause: the line names rank 1, which hit it
    err = type("WorkerGroupError", (Exception,), {})("worker errors")
    err.worker_failures = {0: faults.PermanentFault(rec["cause"])}
    line = faults.one_line(err, faults.read_causes(run, since))
    assert line == "rank 1: /r/checkpoint_00000004/x: No space left on device (ENOSPC)"
    assert faults.permanent_cause(run, rec["time"] + 1) is None          # an earlier launch's record is not ours


def test_ssfer_run_under_torchrun_starts_the_launchers_entry():
    cmd = torchrun_command("c.yaml", ["train.max_steps=2"], 2)
    assert cmd[cmd.index("-m", 2):] == ["-m", "ssfer_dist.launchers.torchrun", "c.yaml", "--set", "train.max_steps=2"]
    assert "--nproc-per-node=2" in cmd
    assert sorted(launchers.LAUNCHERS) == ["ray", "torchrun"]
    with pytest.raises(UserError, match="launcher: expected one of ray, torchrun"):
        launchers.get_launcher("slurm")
