"""``data.order: shards`` — the data position as a shard-level coordinate (resume in O(1) data work).

The order is a pure function of ``(seed, virtual slots V, micro-batch size b)``; it does not depend on the
number of ranks, loader lanes or restarts:

- **Epochs of shards.** Epoch ``e`` permutes the source's shards (``Random(seed, e)``); virtual slot ``v``
  (0 ≤ v < V) reads the shards at positions ``v, v+V, v+2V, …`` of that permutation, each shard's samples in
  a permutation of their own (``Random(seed, e, slot position)``). A slot's *stream* is its epoch-0 shards,
  then its epoch-1 shards, and so on: within a slot every sample of an epoch comes once before any sample
  of the next. (With fewer shards than slots the shard list is repeated until every slot has one.)
- **Global micro-batches.** Micro-batch ``m`` (counted over all ranks: ``m = k·R + r`` for rank ``r``'s
  ``k``-th micro-batch of ``R`` ranks) is positions ``[j·b, (j+1)·b)`` of slot ``m mod V``, ``j = m div V``.
  An optimizer step of ``R`` ranks × ``grad_accum`` micro-batches covers micro-batches
  ``[step·R·ga, (step+1)·R·ga)``: the same set for any split of the same global batch over ranks.
- **Resume.** The position of micro-batch ``m`` is arithmetic on the manifest's per-shard sample counts
  (no I/O): a resumed lane opens the one shard that holds its next position and skips inside it in memory.

Mixtures (several sources, ``weight``): each micro-batch takes a fixed number of samples from each source
(``b × weight / Σ weights`` rounded by largest remainder), so source ``i``'s slot positions are ``j × n_i``.

Reading a whole shard (instead of a cross-shard shuffle buffer) relies on the shards being shuffled when
they were built (``sharding/build.py`` shuffles every dataset before cutting it into shards).
"""
from __future__ import annotations

import bisect
import random
import zlib
from typing import Dict, List, Sequence, Tuple

__all__ = ["SlotOrder", "mixture_counts", "slot_of", "seed_of"]


def seed_of(*parts) -> int:
    """A stable 63-bit seed of ``parts`` (``pipeline.stream_seed`` is this with five parts)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) * 2654435761 % (2 ** 63)


def slot_of(m: int, num_slots: int) -> Tuple[int, int]:
    """Global micro-batch ``m`` → (virtual slot, that slot's micro-batch index)."""
    return m % num_slots, m // num_slots


def mixture_counts(batch_size: int, weights: Sequence[float]) -> List[int]:
    """Samples per micro-batch from each source: ``batch_size × w / Σw`` by largest remainder (sums to
    ``batch_size``; ties to the earlier source)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"mixture weights must sum to > 0, got {list(weights)}")
    exact = [batch_size * w / total for w in weights]
    counts = [int(x) for x in exact]
    rest = batch_size - sum(counts)
    for i in sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))[:rest]:
        counts[i] += 1
    return counts


class SlotOrder:
    """The shard order of one source: which shard and which sample of it sits at position ``p`` of slot
    ``v``'s stream. ``counts``: samples per shard (from the manifest)."""

    def __init__(self, urls: Sequence[str], counts: Sequence[int], num_slots: int, seed: int, tag: str = "") -> None:
        if len(urls) != len(counts) or not urls:
            raise ValueError(f"{len(urls)} shard URLs but {len(counts)} sample counts")
        self.urls = tuple(urls)
        self.counts = tuple(int(c) for c in counts)
        self.num_slots = int(num_slots)
        if self.num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.seed, self.tag = seed, tag
        self.repeat = -(-self.num_slots // len(self.urls))         # every slot gets at least one shard
        self._epochs: Dict[Tuple[int, int], Tuple[List[int], List[int]]] = {}
        self._ends: Dict[int, List[int]] = {}                       # slot → cumulative end of each epoch
        self._orders: Dict[int, Tuple[Tuple[int, int], List[int]]] = {}   # slot → its current shard's order

    def epoch_shards(self, epoch: int, slot: int) -> Tuple[List[int], List[int]]:
        """(shard indices, cumulative sample ends) of ``slot`` in ``epoch``."""
        key = (epoch, slot)
        got = self._epochs.get(key)
        if got is None:
            order = list(range(len(self.urls))) * self.repeat
            random.Random(seed_of(self.seed, self.tag, "epoch", epoch)).shuffle(order)
            shards = order[slot::self.num_slots]
            ends, t = [], 0
            for s in shards:
                t += self.counts[s]
                ends.append(t)
            got = (shards, ends)
            if len(self._epochs) > 64:
                self._epochs.clear()
            self._epochs[key] = got
        return got

    def locate(self, slot: int, position: int) -> Tuple[int, int, int]:
        """Position ``position`` of ``slot``'s stream → (epoch, index in the slot's epoch list, offset in the
        shard's permuted samples). Arithmetic only."""
        ends = self._ends.setdefault(slot, [])
        while not ends or ends[-1] <= position:
            n = self.epoch_shards(len(ends), slot)[1]
            total = n[-1] if n else 0
            if total == 0:
                raise ValueError(f"slot {slot} has no samples (shards with 0 samples?)")
            ends.append((ends[-1] if ends else 0) + total)
        epoch = bisect.bisect_right(ends, position)
        local = position - (ends[epoch - 1] if epoch else 0)
        shard_ends = self.epoch_shards(epoch, slot)[1]
        i = bisect.bisect_right(shard_ends, local)
        return epoch, i, local - (shard_ends[i - 1] if i else 0)

    def shard_at(self, epoch: int, slot: int, index: int) -> int:
        return self.epoch_shards(epoch, slot)[0][index]

    def sample_order(self, epoch: int, slot: int, index: int) -> List[int]:
        """The permuted sample order (positions in the tar) of the ``index``-th shard of ``slot`` in ``epoch``."""
        got = self._orders.get(slot)
        if got is not None and got[0] == (epoch, index):
            return got[1]
        shard = self.shard_at(epoch, slot, index)
        order = list(range(self.counts[shard]))
        random.Random(seed_of(self.seed, self.tag, "samples", epoch, slot, index)).shuffle(order)
        self._orders[slot] = ((epoch, index), order)
        return order

    def positions(self, slot: int, start: int, n: int) -> List[Tuple[int, int, int, int]]:
        """Positions ``[start, start+n)`` of ``slot`` → ``(epoch, index, shard, sample in tar order)`` each."""
        out = []
        p = start
        while p < start + n:
            epoch, i, off = self.locate(slot, p)
            shard = self.shard_at(epoch, slot, i)
            order = self.sample_order(epoch, slot, i)
            take = min(start + n - p, len(order) - off)
            out.extend((epoch, i, shard, order[off + t]) for t in range(take))
            p += take
        return out
