"""The torchrun launcher: the same loop without Ray (``ssfer run --launcher torchrun`` →
``torchrun -m ssfer_dist.launchers.torchrun``), 2 gloo ranks, real DeepSpeed on CPU.

A run that fails half-way is rerun with the same name: it resumes from the newest committed checkpoint,
redoes exactly the batches the failed attempt saw, keeps ``checkpoint.num_to_keep`` checkpoints and exports.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from faultinject import fault_env

from ssfer_dist import storage
from ssfer_dist.train import checkpoint as ck
from ssfer_dist.train.debugdata import write_debug_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "configs", "debug_cpu_pretrain.yaml")


def _metrics(run_dir, name="metrics.jsonl"):
    with open(os.path.join(run_dir, name)) as f:
        return [json.loads(x) for x in f if x.strip()]


def _ssfer(args, timeout=600, fault=None):
    env = dict(os.environ, **(fault or {}))
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "ssfer_dist.cli"] + args, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_ranks_fail_then_resume_with_identical_batches(tmp_path):
    shards = write_debug_shards(str(tmp_path / "shards"))
    marker = tmp_path / "fault.marker"
    runs = tmp_path / "runs"
    args = ["run", PRETRAIN, "--launcher", "torchrun"]
    for o in [f"data.shards={shards['fr']}", f"run.storage={runs}", "run.name=tr", "train.zero_stage=2",
              "train.max_steps=16", "train.log_every=1", "checkpoint.every_steps=4", "checkpoint.num_to_keep=2",
              "train.preview_every=0"]:
        args += ["--set", o]
    first = _ssfer(args, fault=fault_env(10, 1, "error", marker))
    assert first.returncode == 1, first.stderr[-3000:]
    assert marker.exists()
    assert "injected fault at step 10 on rank 1" in first.stderr, first.stderr[-3000:]
    run_dir = runs / "tr"
    assert not (run_dir / "export").exists()
    assert ck.latest_complete(str(run_dir)) == str(run_dir / "checkpoint_00000008")

    second = _ssfer(args)                                        # same name: resumes from checkpoint 8
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["launcher"] == "torchrun" and result["final"]["step"] == 16
    assert "resumed at step 8" in second.stderr + second.stdout or \
        "resumed at step 8" in (run_dir / "logs" / "ssfer.log").read_text()
    rec = _metrics(run_dir)
    assert [r["step"] for r in rec] == list(range(1, 17))
    redone = {r["step"]: r for r in _metrics(run_dir, "metrics_redone.jsonl")}
    assert sorted(redone) == [9, 10]
    by_step = {r["step"]: r for r in rec}
    for s, r in redone.items():
        assert by_step[s]["batch_digest"] == r["batch_digest"], s
    assert rec[-1]["loss"] < rec[0]["loss"]
    # torchrun's retention: the newest num_to_keep=2 committed checkpoints, nothing partial
    names = sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint_"))
    assert names == ["checkpoint_00000012", "checkpoint_00000016"], names
    assert all((run_dir / n / ck.COMMIT_FILE).exists() for n in names)
    state = json.loads((run_dir / "checkpoint_00000016" / "train_state.json").read_text())
    assert state["step"] == 16 and state["micro_batch"] == 16
    assert (run_dir / "export" / "model.safetensors").exists()


def test_outside_torchrun_the_entry_point_says_how_to_start_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    p = subprocess.run([sys.executable, "-m", "ssfer_dist.launchers.torchrun", PRETRAIN, "--set",
                        f"run.storage={tmp_path}"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert "not started by torchrun" in line and "--launcher torchrun" in line, line


def test_prune_keeps_the_newest_committed(tmp_path):
    run = str(tmp_path / "run")
    for step in (4, 8, 12):
        d = storage.join(run, ck.checkpoint_dir_name(step))
        storage.put_bytes(storage.join(d, "train_state.json"), b"{}")
        storage.put_bytes(storage.join(d, ck.COMMIT_FILE), json.dumps({"step": step}).encode())
    storage.put_bytes(storage.join(run, ck.checkpoint_dir_name(16), "train_state.json"), b"{}")   # uncommitted
    assert ck.prune_committed(run, 2) == ["checkpoint_00000004"]
    assert sorted(os.listdir(run)) == ["checkpoint_00000008", "checkpoint_00000012", "checkpoint_00000016"]
    assert ck.latest_complete(run).endswith("checkpoint_00000012")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_torchrun_run_resumes_under_ray(tmp_path):
    """The run folder is the launchers' common ground: a run that failed under torchrun is finished by Ray
    Train from the same committed checkpoint, on the same batches."""
    shards = write_debug_shards(str(tmp_path / "shards"))
    marker = tmp_path / "fault.marker"
    runs = tmp_path / "runs"
    sets = [f"data.shards={shards['fr']}", f"run.storage={runs}", "run.name=cross", "train.zero_stage=2",
            "train.max_steps=12", "train.log_every=1", "checkpoint.every_steps=4", "train.preview_every=0",
            "failure.max_failures=0"]
    args = ["run", PRETRAIN]
    for o in sets:
        args += ["--set", o]
    first = _ssfer(args + ["--launcher", "torchrun"], fault=fault_env(6, 0, "error", marker))
    assert first.returncode == 1 and marker.exists(), first.stderr[-3000:]
    second = _ssfer(args)                                         # the default launcher: a local Ray
    assert second.returncode == 0, second.stderr[-3000:]
    run_dir = runs / "cross"
    assert "resumed at step 4" in (run_dir / "logs" / "worker-0.log").read_text()
    rec = _metrics(run_dir)
    assert [r["step"] for r in rec] == list(range(1, 13))
    redone = {r["step"]: r for r in _metrics(run_dir, "metrics_redone.jsonl")}
    assert sorted(redone) == [5, 6]
    by_step = {r["step"]: r for r in rec}
    for s, r in redone.items():
        assert by_step[s]["batch_digest"] == r["batch_digest"], s
    assert (run_dir / "export" / "model.safetensors").exists()


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_elastic_resume_2_to_1_and_1_to_2_ranks_matches_an_uninterrupted_run(tmp_path):
    """``data.order=shards``: a run cut at step 10 on 2 ranks resumes on 1 rank (``grad_accum`` 2: the same global
    batch) through DeepSpeed's universal checkpoint, and one cut at step 6 on 1 rank resumes on 2. Every step's
    loss and the final weights equal an uninterrupted 2-rank run's (tolerance 1e-5 relative; on this CPU they
    are bit-identical): the same samples, masks and crops per step, the same optimizer state."""
    shards = write_debug_shards(str(tmp_path / "shards"))
    runs = tmp_path / "runs"
    common = [f"data.shards={shards['fr']}", f"run.storage={runs}", "train.zero_stage=2", "train.max_steps=12",
              "train.log_every=1", "checkpoint.every_steps=4", "train.preview_every=0", "data.order=shards",
              "data.virtual_slots=4"]
    one_rank = ["scaling.num_workers=1", "train.grad_accum=2"]

    def run(name, extra=(), fail_at=None):
        args = ["run", PRETRAIN, "--launcher", "torchrun"]
        sets = common + [f"run.name={name}"] + list(extra)
        for o in sets:
            args += ["--set", o]
        return _ssfer(args, fault=fault_env(fail_at, 0, "error", f"{tmp_path / name}.m") if fail_at else None)

    assert run("ref").returncode == 0
    assert run("down", fail_at=10).returncode == 1                 # 2 ranks, checkpoint 8
    down = run("down", one_rank)
    assert down.returncode == 0, down.stderr[-3000:]
    assert run("up", one_rank, fail_at=6).returncode == 1          # 1 rank, checkpoint 4
    up = run("up")
    assert up.returncode == 0, up.stderr[-3000:]
    ref = {r["step"]: r["loss"] for r in _metrics(runs / "ref")}
    w_ref = _weights(runs / "ref" / "export" / "model.safetensors")
    for name, at in (("down", 8), ("up", 4)):
        log = (runs / name / "logs" / "ssfer.log").read_text()
        assert f"resumed at step {at}" in log and "DeepSpeed universal checkpoint" in log, log[-2000:]
        rec = _metrics(runs / name)
        assert [r["step"] for r in rec] == list(range(1, 13))
        for r in rec:
            assert abs(r["loss"] - ref[r["step"]]) <= 1e-5 * abs(ref[r["step"]]), (name, r["step"])
        w = _weights(runs / name / "export" / "model.safetensors")
        assert w.keys() == w_ref.keys()
        for k in w_ref:
            scale = float(w_ref[k].abs().max()) or 1.0
            assert float((w[k] - w_ref[k]).abs().max()) <= 1e-5 * scale, (name, k)
    state = json.loads((runs / "up" / "checkpoint_00000012" / "train_state.json").read_text())
    assert state["data_order"] == "shards" and state["virtual_slots"] == 4 and state["num_ranks"] == 2
