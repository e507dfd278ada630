"""``data.order: shards``: the data position is a shard-level coordinate. Every sample once per epoch and
slot, resume reads one shard per lane, and the samples of a step do not depend on how the global batch is
split over ranks (elastic resume)."""
from __future__ import annotations

import collections

import pytest
import torch

from ssfer_dist.data import pipeline as pl
from ssfer_dist.shards.manifest import read_manifest
from ssfer_dist.data.order import SlotOrder, mixture_counts
from ssfer_dist.data.pipeline import ShardStream, Source, StreamSpec, View, make_loader
from ssfer_dist.train.debugdata import face_images, write_shard_folder

MAE_VIEWS = (View("image", "mae"),)


def test_every_sample_of_an_epoch_once_per_slot_and_all_shards_once_per_epoch():
    counts = [5, 7, 3, 6, 4, 5, 8, 2]
    urls = [f"s{i}" for i in range(len(counts))]
    o = SlotOrder(urls, counts, num_slots=3, seed=1)
    for epoch in range(3):
        seen = collections.Counter()
        for slot in range(3):
            shards, ends = o.epoch_shards(epoch, slot)
            seen.update(shards)
            start = sum(o.epoch_shards(e, slot)[1][-1] for e in range(epoch))
            got = o.positions(slot, start, ends[-1])
            assert all(e == epoch for e, *_ in got)
            assert sorted((s, t) for _, _, s, t in got) == sorted((s, t) for s in shards for t in range(counts[s]))
        assert seen == collections.Counter(range(len(counts)))            # each shard once per epoch
    assert o.epoch_shards(0, 0)[0] != o.epoch_shards(1, 0)[0] or o.epoch_shards(0, 1)[0] != o.epoch_shards(1, 1)[0]
    # fewer shards than slots: the list repeats, no slot is empty
    few = SlotOrder(["a", "b"], [3, 4], num_slots=5, seed=0)
    assert all(few.epoch_shards(0, v)[0] for v in range(5))
    assert few.locate(4, 10 ** 6)[0] > 0                                 # far positions: arithmetic only


def test_mixture_counts_are_exact_and_sum_to_the_batch():
    assert mixture_counts(8, [1.0]) == [8]
    assert mixture_counts(8, [0.5, 0.5]) == [4, 4]
    assert mixture_counts(10, [2, 1]) == [7, 3]
    assert sum(mixture_counts(7, [0.2, 0.3, 0.5])) == 7
    with pytest.raises(ValueError):
        mixture_counts(4, [0.0])


@pytest.fixture(scope="module")
def fr(tmp_path_factory):
    root = tmp_path_factory.mktemp("ordered")
    url = write_shard_folder(str(root / "fr"), face_images(120, 24), [-1] * 120, dataset="fr", num_classes=0,
                             samples_per_shard=10)
    m = read_manifest(url)
    return tuple(m.shard_urls()), tuple(int(s.num_samples) for s in m.shards)


def _stream(fr, *, rank=0, world=2, lanes=1, start=0, bs=4, slots=4):
    urls, counts = fr
    spec = StreamSpec((Source(urls, counts=counts),), MAE_VIEWS, bs, False)
    return ShardStream([spec], img_size=24, rank=rank, world_size=world, batches_per_epoch=15, seed=5,
                       start_batch=start, num_lanes=lanes, order="shards", virtual_slots=slots)


def _keys(stream, n):
    it = iter(make_loader(stream, stream.num_lanes if stream.num_lanes > 1 else 0))
    return [tuple(next(it)["__key__"]) for _ in range(n)]


def test_one_epoch_over_all_ranks_sees_every_sample_once(fr):
    # 12 shards of 10 over 4 slots: 30 samples a slot; batch 5: 6 micro-batches a slot, 24 global = 12 a rank
    assert [SlotOrder(*fr, num_slots=4, seed=5).epoch_shards(0, v)[1][-1] for v in range(4)] == [30] * 4
    keys = [k for r in range(2) for b in _keys(_stream(fr, rank=r, world=2, lanes=2, bs=5), 12) for k in b]
    assert len(keys) == 120 == len(set(keys))


@pytest.mark.parametrize("lanes", [1, 2])
def test_resume_reads_one_shard_per_slot_and_gives_the_same_batches(fr, lanes, monkeypatch):
    ref = _keys(_stream(fr, lanes=lanes), 40)                  # past the first epoch (15 per rank)
    reads = []
    real = pl.ShardStream._shard

    def counting(self, cache, key, url, counter):
        if cache.get(key, (None,))[0] != url:
            reads.append(url)
        return real(self, cache, key, url, counter)

    monkeypatch.setattr(pl.ShardStream, "_shard", counting)
    for start in (6, 33):
        reads.clear()
        got = _keys(_stream(fr, lanes=1, start=start), 1)        # in-process: the reads are counted here
        assert got[0] == ref[start]
        assert len(reads) <= 2, reads                           # one shard (two when the batch straddles)
    assert _keys(_stream(fr, lanes=lanes, start=33), 7) == ref[33:]


def test_the_samples_of_a_step_do_not_depend_on_the_number_of_ranks(fr):
    """Elastic resume: 2 ranks x 2 micro-batches per step and 1 rank x 4 take the same 16 samples per step."""
    two = [_keys(_stream(fr, rank=r, world=2), 8) for r in range(2)]
    one = _keys(_stream(fr, rank=0, world=1), 16)
    for step in range(4):
        a = {k for r in range(2) for b in two[r][2 * step:2 * step + 2] for k in b}
        b = {k for bb in one[4 * step:4 * step + 4] for k in bb}
        assert a == b and len(a) == 16
    # and a run that switches from 2 ranks to 1 after step 2 continues where the other left off
    resumed = _keys(_stream(fr, rank=0, world=1, start=2 * 2 * 2), 8)      # step 2 x ga 4 (1 rank)
    assert resumed == one[8:]


def test_a_corrupt_sample_is_counted_and_replaced_by_a_batch_mate(tmp_path):
    url = write_shard_folder(str(tmp_path / "fr"), face_images(16, 24), [-1] * 16, dataset="fr", num_classes=0,
                             samples_per_shard=8)
    m = read_manifest(url)
    import io
    import tarfile

    for path in m.shard_urls():                     # the first image of every shard is not a JPEG
        with tarfile.open(path) as t:
            members = [(i, t.extractfile(i).read()) for i in t.getmembers()]
        first = next(i.name for i, _ in members if i.name.endswith(".jpg"))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for i, data in members:
                if i.name == first:
                    data = b"not a jpeg"
                i.size = len(data)
                t.addfile(i, io.BytesIO(data))
        with open(path, "wb") as f:
            f.write(buf.getvalue())
    s = _stream((tuple(m.shard_urls()), tuple(int(x.num_samples) for x in m.shards)), world=1, slots=1, bs=8)
    b = next(iter(make_loader(s, 0)))
    assert b["image"].shape[0] == 8 and int(b["__corrupt__"][1]) == 1
    assert len(set(b["__key__"])) == 7


def test_order_shards_needs_the_sample_counts(fr):
    with pytest.raises(ValueError, match="sample count"):
        ShardStream([StreamSpec((Source(fr[0]),), MAE_VIEWS, 4, False)], img_size=24, rank=0, world_size=1,
                    batches_per_epoch=5, seed=0, order="shards")
    assert torch is not None


def test_a_zero3_checkpoint_is_not_resumed_on_another_rank_count(tmp_path):
    """ZeRO-1/2 resume elastically (tests/test_torchrun.py); ZeRO-3 through the universal checkpoint loads the
    weights but not the optimizer state exactly, so it is refused with one line naming what to set."""
    from ssfer_dist.distributed.context import CheckpointRef, WorkerContext
    from ssfer_dist.distributed.faults import PermanentFault
    from ssfer_dist.train import checkpoint as ck
    from ssfer_dist.train.state import TrainState

    folder = tmp_path / "checkpoint_00000008"
    folder.mkdir()
    (folder / ck.COMMIT_FILE).write_text("")
    (folder / ck.STATE_FILE).write_text(TrainState(stage="mae", step=8, num_ranks=2, data_order="shards",
                                                   virtual_slots=4).to_json())

    class OneRank(WorkerContext):
        def latest_checkpoint(self):
            return CheckpointRef(str(folder))

    manager = ck.CheckpointManager(OneRank(), str(tmp_path), every_steps=4, num_to_keep=2, total_steps=12,
                                   zero_stage=3, convert_timeout_s=60)
    with pytest.raises(PermanentFault, match=r"was saved by 2 ranks; resuming a ZeRO-3 run on 1 is not supported "
                                             r"\(ZeRO-1/2 are\): set scaling.num_workers=2$"):
        with manager.resuming():
            pass
