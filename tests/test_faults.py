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
from ssfer_dist.errors import UserError

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


def test_ray_start_up_failures_are_one_line(monkeypatch):
    import ray

    from ssfer_dist.config import Config
    from ssfer_dist.distributed import launch
    from ssfer_dist.errors import UserError

    def boom(*a, **kw):
        raise TimeoutError("Timed out after 60 seconds waiting for the GCS to start.\nmore detail")

    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "")      # restored afterwards: ensure_ray sets it
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", boom)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    with pytest.raises(UserError, match=r"^RAY_ADDRESS=10.0.0.9:6379: could not connect to Ray: TimeoutError: "
                                        r"Timed out after 60 seconds waiting for the GCS to start.$"):
        launch.ensure_ray(Config())
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(UserError,
                       match=r"^could not start a local Ray: TimeoutError: Timed out .*\(logs: .*ssfer-ray-") as e:
        launch.ensure_ray(Config())
    kept = str(e.value).rsplit("(logs: ", 1)[1].rstrip(")")
    assert os.path.isdir(kept)                  # kept for the user to read; removed here
    os.rmdir(kept)


def test_the_lean_trainer_leaves_out_only_the_cluster_helpers():
    """On a private local Ray, Ray Train's placement-group cleaner and Ray Data's dataset manager are left out
    (each is an actor process, seconds of start-up on two cores); every other callback stays."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from ssfer_dist.distributed.localray import lean_trainer_class

    def names(cls, **kw):
        t = cls(lambda: None, scaling_config=ScalingConfig(num_workers=1), **kw)
        return [type(c).__name__ for c in t._create_default_callbacks()]

    full, lean = names(TorchTrainer), names(lean_trainer_class())
    assert {"PlacementGroupCleanerCallback", "DatasetsCallback"} <= set(full)        # what Ray would start
    assert lean == [n for n in full if n not in ("PlacementGroupCleanerCallback", "DatasetsCallback")]


def test_the_lean_trainer_asks_no_autoscaler_for_a_fixed_group():
    """Ray's fixed-size scaling policy sends its resource request to an autoscaling-coordinator actor; on a
    private instance (no autoscaler) the policy is the same minus those requests, and an elastic one is kept."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy import create_scaling_policy
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    from ssfer_dist.distributed import localray

    sc = ScalingConfig(num_workers=2)
    fixed = localray._without_autoscaler_requests(create_scaling_policy(sc))
    assert isinstance(fixed, FixedScalingPolicy) and type(fixed) is not FixedScalingPolicy
    fixed.after_controller_start(None)                       # Ray's creates the coordinator actor here
    assert fixed._coordinator_client is None
    decision = fixed.make_decision_for_non_running_worker_group()   # Ray's sends a request first
    assert decision.num_workers == 2 and fixed._coordinator_client is None
    fixed._cancel_resource_request()                         # the controller's shutdown path: a no-op
    other = object()
    assert localray._without_autoscaler_requests(other) is other

    seen = {}

    class Probe(localray.lean_trainer_class()):
        def _create_default_callbacks(self):
            return []

    def fake_run(self, **kw):                                # what the parent would hand to the controller
        seen.update(kw)

    import ray.train.v2.api.data_parallel_trainer as dpt

    orig = dpt.DataParallelTrainer._initialize_and_run_controller
    dpt.DataParallelTrainer._initialize_and_run_controller = fake_run
    try:
        Probe(lambda: None, scaling_config=sc)._initialize_and_run_controller(
            scaling_policy=create_scaling_policy(sc), callbacks=[])
    finally:
        dpt.DataParallelTrainer._initialize_and_run_controller = orig
    assert type(seen["scaling_policy"]).__name__ == "PrivateFixedScalingPolicy"


def test_train_env_sets_the_poll_interval_only_where_the_user_has_not(monkeypatch):
    from ssfer_dist.distributed import localray

    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("RAY_TRAIN_METRICS_ENABLED", raising=False)
    with localray.train_env():
        assert os.environ[key] == "0.5" and os.environ["RAY_TRAIN_METRICS_ENABLED"] == "0"
    assert key not in os.environ and "RAY_TRAIN_METRICS_ENABLED" not in os.environ
    monkeypatch.setenv(key, "3")
    with localray.train_env():
        assert os.environ[key] == "3"
    assert os.environ[key] == "3"


def test_private_local_ray_arguments_differ_per_run(monkeypatch):
    from ssfer_dist.distributed.localray import private_init_kwargs

    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    plain = private_init_kwargs({"env_vars": {"X": "1"}})
    assert plain["runtime_env"] == {"env_vars": {"X": "1"}, "worker_process_setup_hook": "ssfer_dist.startup.relax_gc"}
    assert "dashboard_port" not in plain                                                      # default: none
    os.rmdir(plain["_temp_dir"])
    a = private_init_kwargs({"env_vars": {"X": "1"}}, dashboard=True)
    b = private_init_kwargs({}, dashboard=True)
    assert a["_temp_dir"] != b["_temp_dir"] and a["dashboard_port"] != b["dashboard_port"]
    assert a["dashboard_host"] == "127.0.0.1"
    assert a["runtime_env"]["env_vars"] == {"X": "1", "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{a['dashboard_port']}"}
    assert "RAY_API_SERVER_ADDRESS" not in os.environ        # only the Ray's own processes get it
    for k in (a, b):
        os.rmdir(k["_temp_dir"])


def test_a_private_rays_temp_folder_is_removed_after_success_and_kept_after_failure(tmp_path, monkeypatch):
    """``localray.finish`` at the end of an ``ssfer`` command (the Ray shut down itself is exercised by
    test_console's debug run, which also checks that nothing is left in its TMPDIR)."""
    from ssfer_dist.distributed import localray

    for ok in (True, False):
        temp = tmp_path / f"ssfer-ray-{ok}"
        (temp / "session_x" / "logs").mkdir(parents=True)
        (temp / "session_x" / "logs" / "raylet.out").write_text("raylet log")
        monkeypatch.setattr(localray, "_private_temp", str(temp))
        monkeypatch.setattr(localray, "_private_gcs", None)        # no Ray connected: nothing to shut down
        kept = localray.finish(ok=ok)
        assert (kept is None) == ok and temp.exists() == (not ok)
        assert localray._private_temp is None and localray.finish(ok=ok) is None      # once


def test_preflight_beside_a_private_ray_start(monkeypatch):
    """``ssfer run`` on its own local Ray checks and plans in a thread while ``ray.init`` runs on the main
    thread: the input's error wins (and that Ray is shut down), a surprise in the thread is repeated on the
    main thread, and a run on a given Ray keeps the plain order."""
    import threading

    import ray

    from ssfer_dist.config import Config
    from ssfer_dist.distributed import launch, localray

    calls, finished = [], []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(launch, "ensure_ray", lambda cfg, warm=True: calls.append(("ray", warm)))
    monkeypatch.setattr(localray, "finish", lambda ok: finished.append(ok))
    monkeypatch.setattr(localray, "import_train", lambda: calls.append(("imports", threading.current_thread().name)))

    def plan_ok(cfg, ray_is_ours=None):
        calls.append(("plan", threading.current_thread().name, ray_is_ours))
        return "PLAN"

    monkeypatch.setattr(launch, "_check_and_plan", plan_ok)
    assert launch._checked_plan(Config()) == "PLAN"
    assert ("ray", False) in calls and ("plan", "ssfer-preflight", False) in calls
    assert ("imports", "ssfer-preflight") in calls and finished == []

    def bad_input(cfg, ray_is_ours=None):
        raise UserError("data.shards: nowhere/manifest.parquet: no shard manifest here")

    monkeypatch.setattr(launch, "_check_and_plan", bad_input)
    with pytest.raises(UserError, match="^data.shards: nowhere"):
        launch._checked_plan(Config())
    assert finished == [True]                   # the Ray it started is shut down and its folder removed

    attempts = []

    def race_then_ok(cfg, ray_is_ours=None):
        attempts.append(threading.current_thread().name)
        if len(attempts) == 1:
            raise ImportError("deadlock detected by _ModuleLock('torch._dynamo')")
        return "PLAN2"

    monkeypatch.setattr(launch, "_check_and_plan", race_then_ok)
    assert launch._checked_plan(Config()) == "PLAN2"
    assert attempts == ["ssfer-preflight", threading.current_thread().name]

    calls.clear()
    monkeypatch.setattr(ray, "is_initialized", lambda: True)         # a Ray the caller started: plain order
    monkeypatch.setattr(launch, "_check_and_plan", plan_ok)
    assert launch._checked_plan(Config()) == "PLAN"
    assert calls == [("plan", threading.current_thread().name, None)]
