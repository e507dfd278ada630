"""EMA teacher and threshold policies on worked examples; simulated 2-rank reductions (threads, no process group)."""
from __future__ import annotations

import contextlib
import copy
import threading

import pytest
import torch
import torch.nn as nn

from ssfer_dist.ssl import (DTMThreshold, EMATeacher, FixedThreshold, FlexMatchThreshold, FreeMatchThreshold,
                            build_threshold, ema_decay)


class SimAllReduce:
    """Sum-all-reduce (or ``op="max"``) between ``world`` threads (one call per rank per collective), like
    dist.all_reduce."""

    def __init__(self, world: int, op: str = "sum"):
        self.world, self.op = world, op
        self.barrier = threading.Barrier(world)
        self.slots = [None] * world

    def for_rank(self, rank: int):
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            if self.op == "max":
                total = torch.stack(self.slots).amax(dim=0)
            else:
                total = sum(self.slots[1:], self.slots[0].clone())
            self.barrier.wait()
            t.copy_(total)
            return t
        return all_reduce


def _run_ranks(world, fn):
    errors = []

    def wrap(r):
        try:
            fn(r)
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)
    threads = [threading.Thread(target=wrap, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


# ---------------------------------------------------------------- fixed
def test_fixed_threshold():
    p = torch.tensor([[0.7, 0.3], [0.69, 0.31], [0.2, 0.8]])
    mask, pseudo = FixedThreshold(2, tau=0.7)(p)
    assert mask.tolist() == [1.0, 0.0, 1.0] and pseudo.tolist() == [0, 0, 1]


# ---------------------------------------------------------------- DTM
def test_dtm_worked_example():
    pol = DTMThreshold(3)
    assert pol.class_thresholds().tolist() == pytest.approx([0.8] * 3)
    # class 0: correct with max p 0.9 and 0.95 -> pbar 0.925 -> 0.9*0.8 + 0.1*0.925 = 0.8125
    # class 1: correct with max p 0.7 -> below 0.8 -> reset to 0.8
    # class 2: only a wrong prediction -> no correct samples -> 0.8
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.95, 0.03, 0.02], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    labels = torch.tensor([0, 0, 1, 2])
    pol.observe_labeled(probs, labels)
    pol.end_round()
    torch.testing.assert_close(pol.class_thresholds(), torch.tensor([0.8125, 0.8, 0.8]))
    # second round: class 0 pbar 0.85 -> 0.9*0.8125 + 0.1*0.85 = 0.81625
    pol.observe_labeled(torch.tensor([[0.85, 0.1, 0.05]]), torch.tensor([0]))
    pol.end_round()
    torch.testing.assert_close(pol.class_thresholds(), torch.tensor([0.81625, 0.8, 0.8]))
    # accumulators were reset: an empty round resets every class to 0.8
    mask, pseudo = pol(torch.tensor([[0.81, 0.1, 0.09], [0.09, 0.81, 0.1], [0.1, 0.1, 0.8]]))
    assert mask.tolist() == [0.0, 1.0, 1.0] and pseudo.tolist() == [0, 1, 2]
    st = pol.state_dict()
    pol.end_round()
    torch.testing.assert_close(pol.class_thresholds(), torch.tensor([0.8, 0.8, 0.8]))
    pol2 = DTMThreshold(3)
    pol2.load_state_dict(st)
    torch.testing.assert_close(pol2.class_thresholds(), torch.tensor([0.81625, 0.8, 0.8]))


def test_dtm_two_ranks_equal_one():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(16, 4, generator=g), -1)
    labels = torch.randint(0, 4, (16,), generator=g)
    labels[:8] = probs[:8].argmax(-1)  # plenty of correct ones
    one = DTMThreshold(4, tau0=0.5, floor=0.5)
    one.observe_labeled(probs, labels)
    one.end_round()
    comm, res = SimAllReduce(2), {}

    def rank(r):
        pol = DTMThreshold(4, tau0=0.5, floor=0.5, all_reduce=comm.for_rank(r))
        pol.observe_labeled(probs[r::2], labels[r::2])
        pol.end_round()
        res[r] = pol.class_thresholds()
    _run_ranks(2, rank)
    torch.testing.assert_close(res[0], one.class_thresholds())
    torch.testing.assert_close(res[1], one.class_thresholds())


# ---------------------------------------------------------------- FreeMatch
def test_freematch_worked_example():
    pol = FreeMatchThreshold(2, momentum=0.5)
    assert pol.class_thresholds().tolist() == pytest.approx([0.5, 0.5])  # tau_0 = 1/C, p~ uniform
    p = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    mask, pseudo = pol(p)
    # tau = .5*.5 + .5*mean(.9,.6,.7) = 0.616667; p~ = .5*[.5,.5] + .5*[.6,.4] = [.55,.45]
    # thr = tau * p~ / max p~ = [0.616667, 0.504545]
    torch.testing.assert_close(pol.class_thresholds(), torch.tensor([0.6166667, 0.6166667 * 0.45 / 0.55]))
    assert mask.tolist() == [1.0, 0.0, 1.0] and pseudo.tolist() == [0, 0, 1]
    st = pol.state_dict()
    pol2 = FreeMatchThreshold(2, momentum=0.5)
    pol2.load_state_dict(st)
    assert torch.equal(pol2(p)[0], pol(p)[0])


def test_freematch_two_ranks_equal_one_rank_on_concatenated_batch():
    g = torch.Generator().manual_seed(0)
    steps = [torch.softmax(4 * torch.randn(12, 5, generator=g), -1) for _ in range(6)]
    one = FreeMatchThreshold(5, momentum=0.7)
    one_masks = [one(p)[0] for p in steps]
    comm, res = SimAllReduce(2), {}

    def rank(r):
        pol = FreeMatchThreshold(5, momentum=0.7, all_reduce=comm.for_rank(r))
        res[r] = ([pol(p[r * 6:(r + 1) * 6])[0] for p in steps], pol.class_thresholds())
    _run_ranks(2, rank)
    for s in range(6):
        assert torch.equal(torch.cat([res[0][0][s], res[1][0][s]]), one_masks[s])
    torch.testing.assert_close(res[0][1], one.class_thresholds())
    torch.testing.assert_close(res[1][1], one.class_thresholds())
    assert 0 < torch.cat(one_masks).mean() < 1  # the example exercises both outcomes


# ---------------------------------------------------------------- FlexMatch
def test_flexmatch_worked_example():
    pol = FlexMatchThreshold(2, num_samples=4, tau=0.9)
    p = torch.tensor([[0.95, 0.05], [0.6, 0.4]])
    mask, _ = pol(p, sample_ids=torch.tensor([0, 1]))
    assert mask.tolist() == [1.0, 1.0]  # sigma = 0 during warm-up: threshold 0
    # selected = [0, -1, -1, -1]: counts unused 3, class0 1 -> sigma = [1/3, 0]
    torch.testing.assert_close(pol.acc, torch.tensor([1 / 3, 0.0], dtype=torch.float64))
    thr0 = 0.9 * (1 / 3) / (2 - 1 / 3)
    mask, _ = pol(torch.tensor([[thr0 - 0.01, 1 - thr0 + 0.01], [0.1, 0.9]]), sample_ids=torch.tensor([2, 3]))
    assert mask.tolist() == [1.0, 1.0]  # class-1 sigma 0 -> 0; the first is class 1 (0.82)
    mask, _ = pol(torch.tensor([[0.2, 0.8]]), sample_ids=torch.tensor([2]))
    # after the previous step sample 3 -> class 1 (0.9 >= 0.9): sigma = [1/2, 1/2] (unused 2)
    torch.testing.assert_close(pol.acc, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert mask.tolist() == [1.0]  # 0.8 >= 0.9 * .5 / 1.5 = 0.3
    with pytest.raises(ValueError):
        pol(p)


def test_flexmatch_two_ranks_disagreeing_on_a_sample_record_a_label_one_of_them_gave():
    """Sample 2 is on both ranks in one step: rank 0 selects class 1, rank 1 class 4. The exchange must record
    1 or 4 on both ranks (a MAX reduce: 4) — never their average (the old (label+1) mean recorded 3)."""
    comm, res = SimAllReduce(2, op="max"), {}
    conf = 0.97
    # rank 0: ids [0, 2] -> classes [0, 1]; rank 1: ids [2, 3] -> classes [4, 2] (all above tau)
    plan = {0: ([0, 2], [0, 1]), 1: ([2, 3], [4, 2])}

    def onehot(classes):
        p = torch.full((len(classes), 5), (1 - conf) / 4)
        p[torch.arange(len(classes)), torch.tensor(classes)] = conf
        return p

    def rank(r):
        ids, classes = plan[r]
        pol = FlexMatchThreshold(5, num_samples=5, tau=0.95, all_reduce_max=comm.for_rank(r))
        pol(onehot(classes), sample_ids=torch.tensor(ids))
        res[r] = (pol.selected.clone(), pol.acc.clone())
    _run_ranks(2, rank)
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
    assert res[0][0].tolist() == [0, -1, 4, 2, -1]
    assert res[0][0][2].item() in (1, 4) and res[0][0][2].item() != 3
    # sigma with warm-up: counts (unused 2, class0 1, class2 1, class4 1) / 2
    torch.testing.assert_close(res[0][1], torch.tensor([0.5, 0.0, 0.5, 0.0, 0.5], dtype=torch.float64))
    # below tau on one rank: nothing selected there, the other rank's label stands; earlier labels persist
    comm2, res2 = SimAllReduce(2, op="max"), {}

    def rank2(r):
        pol = FlexMatchThreshold(5, num_samples=5, tau=0.95, all_reduce_max=comm2.for_rank(r))
        pol.load_state_dict({"selected": res[r][0], "acc": res[r][1]})
        p = onehot([3]) if r == 0 else torch.full((1, 5), 0.2)       # rank 1: uniform, not selected
        pol(p, sample_ids=torch.tensor([1 if r == 0 else 0]))
        res2[r] = pol.selected.clone()
    _run_ranks(2, rank2)
    assert res2[0].tolist() == res2[1].tolist() == [0, 3, 4, 2, -1]


def test_flexmatch_duplicate_id_in_one_batch_is_deterministic():
    pol = FlexMatchThreshold(5, num_samples=3, tau=0.5)
    p = torch.tensor([[0.9, 0.025, 0.025, 0.025, 0.025], [0.025, 0.025, 0.025, 0.9, 0.025]])
    pol(p, sample_ids=torch.tensor([1, 1]))
    assert pol.selected.tolist() == [-1, 3, -1]


def test_build_threshold_kinds():
    assert isinstance(build_threshold("fixed", 7, tau=0.7), FixedThreshold)
    assert build_threshold("dtm", 7).num_views == 2
    with pytest.raises(ValueError):
        build_threshold("magic", 7)


# ---------------------------------------------------------------- EMA
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)


def test_ema_update_rule_and_gather_ctx():
    torch.manual_seed(0)
    student = _Net()
    ema = EMATeacher(student, decay=0.9, chunk_size=1)
    assert all(not p.requires_grad for p in ema.module.parameters())
    t0 = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student.norm.running_mean.fill_(3.0)
    gathered = []

    @contextlib.contextmanager
    def gather(params):
        gathered.append(len(params))
        yield

    d = ema.update(student, step=5, gather_ctx=gather)
    assert d == 0.9
    assert sum(gathered) == len(list(student.parameters())) and max(gathered) == 1
    for k, p in student.named_parameters():
        torch.testing.assert_close(ema.module.state_dict()[k], 0.9 * t0[k] + 0.1 * p.detach())
    assert torch.equal(ema.module.norm.running_mean, torch.full((2,), 3.0))
    # state round trip
    st = ema.state_dict()
    other = EMATeacher(_Net(), decay=0.5)
    other.load_state_dict(st)
    assert other.decay == 0.9 and other.num_updates == 1
    assert torch.equal(other.module.lin.weight, ema.module.lin.weight)


def test_ema_decay_schedule_is_pure():
    assert ema_decay(0, 0.999) == 0.999
    assert ema_decay(0, 0.999, warmup_steps=100) == pytest.approx(0.1)
    assert ema_decay(90, 0.999, warmup_steps=100) == pytest.approx(91 / 100)
    assert ema_decay(100, 0.999, warmup_steps=100) == 0.999
    assert [ema_decay(s, 0.99, 50) for s in range(60)] == [ema_decay(s, 0.99, 50) for s in range(60)]


def test_ema_with_sharded_student_params():
    """ZeRO-3-like student: parameters are empty outside the caller's gather context."""
    torch.manual_seed(1)
    full = _Net()
    ema_ref = EMATeacher(full, decay=0.8)
    ema = EMATeacher(full, decay=0.8, chunk_size=2)
    with torch.no_grad():
        for p in full.parameters():
            p.mul_(-2.0)
    ema_ref.update(full, 0)
    sharded = copy.deepcopy(full)
    values = {p: p.data.clone() for p in sharded.parameters()}
    for p in sharded.parameters():
        p.data = torch.empty(0)
    live = []

    @contextlib.contextmanager
    def gather(params):
        for p in params:
            p.data = values[p]
        live.append(len(params))
        try:
            yield
        finally:
            for p in params:
                p.data = torch.empty(0)

    ema.update(sharded, 0, gather_ctx=gather)
    assert max(live) == 2 and all(p.numel() == 0 for p in sharded.parameters())
    for k, v in ema_ref.module.state_dict().items():
        torch.testing.assert_close(ema.module.state_dict()[k], v)
    with pytest.raises(RuntimeError):  # without the context the empty shards cannot be averaged
        EMATeacher(full, decay=0.8).update(sharded, 0)
