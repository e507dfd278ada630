"""Manifest API (contract 2): round trip, determinism, bad manifests."""
import pytest

from ssfer_dist.shards.manifest import ShardInfo, manifest_bytes, read_manifest, write_manifest
from ssfer_dist.errors import UserError


def _shards():
    return [ShardInfo(name=f"x-{i:06d}.tar", url=f"/old/x-{i:06d}.tar", num_samples=2, num_bytes=100 + i,
                      sha256="ab" * 32, class_hist=[1, 1, 0, 0, 0, 0, 0], keys=[f"x/{i}a", f"x/{i}b"], classes=[0, 1])
            for i in (1, 0)]


def test_roundtrip(tmp_path):
    write_manifest(str(tmp_path), _shards(), dataset="x", image_size=112, num_classes=7)
    m = read_manifest(str(tmp_path / "manifest.parquet"))
    assert m.url == str(tmp_path)
    assert [s.name for s in m.shards] == ["x-000000.tar", "x-000001.tar"]
    assert m.shard_urls() == [str(tmp_path / "x-000000.tar"), str(tmp_path / "x-000001.tar")]
    assert m.num_samples == 4 and m.num_classes == 7 and m.image_size == 112 and m.dataset == "x"
    assert m.class_names[:2] == ["neutral", "happiness"]
    idx = m.index()
    assert idx.column_names == ["key", "shard", "cls"]
    assert idx.column("key").to_pylist() == ["x/0a", "x/0b", "x/1a", "x/1b"]
    assert idx.column("cls").to_pylist() == [0, 1, 0, 1]
    assert m.class_hist()[:2] == [2, 2]
    light = read_manifest(str(tmp_path), with_index=False)
    assert light.num_samples == 4 and light.index().num_rows == 0


def test_deterministic_bytes():
    meta = {"dataset": "x", "image_size": 1}
    assert manifest_bytes(_shards(), meta) == manifest_bytes(list(reversed(_shards())), meta)


def test_missing_and_invalid(tmp_path):
    with pytest.raises(UserError, match="manifest.parquet"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="not a valid shard manifest"):
        read_manifest(str(tmp_path))


def test_tar_writer_matches_tarfile_and_meta_json_matches_schema():
    import io
    import tarfile

    from sharding.writer import TAR_USER, SampleTarWriter, meta_json
    from ssfer_dist.shards.schema import SampleMeta

    samples = [{"__key__": "ds/a/b", "jpg": b"x" * 1000, "json": b"{}", "cls": b"3"},
               {"__key__": "d/" + "y" * 120 + "/z", "jpg": b"q" * 512}]
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w|", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            for ext in sorted(k for k in s if k != "__key__"):
                ti = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(s[ext]), 0, 0o444, TAR_USER, TAR_USER
                tf.addfile(ti, io.BytesIO(s[ext]))
    ours = io.BytesIO()
    w = SampleTarWriter(ours)
    for s in samples:
        w.write(s)
    w.close()
    assert ours.getvalue() == ref.getvalue()
    for label_orig in (None, 3, 2.5, [0, 9, 1]):
        for identity in (None, "n000001", 'we"ird\u00e9'):
            kw = dict(source="ferplus", source_id="fer/0000001", box=(0.1234567, 0, 48, 47.99999), orig_size=(48, 48),
                      box_source="frame", identity=identity, label_orig=label_orig, cls=1)
            assert meta_json(**kw) == SampleMeta(**kw).to_json()


def test_make_keys_equals_make_key_one_by_one():
    from ssfer_dist.shards.schema import make_key, make_keys

    plain = ["id1/0001.jpg", "id 2/a.b.png", "x/y/z.jpeg", "top.jpg", "n000002/0001_01.jpg", "é/ü.jpg", "noext"]
    odd = plain + ["a\\b.jpg", "/lead.jpg", "nl\nname.jpg"]
    for ids in (plain, odd, []):
        assert make_keys("my data", ids) == [make_key("my data", s) for s in ids]
