"""Evaluation while training (``ssfer_dist/train/evaluation.py``): the distributed confusion equals
``ssfer evaluate``'s on the same weights; 2 gloo ranks (comm guard on) evaluate disjoint slices, sum their
confusions through the collectives helper and run the same number of forwards even when their slices differ
in size (a ZeRO-3 student gathers its parameters in every forward)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket

import numpy as np
import pytest
import torch

from ssfer_dist.evaluate import evaluate_shards
from tests.test_export import make_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shards_and_weights(tmp_path_factory):
    from sharding.build import BuildConfig, run_build
    from ssfer_dist import synth

    root = tmp_path_factory.mktemp("traineval")
    synth.write_rafdb(str(root / "raf"), 1, 5, seed=3, image_size=48)     # 35 test samples: 18 / 17 on 2 ranks
    out = str(root / "shards")
    run_build(BuildConfig(format="rafdb", input=str(root / "raf"), output=out, split="test", image_size=32,
                          samples_per_shard=16, progress=False))
    w = root / "model.safetensors"
    make_weights(w, seed=5)
    return out, str(w)


def _evaluator(shards, rank=0, world=1, batch=17):
    from ssfer_dist.shards.manifest import read_manifest
    from ssfer_dist.train.evaluation import TrainingEval

    man = read_manifest(shards, with_index=False)
    return TrainingEval(man.shard_urls(), man.class_names, 32, batch, rank, world, torch.device("cpu"),
                        64 * 1024 * 1024)


def _model(weights):
    from ssfer_dist.models.io import classifier_from_weights

    m, _ = classifier_from_weights(weights)
    return m.eval()


def test_single_process_equals_ssfer_evaluate(shards_and_weights):
    shards, w = shards_and_weights
    want = evaluate_shards(w, shards, batch_size=8)
    got = _evaluator(shards).metrics(_model(w))
    assert want["num_samples"] == 35
    assert got["confusion"] == want["confusion"]
    for k in ("accuracy", "mean_class_accuracy", "macro_f1"):
        assert got[k] == pytest.approx(want[k])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, shards, weights, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from ssfer_test_hooks import install_guard

    dist.init_process_group("gloo", rank=rank, world_size=world)
    install_guard()
    model = _model(weights)
    calls = {"forwards": 0}

    def forward(x):
        calls["forwards"] += 1
        return model(x)
    ev = _evaluator(shards, rank, world, batch=17)
    m = ev.metrics(forward)
    local = [(x.shape[0], y.tolist()) for x, y in ev._batches({})]    # this rank's slice, no collective
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"confusion": m["confusion"], "forwards": calls["forwards"], "local_batches": len(local),
                   "local_samples": sum(n for n, _ in local)}, f)
    dist.destroy_process_group()


def test_two_gloo_ranks_sum_disjoint_slices(shards_and_weights, tmp_path):
    shards, w = shards_and_weights
    world, port = 2, _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, shards, w, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0], "a rank failed (see its traceback above)"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world))
    want = evaluate_shards(w, shards, batch_size=8)["confusion"]
    assert r0["confusion"] == r1["confusion"] == want
    assert np.sum(want) == 35
    # 18 samples -> 2 batches of <= 17 on rank 0, 17 -> 1 batch on rank 1, which forwards one dummy batch
    assert (r0["local_batches"], r1["local_batches"]) == (2, 1)
    assert r0["forwards"] == r1["forwards"] == 2
    assert (r0["local_samples"], r1["local_samples"]) == (18, 17)     # disjoint slices covering the set


def test_eval_config_and_preflight_errors(tmp_path):
    from ssfer_dist.config import ConfigError, load_config
    from ssfer_dist.launchers import preflight
    from ssfer_dist.errors import UserError
    from ssfer_dist.stages import load_stage_config
    from ssfer_dist.train.debugdata import write_debug_shards

    cfgs = os.path.join(ROOT, "configs")
    with pytest.raises(ConfigError, match=r"eval\.shards: the mae stage trains no classifier"):
        load_stage_config(os.path.join(cfgs, "debug_cpu_pretrain.yaml"), ["eval.shards=x"])
    with pytest.raises(ConfigError, match=r"eval\.every_steps: expected >= 0"):
        load_config(os.path.join(cfgs, "debug_cpu_finetune.yaml"), ["eval.every_steps=-1"])
    with pytest.raises(ConfigError, match=r"eval\.best_metric"):
        load_config(os.path.join(cfgs, "debug_cpu_finetune.yaml"), ["eval.best_metric=loss"])
    sh = write_debug_shards(str(tmp_path / "d"), num_fr=16, num_fer=28, num_test=14)
    base = [f"data.shards={sh['labeled']}", "init.weights=null", f"run.storage={tmp_path / 'runs'}"]

    def plan(*extra):
        return preflight(load_config(os.path.join(cfgs, "debug_cpu_finetune.yaml"), base + list(extra)),
                         check_storage=False)
    with pytest.raises(UserError, match=r"eval\.shards: .* is unlabeled"):
        plan(f"eval.shards={sh['fr']}")
    with pytest.raises(UserError, match=r"eval\.shards: "):
        plan(f"eval.shards={tmp_path / 'nothing'}")
    p = plan(f"eval.shards={sh['test']}")
    assert p.eval_num_samples == 14 and p.eval_urls and all("fer_test" in u for u in p.eval_urls)
    assert plan().eval_urls == ()
