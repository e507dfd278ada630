"""Pseudo-label confidence thresholds behind one interface.

Every policy is called on the teacher's class probabilities for an unlabeled batch and returns
``(mask float[M], pseudo long[M])``. Policies whose statistics span ranks take ``all_reduce``: a callable
that sums a tensor over all ranks *in place* and returns it (e.g. ``lambda t: (dist.all_reduce(t), t)[1]``);
``None`` means a single process. This module never imports torch.distributed.

State lives on the device of the probabilities the policy is called with (moved there on the first call)
and no policy reads a device value to the host: a training step with any policy costs no host sync.
``state_dict`` returns CPU copies (it runs at checkpoints).

- :class:`FixedThreshold`    max p >= tau (SSFER: 0.7).
- :class:`DTMThreshold`      per-class tau_c, start 0.8; each round p_c = mean max-prob of correctly
                             predicted labeled samples of class c; tau_c <- 0.9 tau_c + 0.1 p_c if p_c >= 0.8
                             else 0.8 (also 0.8 when class c had no correct sample). Uses 2 weak views.
- :class:`FreeMatchThreshold` tau_t = m tau + (1-m) mean(max p); p~_t = m p~ + (1-m) mean(p); mask
                             max p >= tau_t * p~[y^] / max(p~); tau_0 = 1/C, p~_0 = 1/C, m = 0.999.
- :class:`FlexMatchThreshold` per-sample selected labels (indexed by a stable sample id) -> class
                             learning effect sigma_c; mask max p >= tau * sigma_c / (2 - sigma_c);
                             exchanged with a max-reduce (one label a rank gave per sample).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class ThresholdPolicy:
    """Interface. ``num_views``: weak views the teacher's probabilities should be averaged over.
    ``needs_labeled``: the policy wants :meth:`observe_labeled` with teacher probabilities on labeled data."""

    name = "base"
    num_views = 1
    needs_labeled = False

    _state: Tuple[str, ...] = ()      # tensor attributes that follow the policy to its device

    def __init__(self, num_classes: int, all_reduce: Optional[AllReduce] = None):
        self.num_classes = int(num_classes)
        self.all_reduce: AllReduce = all_reduce or _identity
        self.device = torch.device("cpu")

    def _on(self, device: torch.device) -> None:
        """Move the policy's state tensors to ``device`` (once; a no-op afterwards)."""
        if device == self.device:
            return
        for name in self._state:
            setattr(self, name, getattr(self, name).to(device))
        self.device = device

    def __call__(self, probs: torch.Tensor, step: int = 0, sample_ids: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def observe_labeled(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Teacher probabilities [N, C] on labeled samples with their labels (DTM's statistics)."""

    def end_round(self) -> None:
        """Close a round (evaluation interval): DTM updates its per-class thresholds here."""

    def class_thresholds(self) -> torch.Tensor:
        """The current per-class threshold [C] (for logging)."""
        raise NotImplementedError

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass


class FixedThreshold(ThresholdPolicy):
    name = "fixed"

    def __init__(self, num_classes: int, tau: float = 0.7, all_reduce: Optional[AllReduce] = None):
        super().__init__(num_classes, all_reduce)
        self.tau = float(tau)

    @torch.no_grad()
    def __call__(self, probs, step=0, sample_ids=None):
        self._on(probs.device)
        maxp, pseudo = probs.float().max(dim=-1)
        return (maxp >= self.tau).float(), pseudo

    def class_thresholds(self):
        return torch.full((self.num_classes,), self.tau, device=self.device)

    def state_dict(self):
        return {"tau": self.tau}

    def load_state_dict(self, state):
        self.tau = float(state["tau"])


class DTMThreshold(ThresholdPolicy):
    name = "dtm"
    num_views = 2
    needs_labeled = True
    _state = ("tau", "_sum", "_count")

    def __init__(self, num_classes: int, tau0: float = 0.8, momentum: float = 0.9, floor: Optional[float] = None,
                 all_reduce: Optional[AllReduce] = None):
        """``floor`` (the reset value and the bar p_c must reach) defaults to ``tau0``, as in DTM."""
        super().__init__(num_classes, all_reduce)
        self.tau0, self.momentum = float(tau0), float(momentum)
        self.floor = self.tau0 if floor is None else float(floor)
        self.tau = torch.full((num_classes,), self.tau0, dtype=torch.float64)
        self._sum = torch.zeros(num_classes, dtype=torch.float64)   # sum of max prob, correct samples, per class
        self._count = torch.zeros(num_classes, dtype=torch.float64)

    @torch.no_grad()
    def __call__(self, probs, step=0, sample_ids=None):
        self._on(probs.device)
        maxp, pseudo = probs.float().max(dim=-1)
        return (maxp >= self.tau.float()[pseudo]).float(), pseudo

    @torch.no_grad()
    def observe_labeled(self, probs, labels):
        self._on(probs.device)
        maxp, pred = probs.float().max(dim=-1)
        cls = labels.to(pred.device).long()
        ok = (pred == cls).double()                  # wrong predictions add 0: no boolean indexing, no sync
        self._sum.index_add_(0, cls, maxp.double() * ok)
        self._count.index_add_(0, cls, ok)

    @torch.no_grad()
    def end_round(self):
        stats = self.all_reduce(torch.stack([self._sum, self._count]))
        s, n = stats[0], stats[1]
        pbar = torch.where(n > 0, s / n.clamp(min=1), torch.zeros_like(s))
        upd = self.momentum * self.tau + (1 - self.momentum) * pbar
        self.tau = torch.where((n > 0) & (pbar >= self.floor), upd, torch.full_like(upd, self.floor))
        self._sum.zero_()
        self._count.zero_()

    def class_thresholds(self):
        return self.tau.float().clone()

    def state_dict(self):
        return {"tau": self.tau.cpu().clone(), "sum": self._sum.cpu().clone(), "count": self._count.cpu().clone()}

    def load_state_dict(self, state):
        self.tau = state["tau"].to(self.device, torch.float64).clone()
        self._sum = state["sum"].to(self.device, torch.float64).clone()
        self._count = state["count"].to(self.device, torch.float64).clone()


class FreeMatchThreshold(ThresholdPolicy):
    name = "freematch"
    _state = ("p_model", "time_p")

    def __init__(self, num_classes: int, momentum: float = 0.999, all_reduce: Optional[AllReduce] = None):
        super().__init__(num_classes, all_reduce)
        self.m = float(momentum)
        self.p_model = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
        self.time_p = torch.tensor(1.0 / num_classes, dtype=torch.float64)

    @torch.no_grad()
    def __call__(self, probs, step=0, sample_ids=None):
        self._on(probs.device)
        probs = probs.float()
        maxp, pseudo = probs.max(dim=-1)
        # one collective: [sum max p, sum p (C), count]
        stats = torch.cat([maxp.sum().view(1), probs.sum(dim=0),
                           torch.full((1,), probs.shape[0], dtype=probs.dtype, device=probs.device)])
        stats = self.all_reduce(stats).double()
        n = stats[-1].clamp(min=1)
        self.time_p = self.m * self.time_p + (1 - self.m) * stats[0] / n
        self.p_model = self.m * self.p_model + (1 - self.m) * stats[1:-1] / n
        thr = self.class_thresholds()
        return (maxp >= thr[pseudo]).float(), pseudo

    def class_thresholds(self):
        return (self.time_p * self.p_model / self.p_model.max()).float()

    def state_dict(self):
        return {"p_model": self.p_model.cpu().clone(), "time_p": self.time_p.cpu().clone()}

    def load_state_dict(self, state):
        self.p_model = state["p_model"].to(self.device, torch.float64).clone()
        self.time_p = state["time_p"].to(self.device, torch.float64).clone()


class FlexMatchThreshold(ThresholdPolicy):
    """FlexMatch (convex mapping, threshold warm-up). Needs ``sample_ids`` in [0, num_samples) — a stable
    index such as the manifest row. Cross-rank updates are exchanged as one dense int32 [num_samples] vector
    of the labels selected this step (-1: none) through ``all_reduce_max``, a callable taking the element-wise
    maximum over ranks in place. When one sample id is selected on two ranks (or twice on one) with different
    pseudo-labels, the larger label wins: always a label some rank gave, never a blend (an average of labels
    1 and 4 would record class 3, which nobody predicted)."""

    name = "flexmatch"
    _state = ("selected", "acc")

    def __init__(self, num_classes: int, num_samples: int, tau: float = 0.95, warmup: bool = True,
                 all_reduce: Optional[AllReduce] = None, all_reduce_max: Optional[AllReduce] = None):
        super().__init__(num_classes, all_reduce)
        self.all_reduce_max: AllReduce = all_reduce_max or _identity
        self.tau, self.warmup, self.num_samples = float(tau), bool(warmup), int(num_samples)
        self.selected = torch.full((self.num_samples,), -1, dtype=torch.long)
        self.acc = torch.zeros(num_classes, dtype=torch.float64)

    def _update_acc(self) -> None:
        # counts of (unused, class 0, ..., class C-1) by scatter-add (bincount sizes its output on the host)
        counts = torch.zeros(self.num_classes + 1, dtype=torch.float64, device=self.selected.device)
        counts.index_add_(0, self.selected + 1, torch.ones_like(self.selected, dtype=torch.float64))
        denom = counts.max() if self.warmup else counts[1:].max()
        self.acc = torch.where(counts.max() < self.num_samples, counts[1:] / denom.clamp(min=1), self.acc)

    @torch.no_grad()
    def __call__(self, probs, step=0, sample_ids=None):
        if sample_ids is None:
            raise ValueError("FlexMatchThreshold needs sample_ids (a stable per-sample index)")
        self._on(probs.device)
        maxp, pseudo = probs.float().max(dim=-1)
        acc = self.acc.float()[pseudo]
        mask = (maxp >= self.tau * acc / (2.0 - acc)).float()
        ids = sample_ids.to(probs.device).long()
        # this step's selected label per sample id (-1: none); duplicates within the batch: the max, deterministic
        lab = torch.where(maxp >= self.tau, pseudo, torch.full_like(pseudo, -1)).to(torch.int32)
        upd = torch.full((self.num_samples,), -1, dtype=torch.int32, device=probs.device)
        upd.scatter_reduce_(0, ids, lab, reduce="amax", include_self=True)
        upd = self.all_reduce_max(upd)
        self.selected = torch.where(upd >= 0, upd.long(), self.selected)
        self._update_acc()
        return mask, pseudo

    def class_thresholds(self):
        return (self.tau * self.acc / (2.0 - self.acc)).float()

    def state_dict(self):
        return {"selected": self.selected.cpu().clone(), "acc": self.acc.cpu().clone()}

    def load_state_dict(self, state):
        self.selected = state["selected"].to(self.device).long().clone()
        self.acc = state["acc"].to(self.device, torch.float64).clone()


def build_threshold(kind: str, num_classes: int, all_reduce: Optional[AllReduce] = None, **kw) -> ThresholdPolicy:
    """``kind``: fixed (tau) | dtm (tau0, momentum, floor) | freematch (momentum) |
    flexmatch (num_samples, tau, warmup, all_reduce_max)."""
    table = {"fixed": FixedThreshold, "dtm": DTMThreshold, "freematch": FreeMatchThreshold,
             "flexmatch": FlexMatchThreshold}
    if kind not in table:
        raise ValueError(f"threshold kind must be one of {sorted(table)}, got {kind!r}")
    return table[kind](num_classes, all_reduce=all_reduce, **kw)
