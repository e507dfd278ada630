"""WebDataset pipeline: exact resume, node/worker split, corrupt samples counted, semi-supervised streams, S3."""
from __future__ import annotations

import os

import pytest
import torch

from ssfer_dist.config import Config, SemiSupCfg, ThresholdCfg, TrainCfg
from ssfer_dist.shards.manifest import read_manifest
from ssfer_dist.data.pipeline import ShardStream, Source, StreamSpec, View, make_loader, split_urls
from ssfer_dist.stages import get_stage
from ssfer_dist.stages.base import StageConfigs
from ssfer_dist.train.debugdata import face_images, write_debug_shards, write_shard_folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return write_debug_shards(str(root), num_fr=96, num_fer=64, num_test=14)


MAE_VIEWS = (View("image", "mae"),)


def _stream(urls, *, start=0, lanes=1, rank=0, world=2, bs=8, bpe=5, views=MAE_VIEWS, labeled=False,
            extra=()):
    specs = [StreamSpec((Source(tuple(urls)),), tuple(views), bs, labeled)] + list(extra)
    return ShardStream(specs, img_size=32, rank=rank, world_size=world, batches_per_epoch=bpe, seed=3,
                       shuffle_buffer=32, start_batch=start, num_lanes=lanes)


def _take(stream, lanes, n):
    it = iter(make_loader(stream, lanes if lanes > 1 else 0))
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("lanes", [1, 2])
def test_resume_gives_the_same_batches(shards, lanes):
    urls = read_manifest(shards["fr"]).shard_urls()
    ref = _take(_stream(urls, lanes=lanes), lanes, 13)
    assert [int(b["__index__"]) for b in ref] == list(range(13))
    assert ref[0]["image"].shape == (8, 3, 32, 32) and ref[0]["image"].dtype == torch.uint8
    for start in (3, 7):                                      # mid-epoch and across an epoch boundary
        res = _take(_stream(urls, start=start, lanes=lanes), lanes, 13 - start)
        for a, b in zip(ref[start:], res):
            assert a["__key__"] == b["__key__"]
            assert torch.equal(a["image"], b["image"])
    # a different rank reads different samples
    other = _take(_stream(urls, rank=1, lanes=lanes), lanes, 3)
    assert [b["__key__"] for b in other] != [b["__key__"] for b in ref[:3]]


def test_tool_reader_and_training_reader_see_the_same_samples(shards):
    """shards/tario.py (evaluate, verify, split, inspect) groups tar members as webdataset does (training)."""
    import webdataset as wds

    from ssfer_dist.shards.tario import iter_url_samples

    url = read_manifest(shards["labeled"]).shard_urls()[0]
    ours = [(k, s) for k, s in iter_url_samples(url)]
    theirs = [s for s in wds.tarfile_to_samples()(iter([{"url": url}]))]
    assert len(ours) == len(theirs) > 0
    for (k, s), t in zip(ours, theirs):
        assert k == t["__key__"]
        assert s == {ext: v for ext, v in t.items() if not ext.startswith("__")}


def test_split_by_node_and_worker_is_disjoint():
    urls = [f"s{i}" for i in range(12)]
    parts = [split_urls(urls, r, 2, w, 3) for r in range(2) for w in range(3)]
    assert sorted(sum(parts, [])) == sorted(urls)
    assert all(len(p) == 2 for p in parts)
    assert split_urls(urls[:3], 1, 2, 0, 3) == ["s1"]            # fewer shards than lanes: per rank
    assert split_urls(urls[:1], 1, 2, 0, 3) == ["s0"]            # fewer than ranks: everything


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    imgs = face_images(40, 32)
    folder = write_shard_folder(str(tmp_path / "bad"), imgs, [-1] * 40, dataset="bad", num_classes=0,
                                samples_per_shard=10, corrupt_every=4)
    batches = _take(_stream(read_manifest(folder).shard_urls(), world=1), 1, 10)
    assert all(b["image"].shape[0] == 8 for b in batches)
    assert int(batches[-1]["__corrupt__"][1]) > 0
    assert all("img00003" not in k for b in batches for k in b["__key__"])   # the 4th image is garbage


def test_missing_shard_fails_instead_of_hanging(tmp_path):
    imgs = face_images(20, 32)
    folder = write_shard_folder(str(tmp_path / "m"), imgs, [-1] * 20, dataset="m", num_classes=0, samples_per_shard=10)
    urls = read_manifest(folder).shard_urls()
    os.remove(urls[0])
    with pytest.raises(FileNotFoundError):
        _take(_stream(urls, world=1, rank=0), 1, 5)


def stage_views(stage: str, threshold_kind: str):
    """(labeled views, unlabeled views) the registered stage reads."""
    cfg = Config(train=TrainCfg(stage=stage), semisup=SemiSupCfg(threshold=ThresholdCfg(kind=threshold_kind)))
    return get_stage(stage).views(StageConfigs.of(cfg))


def test_semisupervised_batches(shards):
    lab_views, unl_views = stage_views("semisup", "dtm")
    lab = read_manifest(shards["labeled"]).shard_urls()
    unl = StreamSpec((Source(tuple(read_manifest(shards["unlabeled"]).shard_urls()), 0.7),
                      Source(tuple(read_manifest(shards["fr"]).shard_urls()), 0.3)), unl_views, 8 * 2, False, "u_")
    b = _take(_stream(lab, views=lab_views, labeled=True, extra=[unl]), 1, 2)[1]
    assert b["image"].shape == (8, 3, 32, 32) and b["label"].shape == (8,) and b["box"].shape == (8, 4)
    for k in ("u_weak", "u_strong", "u_weak2"):
        assert b[k].shape == (16, 3, 32, 32), k
    assert b["u_label"].shape == (16,)
    assert int(b["label"].min()) >= 0 and int(b["label"].max()) < 7
    assert (b["box"][:, 2] > b["box"][:, 0]).all()


def test_unlabeled_samples_carry_their_manifest_row_as_id(shards):
    """FlexMatch's per-sample state: with shard offsets every unlabeled sample carries ``u_index`` =
    its row in the manifests' per-sample index, counted over the sources in order."""
    import numpy as np

    lab_views, unl_views = stage_views("semisup", "flexmatch")
    mans = [read_manifest(shards["unlabeled"]), read_manifest(shards["fr"])]
    srcs, first, classes = [], 0, []
    for m, w in zip(mans, (0.7, 0.3)):
        offs = [first + int(x) for x in np.cumsum([0] + [s.num_samples for s in m.shards[:-1]])]
        first += m.num_samples
        srcs.append(Source(tuple(m.shard_urls()), w, tuple(offs)))
        classes += m.index().column("cls").to_pylist()
    unl = StreamSpec(tuple(srcs), unl_views, 16, False, "u_")
    lab = read_manifest(shards["labeled"]).shard_urls()
    batches = _take(_stream(lab, views=lab_views, labeled=True, extra=[unl], world=1), 1, 12)
    ids = torch.cat([b["u_index"] for b in batches])
    labels = torch.cat([b["u_label"] for b in batches])
    assert ids.shape == (12 * 16,) and int(ids.min()) >= 0 and int(ids.max()) < first
    assert [classes[i] for i in ids.tolist()] == labels.tolist()  # the id names the very sample
    assert int((ids < mans[0].num_samples).sum()) > 0 and int((ids >= mans[0].num_samples).sum()) > 0
    assert "u_index" not in _take(_stream(lab, views=lab_views, labeled=True, world=1, extra=[
        StreamSpec((Source(tuple(mans[1].shard_urls())),), unl_views, 16, False, "u_")]), 1, 1)[0]


def test_stream_from_s3(s3_bucket, shards):
    from ssfer_dist import storage

    storage.register_webdataset_s3()
    imgs = face_images(24, 32)
    folder = write_shard_folder(f"{s3_bucket}/fr", imgs, [-1] * 24, dataset="fr", num_classes=0, samples_per_shard=8)
    urls = read_manifest(folder).shard_urls()
    assert all(u.startswith("s3://") for u in urls)
    batches = _take(_stream(urls, world=1), 1, 4)
    assert all(b["image"].shape == (8, 3, 32, 32) for b in batches)
    assert int(batches[-1]["__corrupt__"][1]) == 0
