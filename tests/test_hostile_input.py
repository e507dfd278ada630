"""Hostile and careless input (issue 14), crafted here: label-file paths and links that leave ``--input``,
hidden files, malicious shard members (``../``, absolute names, links, devices), huge members, corrupt and
decompression-bomb images in verify / inspect / split / evaluate / the training pipeline."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import struct
import tarfile

import pytest

from test_shard_formats import AFFECT_HEADER, build, img_bytes, make_image_folder, make_rafdb, write
from ssfer_dist.errors import UserError


# ------------------------------------------------------------------------- label files and links (item 2)
def _secret_outside(tmp_path) -> str:
    return write(os.path.join(tmp_path, "outside", "secret.jpg"), img_bytes(100, 100, seed=99))


def _affectnet_rows(root, rels):
    rows = [AFFECT_HEADER] + [[r, "0", "0", "100", "100", "", "1", "0", "0"] for r in rels]
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    write(os.path.join(root, "Manually_Annotated_file_lists", "training.csv"), buf.getvalue().encode())


def test_affectnet_paths_must_stay_inside_input(tmp_path):
    secret = _secret_outside(tmp_path)
    root = tmp_path / "an"
    write(os.path.join(root, "Manually_Annotated_Images", "a", "ok.jpg"), img_bytes(100, 100, seed=1))
    os.symlink(secret, os.path.join(root, "Manually_Annotated_Images", "a", "link.jpg"))
    _affectnet_rows(root, ["a/ok.jpg", "../../outside/secret.jpg", secret, "a/link.jpg", "a/../a/ok.jpg"])
    rep = build("affectnet", root, tmp_path / "out")
    # a/../a/ok.jpg stays inside (a second key for the same file); the other three are refused
    assert rep["num_samples"] == 2
    assert rep["skipped_by_reason"] == {"absolute_path": 1, "outside_input": 2}
    items = {s["item"].rsplit(":", 1)[1]: s for s in rep["skipped"]}
    assert items["3"]["reason"] == "outside_input" and "--allow-outside" in items["3"]["detail"]
    assert items["4"]["reason"] == "absolute_path" and items["5"]["reason"] == "outside_input"
    rep = build("affectnet", root, tmp_path / "out2", allow_outside=True)
    assert rep["num_samples"] == 5 and rep["skipped_by_reason"] == {}


def test_rafdb_names_must_stay_inside_input(tmp_path):
    secret = _secret_outside(tmp_path)
    root = make_rafdb(tmp_path / "raf", n_train=2, n_test=0)
    os.makedirs(os.path.join(root, "Image", "aligned", "train_x"))
    # "train_x/../../../../outside/secret" + "_aligned.jpg": a path outside the dataset that exists
    os.symlink(secret, tmp_path / "outside" / "secret_aligned.jpg")
    with open(os.path.join(root, "EmoLabel", "list_patition_label.txt"), "a") as f:
        f.write("train_x/../../../../outside/secret.jpg 1\n")
    rep = build("rafdb", root, tmp_path / "out", split="train")
    assert rep["num_samples"] == 2 and rep["skipped_by_reason"] == {"outside_input": 1}


def test_image_folder_links_hidden_files_and_loops(tmp_path):
    secret = _secret_outside(tmp_path)
    root = make_image_folder(tmp_path / "in", n_ids=2, per_id=2)
    os.symlink(secret, os.path.join(root, "id000", "evil.jpg"))                 # file link outside
    os.symlink(os.path.join(tmp_path, "outside"), os.path.join(root, "evil_id"))  # folder link outside
    os.symlink(os.path.join(root, "id001", "0000.jpg"), os.path.join(root, "id000", "alias.jpg"))  # inside: ok
    os.symlink(root, os.path.join(root, "id001", "loop"))                        # loop to the input itself
    for name in ("..jpg", "...jpg", ".hidden.jpg"):
        write(os.path.join(root, "id000", name), img_bytes(seed=5))
    os.makedirs(os.path.join(root, ".git"))
    rep = build("image-folder", root, tmp_path / "out")
    assert rep["num_samples"] == 5
    assert rep["skipped_by_reason"] == {"hidden_file": 4, "outside_input": 2, "symlink_loop": 1}
    hidden = sorted(os.path.basename(s["item"]) for s in rep["skipped"] if s["reason"] == "hidden_file")
    assert hidden == ["...jpg", "..jpg", ".git", ".hidden.jpg"]
    rep = build("image-folder", root, tmp_path / "out2", allow_outside=True)
    assert rep["num_samples"] == 7 and rep["skipped_by_reason"] == {"hidden_file": 4, "symlink_loop": 1}


def test_allow_outside_flag_on_the_cli(tmp_path, capsys):
    from sharding.cli import main

    secret = _secret_outside(tmp_path)
    root = make_image_folder(tmp_path / "in", n_ids=1, per_id=2)
    os.symlink(secret, os.path.join(root, "id000", "evil.jpg"))
    assert main(["build", "--format", "image-folder", "--input", root, "--output", str(tmp_path / "o"),
                 "--no-progress", "--workers", "1"]) == 0
    import json

    assert json.load(open(tmp_path / "o" / "report.json"))["skipped_by_reason"] == {"outside_input": 1}
    assert main(["build", "--format", "image-folder", "--input", root, "--output", str(tmp_path / "o2"),
                 "--no-progress", "--workers", "1", "--allow-outside"]) == 0
    assert json.load(open(tmp_path / "o2" / "report.json"))["num_samples"] == 3


# ------------------------------------------------------------------------- malicious shards (items 3-5)
def _shards(folder, n=12, classes=None, corrupt_every=0) -> str:
    from ssfer_dist.train.debugdata import face_images, write_shard_folder

    return write_shard_folder(str(folder), face_images(n, 32), classes or [i % 7 for i in range(n)],
                              dataset="t", num_classes=7, samples_per_shard=n, corrupt_every=corrupt_every)


def _member(name, data=b"", kind=tarfile.REGTYPE, linkname="", size=None):
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode, ti.mtime = kind, linkname, 0o644, 0
    ti.size = len(data) if kind == tarfile.REGTYPE and size is None else (size or 0)
    return ti, data


def _rewrite_shard(folder, edit) -> str:
    """Rewrite the folder's first shard as ``edit(members) -> members`` (``[(TarInfo, bytes or None)]``; a
    ``None`` body with ``size`` > 0 leaves a hole: a sparse file, no disk or RAM used) and fix the manifest's
    size and sha256, as an attacker who writes shards would."""
    from ssfer_dist.shards.manifest import read_manifest, write_manifest

    m = read_manifest(folder)
    sh = m.shards[0]
    with tarfile.open(sh.url) as tf:
        members = [(ti, tf.extractfile(ti).read()) for ti in tf.getmembers()]
    members = edit(members)
    with open(sh.url, "wb") as f:
        for ti, data in members:
            f.write(ti.tobuf(tarfile.GNU_FORMAT))
            if data is None:
                f.seek(ti.size, 1)
            else:
                f.write(data)
            f.write(b"\0" * ((-ti.size) % 512))
        f.write(b"\0" * 1024)
        f.truncate()
    h = hashlib.sha256()
    with open(sh.url, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    new = dataclasses.replace(sh, num_bytes=os.path.getsize(sh.url), sha256=h.hexdigest())
    write_manifest(folder, [new] + list(m.shards[1:]), dataset=m.dataset, image_size=m.image_size,
                   num_classes=m.num_classes, role=m.role)
    return folder


EVIL = [("../evil.jpg", "unsafe_name"), ("/abs/evil.jpg", "unsafe_name"), ("t/lnk.jpg", "not_a_file"),
        ("t/hard.jpg", "not_a_file"), ("t/dev.jpg", "not_a_file"), ("t/dir", "not_a_file")]


def _evil_members():
    return [_member("../evil.jpg", b"x" * 10), _member("/abs/evil.jpg", b"y" * 10),
            _member("t/lnk.jpg", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
            _member("t/hard.jpg", kind=tarfile.LNKTYPE, linkname="t/img00000.jpg"),
            _member("t/dev.jpg", kind=tarfile.CHRTYPE), _member("t/dir", kind=tarfile.DIRTYPE)]


@pytest.fixture
def evil_folder(tmp_path):
    return _rewrite_shard(_shards(tmp_path / "evil"), lambda ms: ms[:6] + _evil_members() + ms[6:])


def test_reader_refuses_unsafe_members_and_keeps_the_rest(evil_folder):
    from ssfer_dist.shards.manifest import read_manifest
    from ssfer_dist.shards.tario import iter_url_samples

    probs = []
    got = list(iter_url_samples(read_manifest(evil_folder).shard_urls()[0], problems=probs))
    assert [(p.member, p.reason) for p in probs] == EVIL
    assert len(got) == 12 and all(not k.startswith(("/", "..")) and "lnk" not in k for k, _ in got)
    assert "t/img00000" in dict(got)              # the sample the hard link points at is still fine


def test_verify_fails_unsafe_members(evil_folder, capsys):
    from sharding.cli import main
    from sharding.verify import verify

    problems, _ = verify(evil_folder)
    for name, _reason in EVIL:
        assert any(repr(name) in p for p in problems), (name, problems)
    assert main(["verify", evil_folder]) == 1
    assert "verify FAILED" in capsys.readouterr().out


def test_split_never_copies_unsafe_members(evil_folder, tmp_path):
    from sharding.split import split_shards

    out = tmp_path / "split"
    with pytest.raises(UserError, match=r"refused tar member\(s\), first member '\.\./evil\.jpg'.*no manifest"):
        split_shards(evil_folder, str(out), fraction=0.5, per_class=False, seed=0, samples_per_shard=2)
    names = []
    for root, _, files in os.walk(out):
        assert "manifest.parquet" not in files
        for fn in files:
            with tarfile.open(os.path.join(root, fn)) as tf:
                names += tf.getnames()
    assert names and not [n for n in names if "evil" in n or "lnk" in n or "hard" in n or "dev" in n]


def test_inspect_counts_refused_corrupt_and_bomb_samples(tmp_path, evil_folder, capsys):
    from sharding.cli import main
    from sharding.inspection import inspect_shards

    def bad_images(ms):
        out = []
        for ti, data in ms:
            if ti.name == "t/img00001.jpg":
                data = b"\xff\xd8 this is not a jpeg"
            elif ti.name == "t/img00002.jpg":
                data = _jpeg_bomb()
            out.append((_resized(ti, data), data))
        return out

    folder = _rewrite_shard(_shards(tmp_path / "c"), bad_images)
    stats = {}
    sheet = str(tmp_path / "sheet.png")
    text = inspect_shards(folder, sheet=sheet, num=64, stats=stats)
    assert stats == {"corrupt": 2, "refused": 0} and "2 sample(s) on the sheet do not decode" in text
    from PIL import Image

    img = Image.open(sheet).convert("RGB")
    top = 2 * 14 + 4                                             # the colour legend above the tiles
    assert img.getpixel((128 + 64, top + 10)) == (90, 0, 0)      # tile 1: the corrupt mark (dark red)
    assert img.getpixel((3, top + 3)) != (90, 0, 0)              # tile 0: a face
    assert main(["inspect", evil_folder, "--sheet", str(tmp_path / "s2.png")]) == 0
    assert "6 tar member(s) refused" in capsys.readouterr().out


def _resized(ti, data):
    t = tarfile.TarInfo(ti.name)
    t.size, t.mode, t.mtime, t.type = len(data), ti.mode, ti.mtime, ti.type
    return t


def _jpeg_bomb(w=12000, h=12000) -> bytes:
    """A valid small JPEG whose SOF header claims w x h pixels (144 M: above PIL's warning limit, below its
    error limit, so only our pixel cap stops a 432 MB decode)."""
    data = bytearray(img_bytes(16, 16))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def test_huge_member_is_refused_everywhere_without_loading_it(tmp_path):
    """A 200 MB member (a sparse file: no disk, no RAM to make it) is refused by verify, inspect, split,
    evaluate and the training pipeline; the readers' peak Python memory stays small."""
    import tracemalloc

    from sharding.inspection import inspect_shards
    from sharding.split import split_shards
    from sharding.verify import verify
    from ssfer_dist.evaluate import evaluate_shards
    from tests.test_export import make_weights

    big = 200 * 1024 * 1024
    folder = _rewrite_shard(_shards(tmp_path / "big"),
                            lambda ms: ms[:3] + [(_member("t/zzhuge.jpg", kind=tarfile.REGTYPE, size=big)[0], None)]
                            + ms[3:])
    assert os.stat(os.path.join(folder, "t-000000.tar")).st_blocks * 512 < 8 << 20   # sparse on disk
    weights = str(tmp_path / "w.safetensors")
    make_weights(weights, img_size=32)
    tracemalloc.start()
    try:
        problems, _ = verify(folder)
        assert any("'t/zzhuge.jpg'" in p and "member cap" in p for p in problems), problems
        stats = {}
        inspect_shards(folder, sheet=str(tmp_path / "s.png"), stats=stats)
        assert stats["refused"] == 1
        with pytest.raises(UserError, match="t/zzhuge.jpg"):
            split_shards(folder, str(tmp_path / "sp"), fraction=0.5, per_class=False, seed=0)
        m = evaluate_shards(weights, folder)
        assert m["num_corrupt"] == 1 and sum(map(sum, m["confusion"])) == 12
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 << 20, peak
    # a smaller cap refuses ordinary members too (the flag reaches the reader)
    problems, _ = verify(folder, max_member_bytes=100)
    assert sum("member cap" in p for p in problems) >= 12


def test_pipeline_counts_refused_members_as_corrupt(evil_folder):
    from ssfer_dist.shards.manifest import read_manifest
    from ssfer_dist.data.pipeline import ShardStream, StreamSpec, Source, View, make_loader

    urls = read_manifest(evil_folder).shard_urls()
    stream = ShardStream([StreamSpec((Source(tuple(urls)),), (View("image", "mae"),), 6, False)], img_size=32,
                         rank=0, world_size=1, batches_per_epoch=4, seed=0, shuffle_buffer=4)
    it = iter(make_loader(stream, 0))
    batches = [next(it) for _ in range(4)]
    keys = [k for b in batches for k in b["__key__"]]
    assert keys and all(k.startswith("t/img") for k in keys)
    assert int(batches[-1]["__corrupt__"][1]) >= len(EVIL)
    # the same shard under a cap smaller than every member: nothing is decodable, the stream says so
    stream = ShardStream([StreamSpec((Source(tuple(urls)),), (View("image", "mae"),), 6, False)], img_size=32,
                         rank=0, world_size=1, batches_per_epoch=4, seed=0, shuffle_buffer=4, max_member_bytes=10)
    stream_it = iter(make_loader(stream, 0))
    with pytest.raises(Exception, match="corrupt samples in a row"):
        next(stream_it)


def test_evaluate_with_no_decodable_sample_is_an_error(tmp_path, capsys):
    from ssfer_dist.cli import main
    from tests.test_export import make_weights

    folder = _shards(tmp_path / "allbad", corrupt_every=1)
    weights = str(tmp_path / "w.safetensors")
    make_weights(weights, img_size=32)
    rc = main(["evaluate", "--weights", weights, "--shards", folder])
    err = capsys.readouterr().err
    assert rc != 0 and "no sample could be evaluated (12 corrupt" in err and "Traceback" not in err


def test_predict_refuses_a_bomb_photo_before_decoding(tmp_path, capsys):
    from ssfer_dist.predict import predict_cli
    from tests.test_export import make_weights

    weights = str(tmp_path / "w.safetensors")
    make_weights(weights, img_size=32)
    bomb = write(os.path.join(tmp_path, "bomb.jpg"), _jpeg_bomb(9000, 9000))     # 81 Mpx > the 64 Mpx cap
    assert predict_cli(weights, [bomb], detector="none") == 1
    assert "not a readable image (ImageTooLarge)" in capsys.readouterr().err


# ------------------------------------------------------------------------- secrets, unit level (item 1)
def test_worker_env_and_storage_filesystem_carry_no_credential(monkeypatch, tmp_path):
    """What the launcher hands to Ray (runtime env, payload env, pickled RunConfig filesystem) holds no
    credential; the end-to-end search is tests/test_dist_ray.py::test_mae_zero2_on_s3_loss_falls."""
    import pickle

    from ssfer_dist.launchers import ray as launch
    from ssfer_dist.worker_env import non_secret_env

    secret = "unit-secret-" + os.urandom(6).hex()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unit-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", secret + "-token")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    env = launch._worker_env(False)
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1" and env["AWS_REGION"] == "eu-west-1"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)
    assert secret not in repr(env)
    # even a caller asking for them by name gets nothing secret
    assert non_secret_env(["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MY_API_TOKEN", "AWS_REGION"],
                          {"AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t", "MY_API_TOKEN": "u",
                           "AWS_REGION": "r"}) == {"AWS_REGION": "r"}
    from sharding.build import _forward_env

    fwd = _forward_env()
    assert fwd.get("AWS_ENDPOINT_URL") == "http://127.0.0.1:1"
    assert secret not in repr(fwd) and "unit-key-id" not in repr(fwd)
    from ssfer_dist import storage

    monkeypatch.setattr(storage, "ensure_dir", lambda url: None)
    args = launch._storage_args("s3://bucket/runs")
    blob = pickle.dumps(args["storage_filesystem"])
    assert secret.encode() not in blob and b"unit-key-id" not in blob


def test_worker_without_credentials_says_so(monkeypatch, tmp_path):
    from ssfer_dist.worker_env import check_s3_credentials

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    monkeypatch.delenv("AWS_WEB_IDENTITY_TOKEN_FILE", raising=False)
    with pytest.raises(UserError, match=r"run s3://b/r: no S3 credentials in this Ray worker's environment.*ssfer-s3"):
        check_s3_credentials("run s3://b/r")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    check_s3_credentials("run s3://b/r")
