"""A SeaweedFS S3 server private to one test: its own ports and folder, stoppable and restartable
(storage-outage tests)."""
from __future__ import annotations

import json
import os
import time


class PrivateWeed:
    """A SeaweedFS S3 server of this test alone (its own port and folder), stoppable and restartable."""

    def __init__(self, tmp_path):
        import socket

        from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY, _weed_binary

        socks = [socket.socket() for _ in range(11)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in socks]
        for s in socks:
            s.close()
        self.port = ports[0]
        # every port of weed mini set (the session's S3 server uses the defaults)
        names = ["s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                 "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc", "webdav.port"]
        self.flags = [f"-{n}={p}" for n, p in zip(names, ports)] + ["-s3.port.iceberg=0", "-s3.port.lance=0"]
        self.dir = str(tmp_path / "weed")
        os.makedirs(self.dir, exist_ok=True)
        self.bin = _weed_binary()
        # the identities it accepts: the shared test one and whatever this process (and so the local Ray's
        # workers, which inherit it) uses
        mine = (os.environ.get("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY),
                os.environ.get("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY))
        idents = {(S3_ACCESS_KEY, S3_SECRET_KEY), mine}
        conf = os.path.join(self.dir, "s3.json")
        with open(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump({"identities": [{"name": f"id{i}", "credentials": [{"accessKey": a, "secretKey": k}],
                                       "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
                                      for i, (a, k) in enumerate(sorted(idents))]}, f)
        self.flags.append(f"-s3.config={conf}")
        self.env = dict(os.environ)
        self.proc = None

    def start(self, timeout=90):
        import subprocess

        import boto3

        log = open(os.path.join(self.dir, "weed.log"), "ab")
        self.proc = subprocess.Popen(
            [self.bin, "mini", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false"]
            + self.flags, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        cli = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.port}")
        while True:
            try:
                cli.list_buckets()
                return
            except Exception as e:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"private SeaweedFS did not start; see {self.dir}/weed.log") from e
                time.sleep(0.5)

    def stop(self):
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except Exception:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.proc = None
