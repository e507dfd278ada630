"""Collectives go through ``ssfer_dist.distributed.collectives``, on the process group's device.

NCCL rejects CPU tensors, so a collective on a host tensor crashes the first log step of a GPU run; gloo
accepts anything, so CPU runs cannot show it. The test-only guard (``tests/hooks/ssfer_test_hooks.py``, on in
every process the tests start) makes any collective issued by ``ssfer_dist`` code outside the helper raise,
and checks each tensor the helper hands over is on the communication device. Here it runs
in 2 real gloo processes through every stage's task and every threshold policy, the loop's step body and
its log-step reductions.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket

import pytest
import torch

from ssfer_dist.distributed import collectives

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_comm_device_follows_the_backend(monkeypatch):
    assert collectives.comm_device("gloo") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.comm_device("nccl") == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert collectives.comm_device("cpu:gloo,cuda:nccl") == torch.device("cuda", 3)


def test_single_process_is_the_identity():
    t = torch.tensor([1.0, 2.0])
    assert collectives.all_reduce_sum(t) is t and collectives.sum_ints([3, 4]) == [3, 4]
    assert collectives.all_reduce_max(t) is t
    collectives.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from ssfer_dist.train.step import DeviceMetrics, train_step
    from ssfer_test_hooks import CommGuardError, install_guard
    from stepkit import CASES, TorchEngine, batches, build, case_id

    dist.init_process_group("gloo", rank=rank, world_size=world)
    install_guard()
    res = {}
    # the guard is live: a collective issued from ssfer_dist code outside the helper raises
    code = compile("torch.distributed.all_reduce(torch.ones(1))", "<ssfer_dist code>", "exec")
    try:
        exec(code, {"__name__": "ssfer_dist.somewhere", "torch": torch})
        res["guard"] = "not raised"
    except CommGuardError as e:
        res["guard"] = str(e)
    # max-reduce (FlexMatch's label exchange): each element is one rank's value, never a blend
    mx = torch.tensor([1, -1, 3] if rank == 0 else [4, 2, -1], dtype=torch.int32)
    res["max"] = collectives.all_reduce_max(mx).tolist()
    for case in CASES:
        task, _m, opt, cfg, _plan = build(case[0], case[1], torch.device("cpu"), num_ranks=world)
        metrics, corrupt, it = DeviceMetrics(torch.device("cpu")), {}, batches(cfg, seed=1, rank=rank)
        logs, local = [], []

        def reduce(t, local=local):
            local.append(t.tolist())           # this rank's [sums, counts] before the reduction
            return collectives.all_reduce_sum(t)
        for step in range(4):
            train_step(task, TorchEngine(opt), it, 1, step, torch.device("cpu"), metrics, corrupt)
            if step % 2 == 1:     # a log step: metrics and corrupt counts reduced over ranks
                logs.append([metrics.read(reduce), collectives.sum_ints([sum(corrupt.values())])])
        th = getattr(task, "threshold", None)
        res[case_id(case)] = {"logs": logs, "thresholds": th.class_thresholds().tolist() if th is not None else None,
                              "keys": metrics.keys}
        res[case_id(case) + "/local"] = local
    collectives.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def test_two_gloo_ranks_every_collective_through_the_helper(tmp_path):
    from stepkit import CASES, case_id

    world, port = 2, _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0], "a rank failed (see its traceback above)"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world))
    assert "not through ssfer_dist.distributed.collectives" in r0["guard"]
    assert r0["max"] == r1["max"] == [4, 2, 3]
    for case in CASES:
        k = case_id(case)
        assert r0[k] == r1[k], k             # reduced metrics and cross-rank threshold state agree on both ranks
        # corrupt counters: each rank's loader reported (lane 0) 1 after 2 batches, 0 after 4 -> summed 2, 0
        assert [c for _rec, (c,) in r0[k]["logs"]] == [2, 0]
        # the reduced loss is the mean over both ranks' (different) local values
        li = r0[k]["keys"].index("loss")
        for w, (rec, _c) in enumerate(r0[k]["logs"]):
            (s0, n0), (s1, n1) = ([x[li] for x in loc[w]] for loc in (r0[k + "/local"], r1[k + "/local"]))
            assert s0 != s1 and rec["loss"] == pytest.approx((s0 + s1) / (n0 + n1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (NCCL)")
def test_nccl_single_rank_host_tensors_are_placed_on_the_device(tmp_path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        assert collectives.comm_device() == torch.device("cuda", 0)
        t = torch.tensor([1.0, 2.0])                      # a host tensor: NCCL alone would reject it
        assert collectives.all_reduce_sum(t).tolist() == [1.0, 2.0] and t.device.type == "cpu"
        assert collectives.sum_ints([5]) == [5]
        collectives.barrier()
    finally:
        dist.destroy_process_group()
