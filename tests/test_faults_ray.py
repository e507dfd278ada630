"""Faults on a local Ray with 2 gloo workers (real DeepSpeed on CPU): every fault ends in a bounded time
with one line naming its cause, and no partial checkpoint is left behind.

- a frozen worker (sleeps inside the step: a hung peer, a dead-locked loader) — without the stall
  watchdog and the collective timeout the other rank waits in a gloo all-reduce for 30 min;
- a full disk half-way through one rank's checkpoint upload — a permanent fault: the restarted group finds
  its recorded cause and stops at once, ``ssfer run`` exits 2 with that one line, the partial folder is gone;
- a worker group that can never be placed — Ray's default retries that forever in silence.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import time

import pytest

from faultinject import armed

from ssfer_dist import storage
from ssfer_dist.config import load_config
from ssfer_dist.distributed.faults import RunFailed
from ssfer_dist.train import checkpoint as ck
from ssfer_dist.train.debugdata import write_debug_shards
from tests.privateweed import PrivateWeed

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "configs", "debug_cpu_pretrain.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_debug_shards(str(tmp_path_factory.mktemp("fshards")))


def _ov(name, shards, runs, extra):
    return [f"data.shards={shards['fr']}", f"run.storage={runs}", f"run.name={name}", "train.zero_stage=2",
            "train.preview_every=0", "train.log_every=1"] + list(extra)


@pytest.mark.timeout(900)
def test_a_frozen_worker_ends_the_run_with_a_one_line_cause(ray_local, shards, tmp_path):
    from ssfer_dist.launchers.ray import run_stage

    marker = tmp_path / "stall.marker"
    cfg = load_config(PRETRAIN, _ov("frozen", shards, tmp_path / "runs", [
        "train.max_steps=12", "checkpoint.every_steps=0", "failure.max_failures=0",
        "failure.stall_timeout_s=20", "failure.collective_timeout_s=120"]))
    with armed(3, 1, "stall", marker), pytest.raises(RunFailed) as ei:
        run_stage(cfg)
    ended = time.time()
    msg = str(ei.value)
    assert marker.exists()
    assert "\n" not in msg and msg.startswith("run frozen failed: rank ")
    assert "made no progress for" in msg and "failure.stall_timeout_s=20" in msg, msg
    # bounded: the stall watchdog (20 s) + Ray noticing the dead worker, far below gloo's 30 min
    assert ended - marker.stat().st_mtime < 20 + 90, ended - marker.stat().st_mtime
    causes = [json.loads(storage.get_bytes(os.path.join(tmp_path, "runs", "frozen", "_faults", f)))
              for f in storage.list_files(os.path.join(tmp_path, "runs", "frozen", "_faults"))]
    assert any(c["rank"] == 1 and c["kind"] == "stall" for c in causes), causes


@pytest.mark.timeout(900)
def test_full_disk_mid_checkpoint_fails_at_once_and_leaves_no_partial(ray_local, shards, tmp_path, capsys):
    from ssfer_dist.cli import main

    marker = tmp_path / "enospc.marker"
    runs = tmp_path / "runs"
    args = ["run", PRETRAIN]
    for o in _ov("fulldisk", shards, runs, [
            "train.max_steps=8", "checkpoint.every_steps=2", "failure.max_failures=1"]):
        args += ["--set", o]
    # max_failures: 1 allows a restart, which finds the recorded cause and stops at once (a retry would have
    # finished the run: the fault is injected once)
    t0 = time.time()
    with armed(4, 1, "enospc_upload", marker):
        assert main(args) == 2
    assert time.time() - t0 < 600
    assert marker.exists()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    run = str(runs / "fulldisk")
    assert last.startswith("ssfer run: error: run fulldisk failed: rank 1: "), last
    assert f"{run}/checkpoint_00000004/" in last and last.endswith("No space left on device (ENOSPC)"), last
    names = sorted({f.split("/")[0] for f in storage.list_files(run) if re.match(r"checkpoint_\d+/", f)})
    assert names == ["checkpoint_00000002"]        # the partial step-4 folder was removed
    assert ck.latest_complete(run) == os.path.join(run, "checkpoint_00000002")
    assert ck.is_complete(os.path.join(run, "checkpoint_00000002"))
    assert not os.path.exists(os.path.join(run, "export"))


@pytest.mark.timeout(600)
def test_a_worker_group_that_cannot_be_placed_fails_in_bounded_time(ray_local, shards, tmp_path):
    from ssfer_dist.launchers.ray import run_stage

    cfg = load_config(PRETRAIN, _ov("unplaced", shards, tmp_path / "runs", [
        "scaling.resources_per_worker={ssfer_no_such_accelerator: 1}", "failure.start_timeout_s=10",
        "failure.max_failures=1"]))
    t0 = time.time()
    with pytest.raises(RunFailed, match=r"^run unplaced failed: the worker group could not be placed in time"):
        run_stage(cfg)
    assert time.time() - t0 < 3 * 10 + 90                           # 3 attempts of 10 s, then one line


# ------------------------------------------------------------------------------ storage outage


@pytest.mark.timeout(1500)
def test_a_20s_storage_outage_mid_run_is_absorbed_without_a_restart(ray_local, s3_server, tmp_path, monkeypatch):
    import threading

    from ssfer_dist.launchers.ray import run_stage
    from ssfer_dist.train.debugdata import face_images, write_shard_folder

    weed = PrivateWeed(tmp_path)
    weed.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{weed.port}")
        import boto3

        boto3.client("s3").create_bucket(Bucket="outage")
        shards = write_shard_folder("s3://outage/shards/fr", face_images(128, 32), [-1] * 128, dataset="fr",
                                    num_classes=0, samples_per_shard=16)
        run = "s3://outage/runs/o1"
        cfg = load_config(PRETRAIN, [
            f"data.shards={shards}", "run.storage=s3://outage/runs", "run.name=o1", "train.zero_stage=2",
            "train.preview_every=0", "train.log_every=1", "train.max_steps=24", "checkpoint.every_steps=4",
            "failure.max_failures=0", "run.storage_retry_s=120", "failure.stall_timeout_s=400"])
        outage = {}

        def cut_storage():
            deadline = time.time() + 900
            while time.time() < deadline:            # wait until the run is stepping (step >= 3 logged)
                try:
                    lines = storage.get_bytes(storage.join(run, "metrics.jsonl")).decode().splitlines()
                    if lines and json.loads(lines[-1])["step"] >= 3:
                        break
                except Exception:
                    pass
                time.sleep(1.0)
            outage["start"] = time.time()
            weed.stop()
            time.sleep(20)
            outage["restart"] = time.time()
            weed.start()
            outage["end"] = time.time()

        t = threading.Thread(target=cut_storage, daemon=True)
        t.start()
        res = run_stage(cfg)
        t.join(timeout=120)
        assert "start" in outage and "end" in outage, outage
        assert outage["restart"] - outage["start"] >= 20
        rec = [json.loads(x) for x in storage.get_bytes(storage.join(run, "metrics.jsonl")).decode().splitlines()]
        assert [r["step"] for r in rec] == list(range(1, 25))        # no restart: nothing redone
        assert not storage.exists(storage.join(run, "metrics_redone.jsonl"))
        assert rec[-1]["time"] > outage["end"]                       # the run went on after the outage
        assert storage.exists(res.export_path)
        done = sorted({f.split("/")[0] for f in storage.list_files(run) if re.match(r"checkpoint_\d+/", f)})
        assert done and all(ck.is_complete(storage.join(run, d)) for d in done)
    finally:
        weed.stop()


# ------------------------------------------------------------------------------ two runs, one machine


@pytest.mark.timeout(1500)
def test_two_concurrent_runs_on_one_machine_do_not_see_each_other(shards, tmp_path):
    """Each `ssfer run` starts a local Ray of its own (temp folder, no dashboard): both finish, neither logs
    Ray's "Found multiple active Ray instances", and each ran its Train workers on its own instance."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["SSFER_KEEP_RAY_LOGS"] = "1"             # the Ray's own logs are searched below (removed afterwards)
    procs = []
    for name in ("twin-a", "twin-b"):
        args = [sys.executable, "-m", "ssfer_dist", "run", PRETRAIN]
        for o in _ov(name, shards, tmp_path / "runs", ["train.max_steps=4", "checkpoint.every_steps=0",
                                                       "failure.max_failures=0", "failure.start_timeout_s=300"]):
            args += ["--set", o]
        log = open(tmp_path / f"{name}.log", "wb")
        procs.append((name, subprocess.Popen(args, env=env, cwd=str(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True), log))
    try:
        for name, p, _log in procs:
            assert p.wait(timeout=1300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        for _name, p, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
            log.close()
    temp_dirs = set()
    for name, _p, _log in procs:
        out = (tmp_path / f"{name}.log").read_text()
        assert "Found multiple active Ray instances" not in out, name
        assert os.path.exists(tmp_path / "runs" / name / "export" / "model.safetensors")
        m = re.search(r"private local Ray in (\S+) ", out)
        assert m, name
        temp_dirs.add(m.group(1))
    assert len(temp_dirs) == 2
    # the actor names each instance's workers ran: its own Train controller and workers
    for d in temp_dirs:
        actors = set()
        for out in glob.glob(os.path.join(d, "session_latest", "logs", "worker-*.out")):
            with open(out, errors="replace") as f:
                actors |= set(re.findall(r":actor_name:(\w+)", f.read()))
        shutil.rmtree(d, ignore_errors=True)
        assert "RayTrainWorker" in actors and "TrainController" in actors, actors


# ------------------------------------------------------------------------------ multi-node: a node is lost


@pytest.mark.timeout(1500)
def test_a_lost_node_is_replaced_and_the_run_resumes_from_s3(s3_bucket, tmp_path):
    """Two worker nodes (``ray.cluster_utils.Cluster``), storage and shards on S3 only. The node of one
    worker is removed once step 6 is visible on S3 (metrics are uploaded with each checkpoint, every 4
    steps) and a new node joins: the run resumes from the last S3 checkpoint, every step is logged once,
    and the redone steps saw the same batches (digest equal, loss within 1e-4 relative) as the attempt
    that was cut. An uninterrupted run of the same config (torchrun, one machine) logs the same batch digests
    and losses at every step and exports the same weights (1e-5 relative)."""
    import subprocess
    import sys

    from ssfer_dist.train.debugdata import face_images, write_shard_folder

    shards = write_shard_folder(f"{s3_bucket}/shards/fr", face_images(128, 32), [-1] * 128, dataset="fr",
                                num_classes=0, samples_per_shard=16)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    steps = 24
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "multinode_node_loss.py"), PRETRAIN, shards,
                          f"{s3_bucket}/runs", "lost-node", "--steps", str(steps), "--every", "4", "--cut-after", "6"],
                         env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=1400)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert "removed_at" in info and "replaced_at" in info, info
    # rank 0 of the group that finished logged where it resumed (its log file, uploaded to the run folder)
    worker0 = storage.get_bytes(storage.join(info["run"], "logs", "worker-0.log")).decode()
    resumed = {int(m) for m in re.findall(r"resumed at step (\d+)", worker0)}
    assert len(resumed) == 1 and next(iter(resumed)) % 4 == 0 and next(iter(resumed)) >= 4, resumed
    start = next(iter(resumed))
    run = info["run"]
    rec = [json.loads(x) for x in storage.get_bytes(storage.join(run, "metrics.jsonl")).decode().splitlines()]
    assert [r["step"] for r in rec] == list(range(1, steps + 1))
    redone_url = storage.join(run, "metrics_redone.jsonl")
    redone = [json.loads(x) for x in storage.get_bytes(redone_url).decode().splitlines()] \
        if storage.exists(redone_url) else []
    by_step = {r["step"]: r for r in rec}
    assert all(r["step"] > start for r in redone)                 # resumed from that S3 checkpoint
    for r in redone:
        assert by_step[r["step"]]["batch_digest"] == r["batch_digest"], r["step"]
        assert by_step[r["step"]]["loss"] == pytest.approx(r["loss"], rel=1e-4, abs=1e-5)
    assert storage.exists(info["export"])
    done = sorted({f.split("/")[0] for f in storage.list_files(run) if re.match(r"checkpoint_\d+/", f)})
    assert done and all(ck.is_complete(storage.join(run, d)) for d in done)
    # the same run without the lost node (2 ranks under torchrun, one machine): every step's batches and loss,
    # and the final weights, are the interrupted run's (tolerance 1e-5 relative; bit-identical on this CPU)
    ref_args = [sys.executable, "-m", "ssfer_dist.cli", "run", PRETRAIN, "--launcher", "torchrun"]
    for o in [f"data.shards={shards}", f"run.storage={tmp_path / 'ref'}", "run.name=ref", "train.zero_stage=2",
              "train.preview_every=0", "train.log_every=1", f"train.max_steps={steps}", "checkpoint.every_steps=4"]:
        ref_args += ["--set", o]
    ref = subprocess.run(ref_args, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    with open(tmp_path / "ref" / "ref" / "metrics.jsonl") as f:
        ref_rec = {r["step"]: r for r in map(json.loads, f)}
    for r in rec:
        assert r["batch_digest"] == ref_rec[r["step"]]["batch_digest"], r["step"]
        assert r["loss"] == pytest.approx(ref_rec[r["step"]]["loss"], rel=1e-5), r["step"]
    from safetensors.torch import load_file

    storage.get_file(info["export"], str(tmp_path / "lost.safetensors"))
    got, want = load_file(str(tmp_path / "lost.safetensors")), load_file(str(tmp_path / "ref" / "ref" / "export" /
                                                                             "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert float((got[k] - want[k]).abs().max()) <= 1e-5 * (float(want[k].abs().max()) or 1.0), k
