"""Shard builder end to end: S3 output, determinism across workers, resume after a kill, verify,
inspect, split, Ray tasks."""
from __future__ import annotations

import json
import os
import tarfile

import pytest
from PIL import Image
from test_shard_formats import build, make_image_folder, make_rafdb

import sharding.writer as writer_mod
from sharding.cli import main as shard_main
from sharding.split import split_shards
from sharding.verify import verify
from ssfer_dist import storage
from ssfer_dist.shards.manifest import read_manifest
from ssfer_dist.shards.schema import SampleMeta


def _shard_files(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith(".tar"))


def test_s3_build_read_back_with_webdataset(tmp_path, s3_bucket):
    import webdataset as wds

    root = make_rafdb(tmp_path / "raf", n_train=10)
    out = f"{s3_bucket}/raf/train"
    rep = build("rafdb", root, out, samples_per_shard=4, workers=2)
    assert rep["num_samples"] == 10 and rep["num_shards"] == 3
    m = read_manifest(out)
    assert m.shard_urls()[0] == f"{out}/rafdb-000000.tar" and m.num_classes == 7
    names = storage.list_files(out)
    assert "manifest.parquet" in names and "report.json" in names
    assert not [n for n in names if "tmp" in n]
    storage.register_webdataset_s3()
    ds = wds.WebDataset(m.shard_urls(), shardshuffle=False).decode("pil")
    got = list(ds)
    assert [s["__key__"] for s in got] == m.index().column("key").to_pylist()
    for s in got:
        assert s["jpg"].size == (112, 112) and int(s["cls"]) == s["json"]["cls"]
    problems, stats = verify(out)
    assert problems == [] and stats["num_samples"] == 10


def test_same_seed_same_shards_any_workers(tmp_path, monkeypatch):
    import multiprocessing

    import sharding.build as sb

    root = make_image_folder(tmp_path / "casia", n_ids=3, per_id=5)
    a = build("image-folder", root, tmp_path / "a", seed=3, workers=1, image_size=64)
    build("image-folder", root, tmp_path / "b", seed=3, workers=2, image_size=64)
    # the pool's other start method (spawn: used when a Python thread runs, and off Linux) too
    other = "spawn" if sb._pool_context().get_start_method() == "fork" else "fork"
    monkeypatch.setattr(sb, "_pool_context", lambda: multiprocessing.get_context(other))
    build("image-folder", root, tmp_path / "s", seed=3, workers=2, image_size=64)
    ma = read_manifest(str(tmp_path / "a"))
    for other_out in ("b", "s"):
        mb = read_manifest(str(tmp_path / other_out))
        assert [s.sha256 for s in ma.shards] == [s.sha256 for s in mb.shards]
        assert ma.index().equals(mb.index())
        for n in _shard_files(tmp_path / "a"):
            assert (tmp_path / "a" / n).read_bytes() == (tmp_path / other_out / n).read_bytes()
    build("image-folder", root, tmp_path / "c", seed=4, image_size=64)
    assert read_manifest(str(tmp_path / "c")).index().column("key").to_pylist() != \
        ma.index().column("key").to_pylist()
    assert a["reencoded"] == 15 and a["passed_through"] == 0


def test_resume_after_kill_gives_the_same_manifest(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "ids", n_ids=4, per_id=5)
    out = tmp_path / "out"
    build("image-folder", root, out, seed=1)
    reference = (out / "manifest.parquet").read_bytes()
    ref_shards = {n: (out / n).read_bytes() for n in _shard_files(out)}
    assert len(ref_shards) == 5
    storage.delete(str(out))

    real_publish = writer_mod.publish
    calls = []

    def dying_publish(tmp, url):
        calls.append(url)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")  # the process dies mid-build
        real_publish(tmp, url)

    monkeypatch.setattr(writer_mod, "publish", dying_publish)
    with pytest.raises(KeyboardInterrupt):
        build("image-folder", root, out, seed=1)
    monkeypatch.setattr(writer_mod, "publish", real_publish)
    left = sorted(os.listdir(out))
    assert not (out / "manifest.parquet").exists()  # no manifest naming incomplete work
    assert _shard_files(out) == sorted(ref_shards)[:2]  # only complete shards under final names
    assert [p for p in left if p.startswith(".tmp")] == []
    for n in _shard_files(out):
        assert (out / n).read_bytes() == ref_shards[n]
    rep = build("image-folder", root, out, seed=1)
    assert rep["resumed_shards"] == 2
    assert (out / "manifest.parquet").read_bytes() == reference
    # finished: the sidecars are merged into one hidden state file, no _build/ folder beside the shards
    assert not (out / "_build").exists() and (out / ".build-state.json").is_file()
    assert build("image-folder", root, out, seed=1)["resumed_shards"] == 5
    # a damaged complete shard is rebuilt, not trusted
    damaged = out / sorted(ref_shards)[0]
    damaged.write_bytes(damaged.read_bytes()[:-512] + b"\1" * 512)
    assert build("image-folder", root, out, seed=1)["resumed_shards"] == 4
    assert damaged.read_bytes() == ref_shards[damaged.name]


def _flip_byte_in_member(path, ext, at=None):
    data = bytearray(open(path, "rb").read())
    with tarfile.open(path) as tf:
        m = next(m for m in tf.getmembers() if m.name.endswith("." + ext))
    pos = m.offset_data + (m.size // 2 if at is None else at)
    data[pos] ^= 0x40
    open(path, "wb").write(bytes(data))


def test_verify_catches_a_flipped_byte(tmp_path, capsys):
    root = make_rafdb(tmp_path / "raf", n_train=6)
    out = tmp_path / "out"
    build("rafdb", root, out, image_size=64)
    assert shard_main(["verify", str(out)]) == 0
    first = out / _shard_files(out)[0]
    _flip_byte_in_member(first, "jpg")
    assert shard_main(["verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert f"{first}: sha256" in text and "verify FAILED" in text
    _flip_byte_in_member(out / _shard_files(out)[1], "json", at=0)  # "{" -> ";"
    problems, _ = verify(str(out))
    assert any("json invalid" in p for p in problems if _shard_files(out)[1] in p)
    assert len([p for p in problems if "sha256" in p]) == 2


def test_inspect_writes_contact_sheet(tmp_path, capsys):
    root = make_rafdb(tmp_path / "raf", n_train=5)
    build("rafdb", root, tmp_path / "out")
    sheet = tmp_path / "sheet.png"
    assert shard_main(["inspect", str(tmp_path / "out"), "--sheet", str(sheet), "--num", "4"]) == 0
    text = capsys.readouterr().out
    assert "samples: 5" in text and "happiness" in text
    im = Image.open(sheet)
    assert im.format == "PNG" and im.size[0] == 4 * 128
    rgb = im.convert("RGB")
    legend_h = 2 * 14 + 4                   # two legend rows above the tiles: red = face box, yellow = fallback
    px = rgb.getpixel((1, legend_h + 1))
    assert px[0] > 200 and px[1] < 80  # the red box edge along the whole-frame box
    red, yellow = rgb.getpixel((4, 2 + 2)), rgb.getpixel((4, 2 + 14 + 2))
    assert red[0] > 200 and red[1] < 80 and yellow[0] > 200 and yellow[1] > 200 and yellow[2] < 80


def test_split_is_deterministic_and_byte_exact(tmp_path):
    root = make_rafdb(tmp_path / "raf", n_train=28)
    src = tmp_path / "all"
    build("rafdb", root, src, samples_per_shard=8)
    a = split_shards(str(src), str(tmp_path / "s1"), fraction=0.3, per_class=True, seed=5, samples_per_shard=4)
    b = split_shards(str(src), str(tmp_path / "s2"), fraction=0.3, per_class=True, seed=5, samples_per_shard=4)
    assert a == b == {"labeled": 7, "unlabeled": 21}  # 4 per class -> round(1.2) = 1 each
    for role in ("labeled", "unlabeled"):
        m1 = read_manifest(str(tmp_path / "s1" / role))
        assert m1.index().equals(read_manifest(str(tmp_path / "s2" / role)).index())
        assert m1.role == role and m1.num_classes == 7
    lab = read_manifest(str(tmp_path / "s1" / "labeled"))
    assert lab.class_hist() == [1] * 7
    src_samples = {}
    for n in _shard_files(src):
        with tarfile.open(src / n) as tf:
            for mem in tf.getmembers():
                src_samples[mem.name] = tf.extractfile(mem).read()
    copied = {}
    for role in ("labeled", "unlabeled"):
        for n in _shard_files(tmp_path / "s1" / role):
            with tarfile.open(tmp_path / "s1" / role / n) as tf:
                for mem in tf.getmembers():
                    copied[mem.name] = tf.extractfile(mem).read()
    assert copied == src_samples
    c = split_shards(str(src), str(tmp_path / "s3"), fraction=0.3, per_class=True, seed=6)
    assert c == a
    keys3 = set(read_manifest(str(tmp_path / "s3" / "labeled")).index().column("key").to_pylist())
    assert keys3 != set(lab.index().column("key").to_pylist())
    assert verify(str(tmp_path / "s1" / "labeled"))[0] == []
    assert shard_main(["split", "--manifest", str(src), "--fraction", "1.5", "--output", str(tmp_path / "x")]) == 2


def test_ray_build_matches_local(tmp_path, ray_local):
    root = make_image_folder(tmp_path / "ids", n_ids=2, per_id=5)
    local = build("image-folder", root, tmp_path / "local", seed=2)
    rayrep = build("image-folder", root, tmp_path / "ray", seed=2, ray=True)
    assert rayrep["num_shards"] == local["num_shards"] == 3
    ml, mr = read_manifest(str(tmp_path / "local")), read_manifest(str(tmp_path / "ray"))
    assert [s.sha256 for s in ml.shards] == [s.sha256 for s in mr.shards]
    assert ml.index().equals(mr.index())
    assert verify(str(tmp_path / "ray"))[0] == []
    meta = SampleMeta.from_json(next(iter(tarfile.open(mr.shard_urls()[0]).extractfile(m).read()
                                           for m in tarfile.open(mr.shard_urls()[0]).getmembers()
                                           if m.name.endswith(".json"))))
    assert meta.box_source == "frame"


def test_real_sigkill_then_resume(tmp_path):
    """SIGKILL the CLI (and its worker processes) mid-build, rerun, compare with an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    root = make_image_folder(tmp_path / "ids", n_ids=4, per_id=15)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sharding", "build", "--format", "image-folder", "--input", root, "--output",
           str(out), "--samples-per-shard", "2", "--image-size", "64", "--workers", "2", "--seed", "9",
           "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    reference = (out / "manifest.parquet").read_bytes()
    storage.delete(str(out))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "_build").is_dir() and len(os.listdir(out / "_build")) >= 2:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(_shard_files(out))
    for n in _shard_files(out):  # whatever is visible under a final name is complete
        with tarfile.open(out / n) as tf:
            assert len(tf.getmembers()) == 4
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (out / "manifest.parquet").read_bytes() == reference
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_shards"] >= min(done_before, 1)
    assert [p for p in os.listdir(out) if p.startswith(".tmp")] == []  # stale temp files cleaned


def test_max_shard_bytes_and_rec_plans(tmp_path):
    from test_shard_formats import img_bytes, make_rec, rec_payload

    recs = [(k, rec_payload(k % 3, img_bytes(seed=k))) for k in range(12)]
    rec = make_rec(tmp_path / "r", recs, 3)
    one = len(img_bytes(seed=0))
    rep = build("insightface-rec", rec, tmp_path / "a", samples_per_shard=100, max_shard_bytes=3 * (one + 3 * 1024))
    assert rep["num_shards"] >= 4 and rep["num_samples"] == 12
    rep2 = build("insightface-rec", rec, tmp_path / "b", samples_per_shard=100, max_shard_bytes=3 * (one + 3 * 1024),
                 workers=2)
    ma, mb = read_manifest(str(tmp_path / "a")), read_manifest(str(tmp_path / "b"))
    assert [s.sha256 for s in ma.shards] == [s.sha256 for s in mb.shards] and rep2["num_shards"] == rep["num_shards"]
    assert max(s.num_samples for s in ma.shards) <= 3


def test_ray_build_to_s3(tmp_path, ray_local, s3_bucket):
    root = make_rafdb(tmp_path / "raf", n_train=5)
    out = f"{s3_bucket}/ray-raf"
    rep = build("rafdb", root, out, ray=True, samples_per_shard=2)
    assert rep["num_shards"] == 3 and rep["num_samples"] == 5
    assert verify(out)[0] == []
    assert sorted(n for n in storage.list_files(out) if n.endswith(".tar")) == \
        ["rafdb-000000.tar", "rafdb-000001.tar", "rafdb-000002.tar"]


def test_cli_workers_default_to_usable_cpus(tmp_path, monkeypatch, capsys):
    import sharding.build
    from sharding.cli import usable_cpus

    seen = []

    def fake_run_build(cfg):
        seen.append(cfg.workers)
        return {"num_samples": 0, "num_shards": 0, "num_skipped": 0, "skipped_by_reason": {}, "images_per_s": 0}

    monkeypatch.setattr(sharding.build, "run_build", fake_run_build)
    args = ["build", "--format", "image-folder", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    assert shard_main(args) == 0 and shard_main(args + ["--workers", "3"]) == 0
    assert seen == [usable_cpus(), 3] and usable_cpus() >= 1
    assert shard_main(args + ["--workers", "0"]) == 2
    assert "--workers 0: must be at least 1" in capsys.readouterr().err


def test_spec_and_flags_fill_one_build_config(tmp_path, monkeypatch, capsys):
    """--spec keys and flags map onto BuildConfig, whose defaults fill the rest; the spec is type-checked."""
    import sharding.build

    seen = []
    monkeypatch.setattr(sharding.build, "run_build", lambda cfg: seen.append(cfg) or {
        "num_samples": 0, "num_shards": 0, "num_skipped": 0, "skipped_by_reason": {}, "images_per_s": 0})
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"format: rafdb\ninput: {tmp_path}\nimage-size: 64\nbox_scale: 2\nname: null\nray: true\n")
    assert shard_main(["build", "--spec", str(spec), "--output", str(tmp_path / "o"), "--seed", "5",
                       "--no-progress"]) == 0
    cfg = seen[-1]
    assert (cfg.image_size, cfg.box_scale, cfg.seed, cfg.ray, cfg.progress) == (64, 2.0, 5, True, False)
    assert isinstance(cfg.box_scale, float) and cfg.name is None
    assert cfg.jpeg_quality == sharding.build.BuildConfig.jpeg_quality      # the one default
    spec.write_text("format: rafdb\nseed: true\n")
    assert shard_main(["build", "--spec", str(spec)]) == 2
    assert "spec.yaml: seed: expected int, got True" in capsys.readouterr().err
