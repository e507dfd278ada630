"""The body of one optimizer step, and the device-side metrics it feeds — free of host syncs.

:func:`train_step` runs ``grad_accum`` micro-batches (task forward → ``engine.backward`` → ``engine.step``)
and the task's ``after_step``; the task's metrics (detached 0-d device tensors) are summed into
:class:`DeviceMetrics` on the device. Nothing here reads a device value to the host: the loop calls
:meth:`DeviceMetrics.read` once per log step — one collective and one host read for all metrics
(nanoGPT's / torchtitan's single sync point). The loader's corrupt-sample counters are CPU integers and
its sample keys host strings: reading them costs no device sync.
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

__all__ = ["prepare_batch", "DeviceMetrics", "train_step"]


def prepare_batch(batch: Dict[str, Any], device: torch.device, non_blocking: bool = True) -> Dict[str, Any]:
    """Drop loader bookkeeping (``__*`` keys), move tensors to the device. Images stay as shipped (uint8 or
    float): the tasks normalise on device and cast to the engine dtype themselves. From pinned memory the
    copies are asynchronous."""
    out = {}
    for k, v in batch.items():
        if k.startswith("__"):
            continue
        out[k] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
    return out


class DeviceMetrics:
    """Per-key sums and counts of the tasks' metrics over a logging window, kept on ``device`` as one
    [2, K] tensor (row 0: sum of the defined values, row 1: how many were defined; NaN = undefined).

    Keys are registered in the order tasks return them (the same on every rank). Host numbers a task
    may return (python floats) are summed on the host. :meth:`read` sums everything over ranks with
    ``all_reduce`` (one collective), reads it to the host once and starts a new window.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.keys: List[str] = []
        self._acc: Optional[torch.Tensor] = None
        self._host: Dict[str, List[float]] = {}

    def add(self, out: Dict[str, Any]) -> None:
        vals: Dict[str, torch.Tensor] = {}
        for k, v in out.items():
            if isinstance(v, torch.Tensor):
                if v.numel():
                    vals[k] = v.detach().float().mean()
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                s = self._host.setdefault(k, [0.0, 0.0])
                s[0] += float(v)
                s[1] += 1.0
        if not vals:
            return
        new = [k for k in vals if k not in self.keys]
        if new:
            self.keys += new
            pad = torch.zeros(2, len(new), device=self.device)
            self._acc = pad if self._acc is None else torch.cat([self._acc, pad], dim=1)
        nan = None
        row = []
        for k in self.keys:
            v = vals.get(k)
            if v is None:
                nan = torch.full((), float("nan"), device=self.device) if nan is None else nan
                v = nan
            row.append(v.to(self.device))
        x = torch.stack(row)                                       # [K]
        ok = ~torch.isnan(x)
        self._acc += torch.stack([torch.where(ok, x, torch.zeros_like(x)), ok.float()])

    def read(self, all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, float]:
        """Means over the window (and over ranks through ``all_reduce``, a sum); keys never defined are left
        out. The one host read of the window. Every rank must call it (it is a collective)."""
        host_keys = sorted(self._host)
        parts = []
        if self._acc is not None:
            parts.append(self._acc)
        if host_keys:
            h = torch.tensor([[self._host[k][0] for k in host_keys], [self._host[k][1] for k in host_keys]],
                             dtype=torch.float32)
            parts.append(h.to(self.device))
        if not parts:
            return {}
        total = torch.cat(parts, dim=1)
        if all_reduce is not None:
            total = all_reduce(total)
        sums, counts = total.tolist()
        out = {k: s / c for k, s, c in zip(self.keys + host_keys, sums, counts) if c > 0}
        if self._acc is not None:
            self._acc.zero_()
        self._host = {}
        return out


def train_step(task, engine, batches: Iterator[Dict[str, Any]], grad_accum: int, step: int,
               device: torch.device, metrics: DeviceMetrics, corrupt_by_lane: Dict[int, int],
               gather_ctx=None, keys_digest: int = 0, non_blocking: bool = True,
               device_aug: Optional[Callable] = None, beat: Optional[Callable[[str], None]] = None
               ) -> Tuple[int, Dict[str, Any]]:
    """One optimizer step: ``grad_accum`` × (next batch → task → backward → engine step), then
    ``task.after_step``. Updates ``metrics`` (device) and ``corrupt_by_lane`` (host ints from the loader).
    ``device_aug(batch, index, device)``: the stage's on-device augmentation; ``beat(what)``: the stall
    watchdog's heartbeat. Returns (the crc32 digest of the step's sample keys, the last device batch)."""
    batch: Dict[str, Any] = {}
    for _ in range(grad_accum):
        if beat is not None:
            beat(f"step {step + 1}: waiting for a batch")
        raw = next(batches)
        if beat is not None:
            beat(f"step {step + 1}: forward/backward (collectives)")
        if "__corrupt__" in raw:
            lane, count = (int(x) for x in raw["__corrupt__"].tolist())   # a CPU tensor from the loader
            corrupt_by_lane[lane] = count
        keys_digest = zlib.crc32("|".join(raw.get("__key__", [])).encode(), keys_digest)
        batch = prepare_batch(raw, device, non_blocking)
        key = "__index__"                                                 # the loader's CPU batch index
        if "__global__" in raw:      # data.order shards: randomness keyed by the global micro-batch, not the rank
            key = "__global__"
            hook = getattr(task, "set_micro_batch", None)
            if hook is not None:
                hook(int(raw[key]))
        if device_aug is not None:
            batch = device_aug(batch, int(raw[key]), device)
        out = task(batch, step)
        engine.backward(out["loss"])
        engine.step()
        metrics.add(out)
    task.after_step(step, gather_ctx)
    return keys_digest, batch
