import os

import pytest

from ssfer_dist import storage


def _roundtrip(base):
    storage.ensure_dir(base)
    storage.put_bytes(storage.join(base, "a/b.bin"), b"hello")
    storage.put_bytes(storage.join(base, "c.bin"), b"x" * 10)
    assert storage.exists(storage.join(base, "a/b.bin"))
    assert not storage.exists(storage.join(base, "nope.bin"))
    assert storage.get_bytes(storage.join(base, "a/b.bin")) == b"hello"
    assert storage.list_files(base) == ["a/b.bin", "c.bin"]
    storage.delete(storage.join(base, "c.bin"))
    assert storage.list_files(base) == ["a/b.bin"]


def test_local_roundtrip(tmp_path):
    _roundtrip(str(tmp_path / "store"))
    # atomic local writes leave no temporary files behind
    assert not [f for f in os.listdir(tmp_path / "store") if f.startswith(".tmp-")]


def test_s3_roundtrip(s3_bucket, tmp_path):
    _roundtrip(s3_bucket + "/prefix")
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024))
    storage.put_file(str(src), s3_bucket + "/big.bin")
    storage.get_file(s3_bucket + "/big.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_s3_multipart(s3_bucket, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNK", 5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024)
    storage.put_bytes(s3_bucket + "/mp.bin", data)
    assert storage.get_bytes(s3_bucket + "/mp.bin") == data


def test_s3_wrong_credentials_named_in_error(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(storage.StorageError) as e:
        storage.check_writable("s3://ssfer-nope/x")
    assert "s3://ssfer-nope" in str(e.value)


def test_webdataset_s3_opener(s3_bucket):
    import io
    import tarfile

    import webdataset as wds

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(3):
            data = f"{i}".encode()
            ti = tarfile.TarInfo(f"k{i}.txt")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    storage.put_bytes(s3_bucket + "/t.tar", buf.getvalue())
    storage.register_webdataset_s3()
    got = [s["txt"] for s in wds.WebDataset(s3_bucket + "/t.tar", shardshuffle=False)]
    assert got == [b"0", b"1", b"2"]


def test_local_files_get_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        storage.put_bytes(str(tmp_path / "m.bin"), b"1")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "m.bin").st_mode & 0o777) == 0o644


_PARENT_CLIENT = None


def _child_uses_own_client(url, q):
    own = storage.s3_client()
    q.put((own is not _PARENT_CLIENT, own is storage.s3_client(), storage.get_bytes(url)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_makes_its_own_s3_client(s3_bucket):
    """A forked process (shard-builder pool, DataLoader workers) must not reuse the parent's client:
    its pooled keep-alive connections would be shared by several processes."""
    import multiprocessing

    global _PARENT_CLIENT
    url = f"{s3_bucket}/fork/x.bin"
    storage.put_bytes(url, b"abc")
    _PARENT_CLIENT = storage.s3_client()
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_uses_own_client, args=(url, q))
    p.start()
    fresh, cached, data = q.get(timeout=60)
    p.join(timeout=30)
    assert fresh and cached and data == b"abc" and p.exitcode == 0
    assert storage.s3_client() is _PARENT_CLIENT  # the parent keeps its own
