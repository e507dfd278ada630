"""End to end through `ray job submit`, the way a KubeRay RayJob's submitter runs our entrypoints.

A real Ray head (`ray start --head` on 127.0.0.1, 2 CPUs, dashboard on a free port, RAY_AUTH_MODE
disabled) takes three jobs, each shipped with `--working-dir .`:

1. `ssfer-shard build --ray` turns a folder of real face images (scikit-image's LFW subset) into
   shards on the test S3 server;
2. `ssfer run configs/debug_cpu_pretrain.yaml` pretrains on those shards (2 gloo workers, DeepSpeed
   on CPU) and must leave a checkpoint and `export/model.safetensors` in S3;
3. the same config pointed at shards that don't exist must fail fast, naming the URL, before any
   Train worker (on a cluster: any GPU) is started.

The head is stopped afterwards by process id (not `ray stop`, which would also stop every other Ray
instance on a shared machine).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
HAVE_LAUNCH = importlib.util.find_spec("ssfer_dist.launchers") is not None or \
    os.path.exists(os.path.join(ROOT, "ssfer_dist", "launchers", "ray.py"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_LAUNCH, reason="ssfer_dist/launchers/ (ssfer run) does not exist yet"),
]

IMAGE_SIZE = 32          # configs/debug_cpu_pretrain.yaml trains at 32 px
JOB_TIMEOUT = 360


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_processes(temp_dir: str, root_pid: int):
    import psutil

    procs = {}
    try:
        root = psutil.Process(root_pid)
        procs[root.pid] = root
        for p in root.children(recursive=True):
            procs[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in c for c in (p.info["cmdline"] or [])):
                procs[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(procs.values())


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop exactly the processes of this head: `ray start --block` and everything it started."""
    import psutil

    procs = _ray_processes(temp_dir, proc.pid)
    for p in procs:                             # `ray start --block` itself, GCS, raylet, dashboard, workers
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=8)
    alive += [p for p in _ray_processes(temp_dir, proc.pid) if p.pid not in {a.pid for a in procs}]
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """A Ray head on 127.0.0.1 with its dashboard (job server) on a free port; yields (address, env).

    Like a KubeRay head pod that loads the `ssfer-storage` ConfigMap, its environment holds
    SSFER_SHARDS and SSFER_RUNS (here: a fresh bucket on the test S3 server).
    """
    import boto3

    bucket = f"ssfer-e2e-{os.getpid()}-{int(time.time())}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")      # short: Ray's unix sockets live under it
    ports = {k: _free_port() for k in ("port", "dashboard-port", "ray-client-server-port",
                                       "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                       "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
                                       "object-manager-port")}
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0",
               PATH=BIN + os.pathsep + os.environ.get("PATH", ""),
               SSFER_SHARDS=f"s3://{bucket}/shards", SSFER_RUNS=f"s3://{bucket}/runs")
    env.pop("RAY_ADDRESS", None)
    cmd = [os.path.join(BIN, "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--temp-dir", temp_dir, "--object-store-memory", str(256 * 1024 * 1024), "--disable-usage-stats"]
    cmd += [f"--{k}={v}" for k, v in ports.items()]
    log = open(os.path.join(temp_dir, "ray-start.log"), "wb")
    proc = subprocess.Popen(cmd, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}: "
                            + open(os.path.join(temp_dir, "ray-start.log")).read()[-3000:])
            try:
                urllib.request.urlopen(address + "/api/version", timeout=2).read()
                break
            except Exception:
                if time.time() > deadline:
                    pytest.fail("the Ray dashboard did not come up within 90 s")
                time.sleep(0.5)
        yield address, env
    finally:
        _stop_head(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address, env, entrypoint, job_id):
    """`ray job submit --working-dir .` and wait; returns (status, logs). A job still running after
    JOB_TIMEOUT is stopped, so the assertion that follows shows its logs instead of a bare timeout."""
    from ray.job_submission import JobSubmissionClient

    cmd = [os.path.join(BIN, "ray"), "job", "submit", "--address", address, "--working-dir", ".",
           "--submission-id", job_id, "--"] + entrypoint
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
        tail = out.stdout[-4000:] + out.stderr[-4000:]
    except subprocess.TimeoutExpired:
        tail = f"ray job submit did not return within {JOB_TIMEOUT} s; job stopped"
    client = JobSubmissionClient(address)
    status = str(client.get_job_status(job_id)).split(".")[-1]
    if status in ("PENDING", "RUNNING"):
        client.stop_job(job_id)
    logs = client.get_job_logs(job_id)
    return status, logs + "\n--- ray job submit ---\n" + tail


def _faces(folder: str, num_identities: int = 4, per_identity: int = 12) -> None:
    """An image-folder dataset (one folder per identity) of real LFW faces, RGB JPEG."""
    from PIL import Image
    from skimage import data

    faces = data.lfw_subset()                      # (200, 25, 25) float in [0, 1]
    i = 0
    for ident in range(num_identities):
        d = os.path.join(folder, f"person{ident:03d}")
        os.makedirs(d)
        for k in range(per_identity):
            g = (faces[i % len(faces)] * 255).astype("uint8")
            Image.fromarray(g).convert("RGB").resize((48, 48), Image.BICUBIC).save(
                os.path.join(d, f"{k:03d}.jpg"), quality=95)
            i += 1


def _list(url):
    from ssfer_dist import storage

    return storage.list_files(url)


def test_shard_build_then_pretrain_via_ray_job_submit(ray_head, tmp_path):
    address, env = ray_head
    raw = str(tmp_path / "raw")
    _faces(raw)
    shards = env["SSFER_SHARDS"] + "/lfw"       # expanded here, as a RayJob submitter's shell does
    runs = env["SSFER_RUNS"]

    status, logs = submit(address, env, [
        "ssfer-shard", "build", "--ray", "--format", "image-folder", "--input", raw, "--output", shards,
        "--image-size", str(IMAGE_SIZE), "--detector", "none", "--samples-per-shard", "8", "--no-progress",
    ], "ssfer-e2e-shards")
    assert status == "SUCCEEDED", logs[-6000:]
    names = _list(shards)
    assert "manifest.parquet" in names, names
    assert sum(n.endswith(".tar") for n in names) == 6, names        # 48 faces / 8 per shard

    status, logs = submit(address, env, [
        # ${VARS} left for `ssfer` to expand on the head, as in configs/pretrain_vitb.yaml
        "ssfer", "run", "configs/debug_cpu_pretrain.yaml",
        "--set", "data.shards=${SSFER_SHARDS}/lfw", "--set", "run.storage=${SSFER_RUNS}", "--set", "run.name=e2e",
        "--set", "train.max_steps=8", "--set", "checkpoint.every_steps=4", "--set", "train.preview_every=0",
        "--set", "train.log_every=2",
    ], "ssfer-e2e-pretrain")
    assert status == "SUCCEEDED", logs[-6000:]
    written = _list(f"{runs}/e2e")
    assert "export/model.safetensors" in written, written
    assert any("checkpoint" in n for n in written), f"no checkpoint in {runs}/e2e: {written}"
    assert "metrics.jsonl" in written, written

    # The exported encoder loads and says what it is.
    from ssfer_dist import storage
    from ssfer_dist.models.io import load_weights

    local = str(tmp_path / "model.safetensors")
    storage.get_file(f"{runs}/e2e/export/model.safetensors", local)
    state, meta = load_weights(local)
    assert state and meta["arch"]["img_size"] == IMAGE_SIZE, meta


def test_missing_shards_fail_fast_with_the_url(ray_head):
    """Bad input: the pre-flight check on the driver names the URL; no Train worker ever starts."""
    address, env = ray_head
    missing = env["SSFER_SHARDS"] + "/no/such/shards"
    status, logs = submit(address, env, [
        "ssfer", "run", "configs/debug_cpu_pretrain.yaml", "--set", "data.shards=${SSFER_SHARDS}/no/such/shards",
        "--set", "run.storage=${SSFER_RUNS}", "--set", "run.name=e2e-missing",
    ], "ssfer-e2e-missing")
    assert status == "FAILED", logs[-4000:]
    assert missing in logs, logs[-4000:]
    assert "Traceback" not in logs.split("--- ray job submit ---")[0], "a UserError is one line, not a traceback"
    # Nothing was scheduled: no Train worker group, no run folder.
    assert "RayTrainWorker" not in logs and "TorchTrainer" not in logs, logs[-4000:]
    assert not _list(env["SSFER_RUNS"] + "/e2e-missing"), "a failed pre-flight must not write a run folder"
