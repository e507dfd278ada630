"""Faults without Ray: permanent vs transient classification, the stall watchdog, one-line causes,
committed checkpoints (the sweep of partial ones, local and S3), S3 retries through an outage."""
from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time

import pytest

from ssfer_dist import storage
from ssfer_dist.distributed import faults
from ssfer_dist.train import checkpoint as ck

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------------------------------ classify


def test_permanent_faults_are_named_in_one_line():
    e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/a/checkpoint_00000060/ds/zero.pt")
    assert faults.classify(e) == "/runs/a/checkpoint_00000060/ds/zero.pt: No space left on device (ENOSPC)"
    # a cause deep in the chain is found
    try:
        try:
            open("/nonexistent/shard-000001.tar", "rb")
        except OSError as inner:
            raise RuntimeError("reading the stream failed") from inner
    except RuntimeError as outer:
        assert faults.classify(outer) == "/nonexistent/shard-000001.tar: No such file or directory (ENOENT)"
    # after a DataLoader worker flattened it to text (type kept, errno lost)
    flat = FileNotFoundError("Caught FileNotFoundError in DataLoader worker process 0.\nOriginal Traceback "
                             "(most recent call last):\n  File \"x.py\", line 1\nFileNotFoundError: [Errno 2] "
                             "No such file or directory: '/data/fr/fr-000003.tar'\n")
    assert faults.classify(flat) == "/data/fr/fr-000003.tar: No such file or directory (ENOENT)"
    denied = PermissionError(errno.EACCES, "Permission denied", "/runs/x")
    assert faults.classify(denied).endswith("(EACCES)")
    # S3: the code names the fault
    from botocore.exceptions import ClientError

    ce = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")
    assert faults.classify(ce).endswith("(S3 AccessDenied)")
    se = storage._s3_error("s3://b/fr-000001.tar", ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject"))
    assert se.s3_code == "NoSuchKey"
    assert faults.classify(se).startswith("s3://b/fr-000001.tar: ") and faults.classify(se).endswith("(S3 NoSuchKey)")
    text_only = storage.StorageError(str(se))        # the same after a process boundary
    assert faults.classify(text_only).endswith("(S3 NoSuchKey)")


def test_transient_faults_are_not_permanent():
    from botocore.exceptions import ClientError, EndpointConnectionError

    from ssfer_test_hooks import InjectedFault

    assert faults.classify(InjectedFault("injected fault at step 3 on rank 1")) is None
    assert faults.classify(EndpointConnectionError(endpoint_url="http://127.0.0.1:1")) is None
    assert faults.classify(ClientError({"Error": {"Code": "SlowDown"}}, "PutObject")) is None
    assert faults.classify(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")) is None
    assert faults.classify(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error")) is None
    # a permanent fault survives pickling (it crosses from a Ray worker to the controller and driver)
    import pickle

    pf = pickle.loads(pickle.dumps(faults.PermanentFault("/x: No space left on device (ENOSPC)")))
    assert isinstance(pf, faults.PermanentFault) and str(pf) == "/x: No space left on device (ENOSPC)"


def test_one_line_prefers_the_permanent_cause_then_recorded_causes():
    class FakeWorkerGroupError(Exception):
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors:\n" + "\n".join(map(str, failures.values())))
            self.worker_failures = failures

    wrapped = type("UserExceptionWithTraceback", (Exception,), {})("Traceback ...\nlong text")
    wrapped._base_exc = faults.PermanentFault("/d/fr-000001.tar: No such file or directory (ENOENT)")
    err = FakeWorkerGroupError({0: RuntimeError("gloo: connection closed by peer"), 1: wrapped})
    assert faults.one_line(err, []) == "rank 1: /d/fr-000001.tar: No such file or directory (ENOENT)"
    died = FakeWorkerGroupError({1: RuntimeError("The actor died unexpectedly before finishing this task.")})
    cause = {"time": 1.0, "rank": 1, "kind": "stall", "cause": "rank 1 made no progress for 20 s"}
    assert faults.one_line(died, [cause]) == "rank 1: rank 1 made no progress for 20 s"
    assert faults.one_line(died, []) == "rank 1: RuntimeError: The actor died unexpectedly before finishing this task."
    line = faults.one_line(err, [])
    assert "\n" not in line


# ------------------------------------------------------------------------------------------ watchdog


def test_watchdog_ends_a_stalled_worker_within_its_bound_and_not_a_busy_one():
    exits, records = [], []
    wd = faults.StallWatchdog(1.5, rank=3, record=records.append, exit_fn=exits.append)
    t0 = time.monotonic()
    wd.beat("step 7: forward/backward (collectives)")
    while not exits and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert exits == [faults.STALL_EXIT_CODE]
    assert 1.5 <= time.monotonic() - t0 < 4.0
    assert records and records[0].startswith("rank 3 made no progress for ")
    assert "last at: step 7: forward/backward (collectives)" in records[0]
    wd.stop()

    exits2 = []
    busy = faults.StallWatchdog(1.0, rank=0, exit_fn=exits2.append)
    for i in range(25):                     # 2.5 s of progress, beats every 0.1 s
        busy.beat(f"step {i}")
        time.sleep(0.1)
    busy.stop()
    assert exits2 == [] and busy.fired is None
    off = faults.StallWatchdog(0, rank=0, exit_fn=exits2.append)   # 0 disables
    assert off._thread is None


def test_causes_round_trip_through_storage(tmp_path):
    run = str(tmp_path / "run")
    t0 = time.time()
    faults.write_cause(run, 1, "rank 1 made no progress for 20 s", "stall")
    recs = faults.read_causes(run, t0 - 1)
    assert [(r["rank"], r["kind"]) for r in recs] == [(1, "stall")]
    assert faults.read_causes(run, time.time() + 10) == []
    assert faults.read_causes(str(tmp_path / "none"), 0) == []


# -------------------------------------------------------------------------------------- checkpoints


def _part(run, name, rank, world, files, truncate=None):
    base = storage.join(run, name)
    for f, data in files.items():
        body = data[: len(data) // 2] if truncate == f else data
        storage.put_bytes(storage.join(base, f), body)
    part = {"rank": rank, "world_size": world, "files": {f: len(d) for f, d in files.items()}}
    storage.put_bytes(storage.join(base, ck.PARTS_DIR, f"rank{rank}.json"), json.dumps(part).encode())


def _make_run(run):
    r0 = {"ds/mp_rank_00_model_states.pt": b"m" * 300, "ds/zero_pp_rank_0_optim_states.pt": b"o" * 500,
          "train_state.json": b"{}"}
    r1 = {"ds/zero_pp_rank_1_optim_states.pt": b"p" * 500}
    # 1: committed
    _part(run, "checkpoint_00000010", 0, 2, r0)
    _part(run, "checkpoint_00000010", 1, 2, r1)
    storage.put_bytes(storage.join(run, "checkpoint_00000010", ck.COMMIT_FILE), b"{}")
    # 2: complete, crash before the marker
    _part(run, "checkpoint_00000020", 0, 2, r0)
    _part(run, "checkpoint_00000020", 1, 2, r1)
    # 3: rank 1 never finished (full disk half-way): its files partly there, no part list
    _part(run, "checkpoint_00000030", 0, 2, r0)
    storage.put_bytes(storage.join(run, "checkpoint_00000030", "ds/zero_pp_rank_1_optim_states.pt"), b"")
    # 4: a part list whose file is truncated
    _part(run, "checkpoint_00000040", 0, 1, r0, truncate="ds/zero_pp_rank_0_optim_states.pt")
    # 5: registered by Ray (its snapshot), written before part lists existed
    storage.put_bytes(storage.join(run, "checkpoint_00000050", "train_state.json"), b"{}")
    storage.put_bytes(storage.join(run, ck.RAY_SNAPSHOT), json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_00000050"}]}).encode())
    # 6: nothing but a stray file of an upload that died at once
    storage.put_bytes(storage.join(run, "checkpoint_00000060", "ds/mp_rank_00_model_states.pt"), b"")
    storage.put_bytes(storage.join(run, "metrics.jsonl"), b"{}\n")


def _check_sweep(run):
    assert ck.latest_complete(run) == storage.join(run, "checkpoint_00000010")
    deleted = ck.sweep_incomplete(run)
    assert deleted == ["checkpoint_00000030", "checkpoint_00000040", "checkpoint_00000060"]
    left = storage.list_files(run)
    assert not any(f.startswith(("checkpoint_00000030", "checkpoint_00000040", "checkpoint_00000060")) for f in left)
    for name in ("checkpoint_00000010", "checkpoint_00000020", "checkpoint_00000050"):
        assert f"{name}/{ck.COMMIT_FILE}" in left, name       # complete ones are committed
    assert "metrics.jsonl" in left
    assert ck.latest_complete(run) == storage.join(run, "checkpoint_00000050")
    assert ck.sweep_incomplete(run) == []                      # idempotent


def test_sweep_removes_every_partial_checkpoint_local(tmp_path):
    run = str(tmp_path / "run")
    _make_run(run)
    _check_sweep(run)


def test_sweep_removes_every_partial_checkpoint_s3(s3_bucket):
    run = f"{s3_bucket}/runs/r1"
    _make_run(run)
    _check_sweep(run)


# ----------------------------------------------------------------------------------------- storage


class _Proxy:
    """A TCP proxy in front of the S3 server that can be cut (connections reset, port closed) and restored."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = None
        self._srv = None
        self._conns = []
        self._lock = threading.Lock()
        self.start()

    def start(self):
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port or 0))
        srv.listen(16)
        self.port = srv.getsockname()[1]
        self._srv = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv):
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            u = socket.create_connection(self.target)
            with self._lock:
                self._conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while True:
                data = a.recv(1 << 14)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        for s in [self._srv]:                 # shutdown wakes the threads blocked in accept/recv
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_s3_reads_and_writes_ride_out_an_outage(s3_bucket, monkeypatch):
    from tests.conftest import S3_PORT

    data = os.urandom(48 << 20)                   # more than the socket buffers hold
    storage.put_bytes(f"{s3_bucket}/big.bin", data)
    proxy = _Proxy(S3_PORT)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv(storage.RETRY_ENV, "30")
    stream = storage.open_read(f"{s3_bucket}/big.bin")
    head = stream.read(1 << 20)
    assert len(head) == 1 << 20
    proxy.cut()                                   # mid-stream: connection reset, then refused for 3 s
    threading.Timer(3.0, proxy.start).start()
    t0 = time.monotonic()
    rest = b""
    while True:
        chunk = stream.read(1 << 18)
        if not chunk:
            break
        rest += chunk
    assert head + rest == data                    # resumed with a ranged GET at the byte reached
    assert time.monotonic() - t0 >= 2.0
    proxy.cut()                                   # a write during an outage waits for the server
    threading.Timer(3.0, proxy.start).start()
    storage.put_bytes(f"{s3_bucket}/after.bin", b"x" * 100)
    assert storage.get_bytes(f"{s3_bucket}/after.bin") == b"x" * 100
    # the budget bounds the wait; the error names the URL and the attempts
    proxy.cut()
    monkeypatch.setenv(storage.RETRY_ENV, "2")
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match=rf"{s3_bucket}/after.bin: .*after \d+ attempts"):
        storage.get_bytes(f"{s3_bucket}/after.bin")
    assert time.monotonic() - t0 < 30
    # a permanent fault is not retried
    proxy.start()
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match=r"NoSuchKey|Not Found|404") as ei:
        storage.get_bytes(f"{s3_bucket}/missing.bin")
    assert time.monotonic() - t0 < 5
    assert faults.classify(ei.value) is not None
