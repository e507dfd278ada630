"""The filesystem Ray Train writes the run folder through: a storage outage shorter than
``run.storage_retry_s`` is absorbed, a permanent fault is raised at once (no Ray needed to show it)."""
from __future__ import annotations

import pickle
import threading
import time

import pyarrow.fs as pafs
import pytest

from ssfer_dist import storage
from tests.privateweed import PrivateWeed


def test_transient_and_permanent_faults_are_told_apart():
    is_transient = storage.is_transient
    assert is_transient(OSError("AWS Error NETWORK_CONNECTION during CreateMultipartUpload operation: "
                                 "curlCode: 7, Could not connect to server"))
    assert is_transient(OSError("AWS Error SLOW_DOWN during PutObject operation"))
    assert not is_transient(OSError("AWS Error ACCESS_DENIED during PutObject operation"))
    assert not is_transient(FileNotFoundError("Path does not exist 'b/k'"))
    assert not is_transient(ValueError("curlCode"))


def test_retry_gives_up_when_the_budget_is_spent():
    calls = []

    def down():
        calls.append(1)
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7")

    t0 = time.monotonic()
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        storage.retry("read k", down, budget_s=2.0)
    assert 1 < len(calls) <= 4 and time.monotonic() - t0 < 5


@pytest.mark.timeout(300)
def test_a_write_during_an_outage_lands_once_the_server_is_back(tmp_path, monkeypatch, s3_server):
    weed = PrivateWeed(tmp_path)
    weed.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{weed.port}")
        import boto3

        boto3.client("s3").create_bucket(Bucket="flaky")
        from ssfer_dist.launchers.ray import _storage_args

        args = _storage_args("s3://flaky/runs", 90.0)
        fs = pickle.loads(pickle.dumps(args["storage_filesystem"]))     # as Ray's controller receives it
        root = args["storage_path"]
        with fs.open_output_stream(f"{root}/before.json") as f:
            f.write(b'{"ok": 1}')

        weed.stop()
        back = threading.Timer(6.0, weed.start)
        back.start()
        t0 = time.monotonic()
        # what Ray's controller does after each reported checkpoint: (re)write its snapshot
        with fs.open_output_stream(f"{root}/o1/checkpoint_manager_snapshot.json") as f:
            f.write(b'{"step": 4}' * 1000)
        waited = time.monotonic() - t0
        back.join(120)
        assert waited >= 5.0, waited                          # it really waited for the server
        with fs.open_input_stream(f"{root}/o1/checkpoint_manager_snapshot.json") as f:
            assert f.read() == b'{"step": 4}' * 1000
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        assert {i.base_name for i in infos} >= {"before.json", "checkpoint_manager_snapshot.json"}

        t0 = time.monotonic()
        with pytest.raises(FileNotFoundError):               # permanent: at once, not after 90 s
            fs.open_input_stream(f"{root}/missing.json")
        assert time.monotonic() - t0 < 10
    finally:
        weed.stop()


def test_one_table_of_s3_codes_reads_botocore_and_arrow_errors():
    from botocore.exceptions import ClientError

    assert storage.TRANSIENT_S3_CODES.isdisjoint(storage.PERMANENT_S3_CODES)
    slow = ClientError({"Error": {"Code": "SlowDown"}}, "GetObject")
    denied = ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject")
    assert storage.s3_code(slow) == "SlowDown" and storage.is_transient(slow)
    assert storage.s3_code(denied) == "AccessDenied" and not storage.is_transient(denied)
    assert storage.s3_code(OSError("key 'k': AWS Error ACCESS_DENIED during HeadObject operation")) == "AccessDenied"
    assert storage.s3_code(OSError("AWS Error UNKNOWN (HTTP status 503) during GetObject operation")) == "503"
    assert storage.s3_code(OSError("[Errno 28] No space left on device")) is None
