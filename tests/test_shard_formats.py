"""Shard builder: every source format from fixtures made here, bad input, read back with tarfile/webdataset.

The helpers at the top (``make_*``) write tiny datasets in each on-disk format; other test_shard*
files import them.
"""
from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from sharding.build import BuildConfig, run_build
from ssfer_dist.shards.manifest import read_manifest
from ssfer_dist.shards.schema import SampleMeta
from ssfer_dist.errors import UserError

MAGIC = 0xCED7230A


# ----------------------------------------------------------------------------------------- fixtures
def img_bytes(w=112, h=112, seed=0, mode="RGB", fmt="JPEG", **kw) -> bytes:
    r = np.random.RandomState(seed)
    if mode == "I;16":
        im = Image.fromarray(np.full((h, w), 32896, np.uint16))
    else:
        arr = r.randint(0, 256, (h, w, 3), dtype=np.uint8)
        im = Image.fromarray(arr, "RGB").convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bomb(w=60000, h=60000) -> bytes:
    """A PNG whose header claims w x h pixels (a few bytes of data): a decompression bomb."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + chunk(b"IEND", b""))


def write(path, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def make_image_folder(root, n_ids=3, per_id=4, size=112) -> str:
    for i in range(n_ids):
        for j in range(per_id):
            write(os.path.join(root, f"id{i:03d}", f"{j:04d}.jpg"), img_bytes(size, size, seed=i * 100 + j))
    return str(root)


def rec_chunks(payload: bytes) -> bytes:
    """dmlc RecordIO writer: split at every 4-byte-aligned magic (dropping it), pad to 4 bytes."""
    magic = struct.pack("<I", MAGIC)
    out = b""
    dptr = 0
    n = len(payload)
    for i in range(0, (n >> 2) << 2, 4):
        if payload[i:i + 4] == magic:
            out += magic + struct.pack("<I", ((1 if dptr == 0 else 2) << 29) | (i - dptr)) + payload[dptr:i]
            dptr = i + 4
    out += magic + struct.pack("<I", ((3 if dptr else 0) << 29) | (n - dptr)) + payload[dptr:]
    return out + b"\0" * ((-n) % 4)


def rec_payload(label, img: bytes = b"", id1=0, id2=0) -> bytes:
    if isinstance(label, (list, tuple)):
        return struct.pack("<IfQQ", len(label), 0.0, id1, id2) + np.asarray(label, "<f4").tobytes() + img
    return struct.pack("<IfQQ", 0, float(label), id1, id2) + img


def make_rec(folder, records, num_classes) -> str:
    """Write train.rec/train.idx/property from ``[(key, payload)]``."""
    os.makedirs(folder, exist_ok=True)
    data = b""
    idx = []
    for k, p in records:
        idx.append(f"{k}\t{len(data)}")
        data += rec_chunks(p)
    write(os.path.join(folder, "train.rec"), data)
    write(os.path.join(folder, "train.idx"), ("\n".join(idx) + "\n").encode())
    write(os.path.join(folder, "property"), f"{num_classes},112,112\n".encode())
    return str(folder)


def make_rec_old_style(folder, ids=((0, 3), (1, 2))):
    """Old-style: record 0 = header [A, B]; images 1..A-1; identity records A..B-1. Image 1 is multi-part."""
    imgs, id_recs, k = [], [], 1
    for ident, count in ids:
        start = k
        for _ in range(count):
            # id1/id2 hold the magic at aligned offsets 8, 16 and 20 -> a 4-part record for key 1
            extra = dict(id1=MAGIC, id2=MAGIC | (MAGIC << 32)) if k == 1 else {}
            imgs.append((k, rec_payload(ident, img_bytes(seed=k), **extra)))
            k += 1
        id_recs.append((start, k))
    a = k
    recs = [(0, rec_payload([a, a + len(ids)]))] + imgs
    recs += [(a + i, rec_payload([s, e])) for i, (s, e) in enumerate(id_recs)]
    return make_rec(folder, recs, len(ids))


def make_rafdb(root, n_train=6, n_test=3) -> str:
    lines = []
    for i in range(1, n_train + 1):
        name = f"train_{i:05d}"
        lines.append(f"{name}.jpg {(i % 7) + 1}")
        write(os.path.join(root, "Image", "aligned", f"{name}_aligned.jpg"), img_bytes(100, 100, seed=i))
    for i in range(1, n_test + 1):
        name = f"test_{i:04d}"
        lines.append(f"{name}.jpg {(i % 7) + 1}")
        write(os.path.join(root, "Image", "aligned", f"{name}_aligned.jpg"), img_bytes(100, 100, seed=50 + i))
    write(os.path.join(root, "EmoLabel", "list_patition_label.txt"), ("\n".join(lines) + "\n").encode())
    return str(root)


AFFECT_HEADER = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
                 "expression", "valence", "arousal"]


def make_affectnet(root, expressions=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)) -> str:
    for fname, split in (("training.csv", "train"), ("validation.csv", "test")):
        rows = [AFFECT_HEADER]
        for i, e in enumerate(expressions):
            rel = f"{split}{i % 2}/{split}_{i:03d}.jpg"
            write(os.path.join(root, "Manually_Annotated_Images", rel), img_bytes(160, 140, seed=i))
            rows.append([rel, "20", "10", "100", "110", "1;2;3;4", str(e), "0.1", "0.2"])
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        write(os.path.join(root, "Manually_Annotated_file_lists", fname), buf.getvalue().encode())
    return str(root)


def make_fer(root, votes=None, emotions=(0, 1, 2, 3, 4, 5, 6, 3), usages=None) -> str:
    """fer2013.csv (+ fer2013new.csv when ``votes`` is given: one 10-vote list or None (dropped) per row)."""
    r = np.random.RandomState(0)
    usages = usages or ["Training"] * (len(emotions) - 2) + ["PublicTest", "PrivateTest"]
    rows = [["emotion", "pixels", "Usage"]]
    for e, u in zip(emotions, usages):
        rows.append([str(e), " ".join(str(v) for v in r.randint(0, 256, 2304)), u])
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    write(os.path.join(root, "fer2013.csv"), buf.getvalue().encode())
    if votes is not None:
        nrows = [["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                  "contempt", "unknown", "NF"]]
        for i, (v, u) in enumerate(zip(votes, usages)):
            nrows.append([u, "" if v is None else f"fer{i:07d}.png"] + [str(x) for x in (v or [0] * 10)])
        buf = io.StringIO()
        csv.writer(buf).writerows(nrows)
        write(os.path.join(root, "fer2013new.csv"), buf.getvalue().encode())
    return str(root)


def build(fmt, inp, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("samples_per_shard", 4)
    return run_build(BuildConfig(format=fmt, input=str(inp), output=str(out), **kw))


def read_tar_samples(folder):
    """All samples of all shards of a local folder, via plain tarfile: {key: {ext: bytes}}."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(folder, name)) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


# ----------------------------------------------------------------------------------------- tests
def test_image_folder_modes_and_bad_files(tmp_path):
    src = tmp_path / "in"
    ok = img_bytes(112, 112, seed=1)
    write(src / "a" / "ok.jpg", ok)
    write(src / "a" / "big.jpg", img_bytes(200, 150, seed=2))
    write(src / "a" / "cmyk.jpg", img_bytes(112, 112, seed=3, mode="CMYK"))
    write(src / "b" / "gray.png", img_bytes(80, 80, seed=4, mode="L", fmt="PNG"))
    write(src / "b" / "deep.png", img_bytes(64, 64, mode="I;16", fmt="PNG"))
    rgba = Image.new("RGBA", (50, 50), (10, 20, 30, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    write(src / "b" / "alpha.png", buf.getvalue())
    write(src / "b" / "pal.gif", img_bytes(40, 40, seed=5, mode="P", fmt="GIF"))
    write(src / "c" / "trunc.jpg", img_bytes(300, 300, seed=6)[:2000])
    write(src / "c" / "zero.jpg", b"")
    write(src / "c" / "text.jpg", b"hello, not an image")
    write(src / "c" / "bomb.png", png_bomb())
    write(src / "c" / "readme.txt", b"x")
    rep = build("image-folder", src, tmp_path / "out", image_size=112, name="ds")
    assert rep["skipped_by_reason"] == {"corrupt_image": 1, "decompression_bomb": 1, "empty_file": 1,
                                        "not_an_image": 1, "not_an_image_file": 1}
    assert rep["num_samples"] == 7 and rep["passed_through"] == 1 and rep["reencoded"] == 6
    samples = read_tar_samples(tmp_path / "out")
    assert set(samples) == {"ds/a/ok", "ds/a/big", "ds/a/cmyk", "ds/b/gray", "ds/b/deep", "ds/b/alpha", "ds/b/pal"}
    assert samples["ds/a/ok"]["jpg"] == ok  # passed through byte for byte
    for key, s in samples.items():
        im = Image.open(io.BytesIO(s["jpg"]))
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (112, 112)), key
        meta = SampleMeta.from_json(s["json"])
        assert meta.box == (0.0, 0.0, 112.0, 112.0) and meta.box_source == "frame"
        assert meta.identity == key.split("/")[1] and "cls" not in s
    deep = np.asarray(Image.open(io.BytesIO(samples["ds/b/deep"]["jpg"])))
    assert abs(float(deep.mean()) - 128) < 3  # 16-bit scaled, not clipped to 255
    alpha = np.asarray(Image.open(io.BytesIO(samples["ds/b/alpha"]["jpg"])))
    assert alpha.min() > 240  # transparent -> white background
    assert SampleMeta.from_json(samples["ds/a/big"]["json"]).orig_size == (200, 150)
    m = read_manifest(str(tmp_path / "out"))
    assert m.num_samples == 7 and m.num_classes == 0 and sorted(m.index().column("key").to_pylist()) == sorted(samples)
    rep_file = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {s["reason"] for s in rep_file["skipped"]} == set(rep["skipped_by_reason"])


def test_vggface2_boxes_and_detector(tmp_path):
    src = tmp_path / "train"
    write(src / "n000001" / "0001_01.jpg", img_bytes(200, 200, seed=1))
    write(src / "n000001" / "0002_01.jpg", img_bytes(120, 90, seed=2))
    write(tmp_path / "bb_landmark" / "loose_bb_train.csv",
          b'NAME_ID,X,Y,W,H\n"n000001/0001_01",50,60,60,80\n')
    # default --no-face skip: the face-less noise image is not stored, and the report says why
    rep = build("image-folder", src, tmp_path / "skip", image_size=56, name="vgg", detector="haar")
    assert rep["num_samples"] == 1 and rep["skipped_by_reason"] == {"no_face": 1} and rep["fallback_boxes"] == 0
    assert list(read_tar_samples(tmp_path / "skip")) == ["vgg/n000001/0001_01"]
    rep = build("image-folder", src, tmp_path / "out", image_size=56, name="vgg", detector="haar", no_face="keep")
    s = read_tar_samples(tmp_path / "out")
    meta = SampleMeta.from_json(s["vgg/n000001/0001_01"]["json"])
    # side = 1.25 * 80 = 100, centre (80, 100) -> crop x0 30, y0 50; scale 56/100
    assert meta.box_source == "annotation"
    assert meta.box == pytest.approx((20 * 0.56, 10 * 0.56, 80 * 0.56, 90 * 0.56), abs=1e-3)
    other = SampleMeta.from_json(s["vgg/n000001/0002_01"]["json"])
    assert other.box_source == "fallback"  # noise has no face
    assert rep["fallback_boxes"] == 1 and rep["box_sources"] == {"annotation": 1, "fallback": 1}
    write(tmp_path / "bad.csv", b"NAME,X,Y\n")
    with pytest.raises(UserError, match=r"bad.csv:1: expected header"):
        build("image-folder", src, tmp_path / "out2", boxes=str(tmp_path / "bad.csv"))


def test_image_folder_listing_parallel_equals_serial(tmp_path):
    """The compact listing: sorted and unique by key (``a.jpg``/``a.png`` collide, ``id1-x`` sorts
    before ``id1/``), boxes from loose_bb, files in the root too; a pool's ``map`` gives the same."""
    from multiprocessing import get_context

    from sharding.sources.image_folder import FileSlice, list_image_folder

    src = tmp_path / "train"
    for d in ("id1", "id1-x", "id2", "id 3", "id4"):
        for j in range(3):
            write(src / d / f"{j:02d}.jpg", img_bytes(16, 16, seed=j))
    write(src / "id2" / "00.png", img_bytes(16, 16, seed=9, fmt="PNG"))
    write(src / "id2" / "notes.txt", b"x")
    write(src / "top.jpg", img_bytes(16, 16, seed=7))
    write(src / "bb_landmark" / "loose_bb_train.csv", b'NAME_ID,X,Y,W,H\n"id1/01",1,2,3,4\n')
    serial = list_image_folder(str(src), name="vgg")
    with get_context("spawn").Pool(2) as pool:
        parallel = list_image_folder(str(src), name="vgg", map_fn=pool.map)
    for lst in (serial, parallel):
        recs = lst.records
        assert isinstance(recs, FileSlice) and len(recs) == 16
        assert recs.keys == sorted(recs.keys) and len(set(recs.keys)) == 16
        assert recs.keys[:4] == ["vgg/id1-x/00", "vgg/id1-x/01", "vgg/id1-x/02", "vgg/id1/00"]
        assert "vgg/id_3/00" in recs.keys and "vgg/top" in recs.keys
        assert sorted((s.reason, s.item.rsplit("/", 2)[-2:][-1]) for s in lst.skipped) == [
            ("duplicate_key", "00.png"), ("not_an_image_file", "notes.txt")]
        by_key = {r.key: r for r in recs}
        assert by_key["vgg/id1/01"].box == (1.0, 2.0, 4.0, 6.0) and by_key["vgg/id1/01"].box_source == "annotation"
        assert by_key["vgg/id1/00"].box is None and by_key["vgg/id1/00"].box_source == "detect"
        assert by_key["vgg/id2/00"].source_id == "id2/00.jpg" and by_key["vgg/id2/00"].identity == "id2"
        assert by_key["vgg/top"].identity is None and by_key["vgg/top"].load == ("file", str(src / "top.jpg"))
        assert by_key["vgg/id2/00"].size_hint == os.path.getsize(src / "id2" / "00.jpg")
    assert serial.records.rels == parallel.records.rels and serial.records.fingerprint_bytes() == \
        parallel.records.fingerprint_bytes()
    part = serial.records.take(np.array([3, 0]))
    assert [r.key for r in part] == [serial.records.keys[3], serial.records.keys[0]]


def test_worker_pool_forks_only_without_python_threads():
    import threading

    from sharding.build import _pool_context

    alone = threading.active_count() == 1  # other tests' fixtures may have left a thread running
    assert _pool_context().get_start_method() == ("fork" if alone and sys.platform.startswith("linux") else "spawn")
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert _pool_context().get_start_method() == "spawn"
    finally:
        stop.set()
        t.join()


def test_detectors_find_a_real_face():
    from skimage import data

    from ssfer_dist.detect import make_detector

    img = data.astronaut()
    for kind in ("haar", "mtcnn"):
        faces = make_detector(kind).detect(img)
        assert faces, kind
        x1, y1, x2, y2, _ = faces[0]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        assert 180 < cx < 280 and 60 < cy < 180, (kind, faces[0])  # the astronaut's face
    assert make_detector("none").detect(img) == []
    with pytest.raises(UserError):
        make_detector("yolo")


def test_insightface_old_style_multipart(tmp_path):
    rec = make_rec_old_style(tmp_path / "ms1m")
    raw = open(os.path.join(rec, "train.rec"), "rb").read()
    from sharding.sources.insightface import read_idx, read_record, unpack_payload

    offsets = dict(read_idx(os.path.join(rec, "train.idx")))
    lrec = struct.unpack("<I", raw[offsets[1] + 4:offsets[1] + 8])[0]
    assert lrec >> 29 == 1  # key 1 really is stored as a multi-part record
    with open(os.path.join(rec, "train.rec"), "rb") as f:
        flag, label, labels, img = unpack_payload(read_record(f, offsets[1]))
    assert img == img_bytes(seed=1) and label == 0.0
    rep = build("insightface-rec", rec, tmp_path / "out", name="ms1m")
    s = read_tar_samples(tmp_path / "out")
    assert sorted(s) == [f"ms1m/{k}" for k in ("1", "2", "3", "4", "5")]
    ids = {k: SampleMeta.from_json(v["json"]).identity for k, v in s.items()}
    assert ids == {"ms1m/1": "0", "ms1m/2": "0", "ms1m/3": "0", "ms1m/4": "1", "ms1m/5": "1"}
    assert s["ms1m/1"]["jpg"] == img_bytes(seed=1) and rep["passed_through"] == 5
    assert rep["source_info"]["style"] == "old"


def test_insightface_new_style_label_arrays(tmp_path):
    recs = [(0, rec_payload(7, img_bytes(seed=0))), (1, rec_payload([9.0, 3.0], img_bytes(seed=1))),
            (2, rec_payload(7, b"\xff\xd8garbage"))]
    rec = make_rec(tmp_path / "glint", recs, 10)
    rep = build("insightface-rec", os.path.join(rec, "train.rec"), tmp_path / "out", name="g")
    s = read_tar_samples(tmp_path / "out")
    assert sorted(s) == ["g/0", "g/1"] and rep["skipped_by_reason"] == {"not_an_image": 1}
    assert SampleMeta.from_json(s["g/1"]["json"]).identity == "9"
    assert SampleMeta.from_json(s["g/0"]["json"]).label_orig == 7.0
    os.unlink(os.path.join(rec, "train.idx"))
    with pytest.raises(UserError, match=r"train.idx: missing"):
        build("insightface-rec", rec, tmp_path / "out2")
    write(os.path.join(rec, "train.idx"), b"0\t0\nbroken line here\n")
    with pytest.raises(UserError, match=r"train.idx:2:"):
        build("insightface-rec", rec, tmp_path / "out2")


def test_rafdb(tmp_path):
    root = make_rafdb(tmp_path / "raf")
    with open(os.path.join(root, "EmoLabel", "list_patition_label.txt"), "a") as f:
        f.write("train_00099.jpg 9\ntrain_00098.jpg 2\n")  # unknown class; image missing
    rep = build("rafdb", root, tmp_path / "tr", split="train")
    assert rep["num_samples"] == 6 and rep["skipped_by_reason"] == {"missing_image": 1, "unknown_class": 1}
    assert any("list_patition_label.txt:10" in s["item"] for s in rep["skipped"])
    s = read_tar_samples(tmp_path / "tr")
    # train_00003 has RAF label 4 (Happiness) -> canonical 1
    assert s["rafdb/train_00003"]["cls"] == b"1"
    meta = SampleMeta.from_json(s["rafdb/train_00003"]["json"])
    assert meta.label_orig == 4 and meta.cls == 1 and meta.orig_size == (100, 100)
    assert read_manifest(str(tmp_path / "tr")).num_classes == 7
    assert build("rafdb", root, tmp_path / "te", split="test")["num_samples"] == 3
    with open(os.path.join(root, "EmoLabel", "list_patition_label.txt"), "a") as f:
        f.write("train_00100.jpg five\n")
    with pytest.raises(UserError, match=r"list_patition_label.txt:12: label must be an integer"):
        build("rafdb", root, tmp_path / "x")
    with pytest.raises(UserError, match=r"list_patition_label.txt: RAF-DB label file missing"):
        build("rafdb", tmp_path, tmp_path / "x")


def test_rafdb_aligned_boxes_from_csv_keep_the_frame(tmp_path):
    """``--boxes`` on aligned RAF-DB: the box is recorded (mapped to the stored pixels), the stored image is
    the very one a frame build stores (no re-crop around the face), so FaceMix sees varying IoUs."""
    from ssfer_dist import synth

    root = tmp_path / "raf"
    synth.write_rafdb(str(root), 1, 0, seed=4, image_size=64, face_frac=(0.5, 0.8))
    truth = {r["name"]: tuple(float(r[k]) for k in ("x1", "y1", "x2", "y2"))
             for r in csv.DictReader(open(root / "synth_boxes.csv"))}
    build("rafdb", root, tmp_path / "plain", image_size=32, split="train")
    plain = read_tar_samples(tmp_path / "plain")
    rep = build("rafdb", root, tmp_path / "boxed", image_size=32, split="train", boxes=str(root / "synth_boxes.csv"))
    assert rep["num_samples"] == 7 and rep["box_sources"] == {"annotation": 7}
    boxed = read_tar_samples(tmp_path / "boxed")
    ious = []
    for key, smp in boxed.items():
        assert smp["jpg"] == plain[key]["jpg"]                      # the aligned frame, not a crop
        meta = SampleMeta.from_json(smp["json"])
        want = tuple(v * 32 / 64 for v in truth[key.split("/")[1]])
        assert meta.box_source == "annotation" and meta.box == pytest.approx(want, abs=1e-3)
        assert SampleMeta.from_json(plain[key]["json"]).box == (0.0, 0.0, 32.0, 32.0)
        w, h = meta.box[2] - meta.box[0], meta.box[3] - meta.box[1]
        ious.append(w * h / 32 ** 2)                                 # IoU with the full frame
    assert max(ious) < 0.7 and min(ious) > 0.15                      # faces of 50-80 % of the side
    write(tmp_path / "bad.csv", b"name,x1\nfoo,1\n")
    with pytest.raises(UserError, match=r"--boxes .*bad.csv: expected columns"):
        build("rafdb", root, tmp_path / "x", boxes=str(tmp_path / "bad.csv"))


def test_rafdb_aligned_detector_boxes_and_counted_fallback(tmp_path):
    """``--detector`` on an aligned set: the detector's box is recorded and the frame kept; where it finds no
    face the image is kept with the centred fallback box (even with --no-face skip) and counted."""
    from skimage import data

    root = tmp_path / "raf"
    astro = Image.fromarray(data.astronaut()).resize((256, 256))
    buf = io.BytesIO()
    astro.save(buf, "JPEG", quality=95)
    write(root / "Image" / "aligned" / "train_00001_aligned.jpg", buf.getvalue())
    write(root / "Image" / "aligned" / "train_00002_aligned.jpg", img_bytes(256, 256, seed=3))   # noise: no face
    write(root / "EmoLabel" / "list_patition_label.txt", b"train_00001.jpg 4\ntrain_00002.jpg 7\n")
    plain = build("rafdb", root, tmp_path / "plain", image_size=64, split="train")
    rep = build("rafdb", root, tmp_path / "det", image_size=64, split="train", detector="haar")
    assert rep["num_samples"] == plain["num_samples"] == 2 and rep["skipped_by_reason"] == {}
    assert rep["box_sources"] == {"fallback": 1, "haar": 1} and rep["fallback_boxes"] == 1
    a, b = read_tar_samples(tmp_path / "det"), read_tar_samples(tmp_path / "plain")
    for key in a:
        assert a[key]["jpg"] == b[key]["jpg"]                        # frame kept
    face = SampleMeta.from_json(a["rafdb/train_00001"]["json"])
    x1, y1, x2, y2 = face.box
    assert face.box_source == "haar" and (x2 - x1) < 40 and 20 < (x1 + x2) / 2 < 40   # the astronaut's face
    fb = SampleMeta.from_json(a["rafdb/train_00002"]["json"])
    assert fb.box_source == "fallback" and fb.box != (0.0, 0.0, 64.0, 64.0)


def test_affectnet_7_and_8(tmp_path):
    root = make_affectnet(tmp_path / "an")
    rep7 = build("affectnet", root, tmp_path / "a7", num_classes=7)
    assert rep7["num_samples"] == 7 and rep7["skipped_by_reason"] == {"dropped_class": 4}
    rep8 = build("affectnet", root, tmp_path / "a8", num_classes=8, split="test")
    assert rep8["num_samples"] == 8 and rep8["class_hist"] == [1] * 8
    s = read_tar_samples(tmp_path / "a8")
    meta = SampleMeta.from_json(s["affectnet/test1/test_007"]["json"])
    assert meta.cls == 7 and meta.label_orig == 7 and meta.box_source == "annotation"
    # box (20,10)-(120,120) in 160x140: side min(137.5, 140) -> x0 1.25, y0 0 -> box mapped into 112 px
    assert meta.box[1] == pytest.approx(10 * 112 / 137.5, abs=1e-2)
    assert SampleMeta.from_json(s["affectnet/test0/test_002"]["json"]).cls == 3  # AffectNet Sad -> sadness
    with open(os.path.join(root, "Manually_Annotated_file_lists", "training.csv"), "w") as f:
        f.write("path,x,y\nfoo,1,2\n")
    with pytest.raises(UserError, match=r"training.csv:1: CSV header lacks column"):
        build("affectnet", root, tmp_path / "x")


def test_ferplus_majority_and_plain_fer2013(tmp_path):
    votes = [
        [8, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # neutral
        [0, 5, 5, 0, 0, 0, 0, 0, 0, 0],  # no majority -> dropped
        [0, 0, 0, 0, 0, 0, 0, 6, 1, 0],  # contempt
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 9],  # NF -> dropped
        None,                             # dropped by FERPlus
        [1, 1, 1, 1, 1, 1, 2, 1, 1, 0],  # fear: only the 2-vote column survives
        [0, 7, 3, 0, 0, 0, 0, 0, 0, 0],  # happiness (PublicTest)
        [0, 0, 0, 10, 0, 0, 0, 0, 0, 0],  # sadness (PrivateTest)
    ]
    root = make_fer(tmp_path / "fp", votes=votes)
    rep = build("ferplus", root, tmp_path / "o", split="train")
    assert rep["dataset"] == "ferplus"
    assert rep["skipped_by_reason"] == {"dropped_by_ferplus": 1, "no_majority": 1, "not_a_face": 1}
    s = read_tar_samples(tmp_path / "o")
    got = {k: int(v["cls"]) for k, v in s.items()}
    assert got == {"ferplus/fer0000000": 0, "ferplus/fer0000002": 7, "ferplus/fer0000005": 6}
    assert read_manifest(str(tmp_path / "o")).num_classes == 8
    assert build("ferplus", root, tmp_path / "t", split="test")["num_samples"] == 1
    os.unlink(os.path.join(root, "fer2013new.csv"))
    rep2 = build("ferplus", os.path.join(root, "fer2013.csv"), tmp_path / "p", split="all")
    s2 = read_tar_samples(tmp_path / "p")
    # FER2013 emotion 3 (Happy) -> canonical 1; 0 (Angry) -> anger 4
    assert int(s2["fer2013/00003"]["cls"]) == 1 and int(s2["fer2013/00000"]["cls"]) == 4
    assert rep2["num_samples"] == 8 and read_manifest(str(tmp_path / "p")).num_classes == 7
    im = Image.open(io.BytesIO(s2["fer2013/00000"]["jpg"]))
    assert im.size == (112, 112) and im.mode == "RGB"


def test_cli_structural_error_keeps_existing_output(tmp_path):
    root = make_rafdb(tmp_path / "raf")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"format: rafdb\ninput: {root}\nimage-size: 64\nsamples_per_shard: 2\n")
    ok = subprocess.run([sys.executable, "-m", "sharding", "build", "--spec", str(spec), "--output", str(out),
                         "--image-size", "48"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "img/s" in ok.stderr  # the tqdm progress bar
    assert read_manifest(str(out)).image_size == 48 and len(read_manifest(str(out)).shards) == 3
    before = {p: (out / p).read_bytes() for p in os.listdir(out) if (out / p).is_file()}
    with open(os.path.join(root, "EmoLabel", "list_patition_label.txt"), "a") as f:
        f.write("only_one_field\n")
    bad = subprocess.run([sys.executable, "-m", "sharding", "build", "--format", "rafdb", "--input", root,
                          "--output", str(out), "--no-progress"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    err = [line for line in bad.stderr.splitlines() if "error" in line]
    assert len(err) == 1 and "list_patition_label.txt:10:" in err[0], bad.stderr
    assert {p: (out / p).read_bytes() for p in os.listdir(out) if (out / p).is_file()} == before
    spec.write_text("format: rafdb\nimage_size: big\n")
    bad = subprocess.run([sys.executable, "-m", "sharding", "build", "--spec", str(spec)], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and "spec.yaml: image_size: expected int, got 'big'" in bad.stderr
    spec.write_text("format: rafdb\nimage_sise: 64\n")
    bad = subprocess.run([sys.executable, "-m", "sharding", "build", "--spec", str(spec)], capture_output=True,
                         text=True, env=env)
    want = "spec.yaml: image_sise: unknown key (did you mean 'image_size'?) (expected one of: "
    assert bad.returncode == 2 and want in bad.stderr


def test_all_samples_bad_is_an_error_with_a_report(tmp_path):
    write(tmp_path / "in" / "a" / "x.jpg", b"garbage")
    write(tmp_path / "in" / "a" / "y.jpg", b"")
    with pytest.raises(UserError, match=r"every sample was skipped .*report.json"):
        build("image-folder", tmp_path / "in", tmp_path / "out")
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["skipped_by_reason"] == {"empty_file": 1, "not_an_image": 1}
    assert not (tmp_path / "out" / "manifest.parquet").exists()
