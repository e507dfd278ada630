"""Integration: 2 gloo workers on a local Ray, real DeepSpeed on CPU, real S3 (SeaweedFS).

- debug MAE under ZeRO-2 with storage on S3: loss falls, checkpoints/metrics/export land in the bucket;
- debug MAE under ZeRO-3 with an injected worker failure: Ray restarts the group through FailureConfig,
  the run resumes from the last checkpoint, finishes at the same final step, and the redone steps see
  exactly the batches the failed attempt saw (data position restored);
- the three debug stages chain through their exports (``ssfer pipeline``);
- a bad config / missing shard / unwritable storage fails before any worker starts.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from faultinject import armed

from ssfer_dist import storage
from ssfer_dist.config import load_config
from ssfer_dist.shards.manifest import read_manifest
from ssfer_dist.errors import UserError
from ssfer_dist.train.debugdata import write_debug_shards

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_debug_shards(str(tmp_path_factory.mktemp("dshards")))


def _cfg(name, shards, storage_url, extra=()):
    ov = [f"data.shards={shards['fr']}", f"run.storage={storage_url}", f"run.name={name}"] + list(extra)
    return load_config(os.path.join(CONFIGS, name if name.endswith(".yaml") else "debug_cpu_pretrain.yaml"), ov)


def _metrics(run_url, name="metrics.jsonl"):
    return [json.loads(x) for x in storage.get_bytes(storage.join(run_url, name)).decode().splitlines() if x.strip()]


@pytest.fixture
def launcher_ray(s3_server, monkeypatch):
    """No Ray running: the launcher starts its own (``ensure_ray``: dashboard, runtime env), as ``ssfer run``
    does, so what it sends through Ray is what a user's run sends. Shut down afterwards; later tests that
    need Ray start it again (``ray_local`` users go through ``ensure_ray`` or ``ray.init`` themselves)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield ray
    ray.shutdown()


def test_mae_zero2_on_s3_loss_falls(launcher_ray, shards, s3_bucket):
    from ssfer_dist.launchers.ray import run_stage

    cfg = _cfg("mae-z2", shards, f"{s3_bucket}/runs",
               ["train.zero_stage=2", "train.log_every=5", "run.ray_dashboard=true"])   # its endpoints are searched
    res = run_stage(cfg)
    assert res.run_url == f"{s3_bucket}/runs/mae-z2"
    rec = _metrics(res.run_url)
    assert [r["step"] for r in rec] == [5, 10, 15, 20, 25, 30]
    losses = [r["loss"] for r in rec]
    assert min(losses[-2:]) < losses[0] * 0.9, losses
    assert res.metrics["step"] == 30
    files = storage.list_files(res.run_url)
    assert "export/model.safetensors" in files
    assert any(f.startswith("checkpoint_00000030/ds/") for f in files)
    assert any(f.startswith("previews/step_") and f.endswith(".png") for f in files)
    assert any(f.startswith("tb/events.") for f in files)
    # the export is a loadable MAE whose encoder goes into a classifier
    local = os.path.join(os.path.dirname(shards["fr"]), "mae-z2.safetensors")
    storage.get_file(res.export_path, local)
    from ssfer_dist.models.io import classifier_from_weights, load_weights

    sd, meta = load_weights(local)
    assert meta["kind"] == "mae" and meta["arch"]["size"] == "micro" and "decoder_pred.weight" in sd
    model, _ = classifier_from_weights(local, num_classes=7)
    assert model.head.out_features == 7
    # the workers wrote to S3 with credentials inherited from the driver; the secret is nowhere Ray or the run
    # keeps things (issue 14)
    _assert_secret_nowhere(os.environ["AWS_SECRET_ACCESS_KEY"], s3_bucket)


def test_mae_zero3_survives_a_killed_worker(ray_local, shards, tmp_path):
    from ssfer_dist.launchers.ray import run_stage

    marker = tmp_path / "fault.marker"
    cfg = _cfg("mae-z3", shards, str(tmp_path / "runs"),
               ["train.zero_stage=3", "train.max_steps=24", "train.log_every=1", "checkpoint.every_steps=8",
                "failure.max_failures=1", "train.preview_every=0"])
    with armed(13, 1, "error", marker):
        res = run_stage(cfg)
    assert marker.exists()                                       # the fault fired (once)
    rec = _metrics(res.run_url)
    assert [r["step"] for r in rec] == list(range(1, 25))       # every step exactly once, to the same final step
    assert rec[-1]["data_position"] == 24 and rec[-1]["samples_seen"] == 24 * 32
    redone = {r["step"]: r for r in _metrics(res.run_url, "metrics_redone.jsonl")}
    assert sorted(redone) == [9, 10, 11, 12, 13]                 # logged before the fault, after checkpoint 8
    by_step = {r["step"]: r for r in rec}
    for s, r in redone.items():                                  # resumed run saw the very same batches
        assert by_step[s]["batch_digest"] == r["batch_digest"], s
        assert by_step[s]["data_position"] == r["data_position"] == s
        assert by_step[s]["loss"] == pytest.approx(r["loss"], rel=1e-4, abs=1e-5)
    losses = [r["loss"] for r in rec]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    state = json.load(open(os.path.join(res.run_url, "checkpoint_00000024", "train_state.json")))
    assert state["step"] == 24 and state["micro_batch"] == 24 and state["stage"] == "mae"
    assert os.path.exists(res.export_path)


def test_elastic_resume_on_ray_from_s3_2_workers_to_1(ray_local, shards, s3_bucket):
    """Under Ray with the run on S3 (no shared disk): a 2-worker run (``data.order=shards``) fails at step 10,
    is rerun under the same name with 1 worker and ``grad_accum`` 2, resumes from the S3 checkpoint 8 through
    DeepSpeed's universal checkpoint, and logs the losses of an uninterrupted 2-worker run (1e-5 relative)."""
    from ssfer_dist.launchers.ray import run_stage

    base = ["train.zero_stage=2", "train.max_steps=12", "train.log_every=1", "checkpoint.every_steps=4",
            "failure.max_failures=0", "train.preview_every=0", "data.order=shards", "data.virtual_slots=4"]
    ref = run_stage(_cfg("el-ref", shards, f"{s3_bucket}/runs", base))
    marker = os.path.join(os.path.dirname(shards["fr"]), "el.marker")
    with armed(10, 1, "error", marker), pytest.raises(RuntimeError, match="run el failed"):
        run_stage(_cfg("el", shards, f"{s3_bucket}/runs", base))
    res = run_stage(_cfg("el", shards, f"{s3_bucket}/runs", base + ["scaling.num_workers=1", "train.grad_accum=2"]))
    want = {r["step"]: r["loss"] for r in _metrics(ref.run_url)}
    rec = _metrics(res.run_url)
    assert [r["step"] for r in rec] == list(range(1, 13))
    for r in rec:
        assert r["loss"] == pytest.approx(want[r["step"]], rel=1e-5), r["step"]
    state = json.loads(storage.get_bytes(storage.join(res.run_url, "checkpoint_00000012", "train_state.json")))
    assert state["num_ranks"] == 1 and state["virtual_slots"] == 4


def test_rerun_with_same_name_resumes(ray_local, shards, tmp_path):
    from ssfer_dist.launchers.ray import run_stage

    marker = tmp_path / "fault.marker"
    ov = ["train.zero_stage=2", "train.max_steps=16", "train.log_every=1", "checkpoint.every_steps=8",
          "failure.max_failures=0", "train.preview_every=0"]
    cfg = _cfg("mae-rerun", shards, str(tmp_path / "runs"), ov)
    with armed(10, 0, "error", marker), pytest.raises(RuntimeError, match="run mae-rerun failed"):
        run_stage(cfg)
    assert marker.exists()
    run_dir = tmp_path / "runs" / "mae-rerun"
    assert not (run_dir / "export").exists()
    res = run_stage(cfg)                                          # same name: picks up checkpoint 8
    rec = _metrics(res.run_url)
    assert [r["step"] for r in rec] == list(range(1, 17))
    redone = {r["step"]: r for r in _metrics(res.run_url, "metrics_redone.jsonl")}
    assert sorted(redone) == [9, 10]
    for s, r in redone.items():
        assert {x["step"]: x for x in rec}[s]["batch_digest"] == r["batch_digest"]
    assert os.path.exists(res.export_path)


def test_three_debug_stages_chain_through_exports(ray_local, shards, tmp_path):
    from ssfer_dist.launchers import run_pipeline
    from ssfer_dist.models.io import classifier_from_weights, load_weights

    ov = [f"storage={tmp_path / 'runs'}",
          f"pretrain.data.shards={shards['fr']}", f"finetune.data.shards={shards['labeled']}",
          f"semisup.data.shards={shards['labeled']}",
          f"semisup.data.unlabeled=[{{shards: {shards['unlabeled']}, weight: 0.7}}, "
          f"{{shards: {shards['fr']}, weight: 0.3}}]",
          "*.train.max_steps=10", "*.checkpoint.every_steps=0", "*.train.preview_every=0",
          "semisup.semisup.threshold.kind=flexmatch", "semisup.semisup.threshold.flexmatch_tau=0.15"]
    results = run_pipeline(os.path.join(CONFIGS, "debug_cpu_pipeline.yaml"), ov)
    kinds = [load_weights(r.export_path)[1]["kind"] for r in results]
    assert kinds == ["mae", "classifier", "classifier"]
    # each export records the data it and its init weights saw (debug sets: fr, fer labeled, ferU unlabeled)
    assert [load_weights(r.export_path)[1]["trained_on"] for r in results] == \
        [["fr"], ["fr", "fer"], ["fr", "fer", "ferU"]]
    ft_cfg = json.loads(json.dumps(_metrics(results[1].run_url)[-1]))
    assert ft_cfg["step"] == 10 and "loss_mix" in ft_cfg
    semi = _metrics(results[2].run_url)
    assert semi[-1]["step"] == 10 and "mask_rate" in semi[-1] and "loss_u" in semi[-1]
    # FlexMatch (per-sample ids through the unlabeled stream, state all-reduced across ranks): its class
    # thresholds start at 0 under warm-up and rise once samples are claimed (teacher max-prob >= 0.15)
    assert 0.0 < semi[-1]["tau_mean"] <= 0.15
    model, meta = classifier_from_weights(results[2].export_path)
    assert meta["arch"]["num_classes"] == 7 and len(meta["class_names"]) == 7
    # the stages really started from each other's exports
    import torch

    pre, _ = load_weights(results[0].export_path)
    ft, _ = load_weights(results[1].export_path)
    assert not torch.equal(pre["blocks.0.attn.qkv.weight"], ft["blocks.0.attn.qkv.weight"])
    assert torch.allclose(pre["patch_embed.proj.weight"], ft["patch_embed.proj.weight"], atol=0.05)


def test_linear_probe_on_ray_exports_an_evaluable_classifier(ray_local, shards, tmp_path):
    """The fourth stage through the same loop: frozen encoder, only the probe head trained, the export a
    plain classifier that ``ssfer evaluate`` scores."""
    import torch

    from ssfer_dist.launchers.ray import run_stage
    from ssfer_dist.evaluate import evaluate_shards
    from ssfer_dist.models.io import load_weights, save_weights
    from ssfer_dist.models.mae import build_mae

    torch.manual_seed(0)
    mae = build_mae("micro", 32, 8, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    weights = str(tmp_path / "mae.safetensors")
    save_weights(weights, mae.state_dict(), {"kind": "mae", "arch": dict(size="micro", img_size=32, patch_size=8,
                                                                          num_classes=0, global_pool="token")})
    cfg = load_config(os.path.join(CONFIGS, "debug_cpu_linprobe.yaml"),
                      [f"data.shards={shards['labeled']}", f"run.storage={tmp_path / 'runs'}",
                       f"init.weights={weights}", "train.max_steps=10", "checkpoint.every_steps=5"])
    res = run_stage(cfg)
    rec = _metrics(res.run_url)
    assert [r["step"] for r in rec] == [5, 10] and "acc" in rec[-1]
    sd, meta = load_weights(res.export_path)
    assert meta["kind"] == "classifier" and meta["stage"] == "linear_probe" and "head.weight" in sd
    assert torch.equal(sd["blocks.1.mlp.fc1.weight"], mae.state_dict()["blocks.1.mlp.fc1.weight"])  # frozen
    m = evaluate_shards(res.export_path, shards["test"], batch_size=16)
    assert m["num_samples"] == read_manifest(shards["test"]).num_samples and 0.0 <= m["accuracy"] <= 1.0


def test_bad_inputs_fail_before_any_worker(shards, tmp_path, s3_server, monkeypatch):
    from ssfer_dist.cli import main

    runs = tmp_path / "runs"
    base = ["run", os.path.join(CONFIGS, "debug_cpu_pretrain.yaml"), "--set", f"run.storage={runs}"]
    # bad config value
    assert main(base + ["--set", f"data.shards={shards['fr']}", "--set", "train.zero_stage=5"]) == 2
    # missing manifest
    assert main(base + ["--set", f"data.shards={tmp_path / 'nowhere'}"]) == 2
    # a shard listed in the manifest is gone
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(shards["fr"], broken)
    os.remove(sorted(broken.glob("*.tar"))[1])
    with pytest.raises(UserError, match=r"data.shards: shard .*fr-000001.tar .* is missing"):
        from ssfer_dist.launchers import preflight

        preflight(load_config(os.path.join(CONFIGS, "debug_cpu_pretrain.yaml"), [f"data.shards={broken}"]))
    assert main(base + ["--set", f"data.shards={broken}"]) == 2
    # GPUs asked for on a machine without CUDA (a local run): one error, no worker
    if not torch.cuda.is_available():
        assert main(base + ["--set", f"data.shards={shards['fr']}", "--set", "scaling.use_gpu=true"]) == 2
    # FlexMatch over more unlabeled samples than its dense per-sample state allows
    import ssfer_dist.stages.semisup as semisup_stage

    semi = [f"data.shards={shards['labeled']}", f"data.unlabeled=[{{shards: {shards['fr']}}}]",
            "semisup.threshold.kind=flexmatch", "init.weights=null"]
    plan = preflight(load_config(os.path.join(CONFIGS, "debug_cpu_semisup.yaml"), semi), check_storage=False)
    assert plan.unlabeled[0].offsets[:2] == (0, read_manifest(shards["fr"]).shards[0].num_samples)
    monkeypatch.setattr(semisup_stage, "MAX_FLEXMATCH_SAMPLES", plan.num_unlabeled - 1)
    with pytest.raises(UserError, match=r"semisup.threshold.kind: flexmatch keeps state per unlabeled sample"):
        preflight(load_config(os.path.join(CONFIGS, "debug_cpu_semisup.yaml"), semi), check_storage=False)
    # storage with wrong credentials
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(UserError, match=r"run.storage: s3://ssfer-nope"):
        preflight(load_config(os.path.join(CONFIGS, "debug_cpu_pretrain.yaml"),
                              [f"data.shards={shards['fr']}", "run.storage=s3://ssfer-nope/runs"]))
    assert not runs.exists()                                   # nothing was started or written


# ------------------------------------------------------------------------------------- secrets (issue 14)


def _ray_places(ray) -> dict:
    """Everything the local Ray keeps or serves: each file under its session dir, the state API (actors, jobs,
    workers, tasks, placement groups, with detail) and the dashboard's own actor/job/node endpoints."""
    import urllib.request

    from ray.util import state

    places = {}
    session = ray._private.worker._global_node.get_session_dir_path()
    for root, _, names in os.walk(session):
        for n in names:
            p = os.path.join(root, n)
            if os.path.isfile(p) and not os.path.islink(p):
                try:
                    with open(p, "rb") as f:
                        places[p] = f.read()
                except OSError:
                    pass
    url = ray._private.worker.get_dashboard_url()      # this session's Ray (others may run on the machine)
    for fn in (state.list_actors, state.list_jobs, state.list_workers, state.list_tasks,
               state.list_placement_groups, state.list_nodes):
        got = fn(address=f"http://{url}", detail=True, limit=10000, raise_on_missing_output=False)
        places[f"state.{fn.__name__}"] = repr(got).encode()
    for path in ("/logical/actors", "/api/jobs/", "/nodes?view=summary", "/api/v0/tasks?detail=1"):
        with urllib.request.urlopen(f"http://{url}{path}", timeout=30) as r:
            places[f"dashboard{path}"] = r.read()
    places["gcs.job_table"] = repr(ray._private.state.state.job_table()).encode()
    return places


def _assert_secret_nowhere(secret: str, bucket_url: str) -> None:
    import secrets as _secrets

    import ray

    # Positive control: a value sent the way the launcher used to send credentials (a task's runtime env) is
    # found by the same search, so a leak could not hide from it.
    canary = "ssfer-canary-" + _secrets.token_hex(8)

    @ray.remote(num_cpus=0)
    def read_env():
        return os.environ.get("SSFER_CANARY")

    assert ray.get(read_env.options(runtime_env={"env_vars": {"SSFER_CANARY": canary}}).remote(),
                   timeout=300) == canary
    places = _ray_places(ray)
    for k in storage.list_files(bucket_url):
        places[f"{bucket_url}/{k}"] = storage.get_bytes(f"{bucket_url}/{k}")
    assert any(canary.encode() in v for v in places.values()), "the search does not see runtime envs"
    leaks = [k for k, v in places.items() if secret.encode() in v]
    assert not leaks, f"the S3 secret is in: {leaks}"
    assert len(places) > 20 and any(k.endswith("runtime_env_agent.log") for k in places), sorted(places)[:50]


def test_eval_while_training_facemix_ema_then_semisup_zero3(ray_local, shards, tmp_path):
    """``eval.shards`` + ``eval.every_steps`` on the debug configs: eval lines in metrics.jsonl, the best step's
    weights in export/best/ — and the distributed evaluation agrees with ``ssfer evaluate`` on the exported
    weights. FaceMix evaluates its model EMA; the semi-supervised student under ZeRO-3 is evaluated through the
    engine (every rank forwards the same number of batches)."""
    from ssfer_dist.launchers.ray import run_stage
    from ssfer_dist.evaluate import evaluate_shards
    from ssfer_dist.models.io import load_weights

    n_test = read_manifest(shards["test"]).num_samples
    common = [f"data.shards={shards['labeled']}", f"run.storage={tmp_path / 'runs'}", f"eval.shards={shards['test']}",
              "eval.every_steps=4", "eval.batch_size_per_rank=16", "train.max_steps=10", "checkpoint.every_steps=0"]
    ft = run_stage(load_config(os.path.join(CONFIGS, "debug_cpu_finetune.yaml"),
                               common + ["init.weights=null", "train.model_ema=true", "train.model_ema_decay=0.8"]))
    semi = run_stage(load_config(os.path.join(CONFIGS, "debug_cpu_semisup.yaml"),
                                 common + [f"init.weights={ft.export_path}", "train.zero_stage=3",
                                           f"data.unlabeled=[{{shards: {shards['unlabeled']}, weight: 1.0}}]"]))
    for res, weights in ((ft, "ema"), (semi, "trained")):
        rec = _metrics(res.run_url)
        evals = [r for r in rec if "eval_accuracy" in r]
        assert [r["step"] for r in evals] == [4, 8, 10]
        for r in evals:
            assert r["eval_num_samples"] == n_test and r["eval_weights"] == weights
            assert 0.0 <= r["eval_accuracy"] <= 1.0 and 0.0 <= r["eval_macro_f1"] <= 1.0
            assert sum(map(sum, r["eval_confusion"])) == n_test
        best_step = max(evals, key=lambda r: (r["eval_accuracy"], -r["step"]))["step"]   # first of the best
        assert [r["step"] for r in evals if r["eval_best"]][-1] == best_step
        best_dir = os.path.join(res.run_url, "export", "best")
        info = json.load(open(os.path.join(best_dir, "eval.json")))
        assert info["step"] == best_step and info["metric"] == "accuracy"
        # the distributed evaluation == ssfer evaluate on the very weights it exported
        m_best = evaluate_shards(os.path.join(best_dir, "model.safetensors"), shards["test"], batch_size=16)
        assert abs(m_best["accuracy"] - info["eval_accuracy"]) <= 1.0 / n_test
        m_last = evaluate_shards(res.export_path, shards["test"], batch_size=16)
        assert abs(m_last["accuracy"] - evals[-1]["eval_accuracy"]) <= 1.0 / n_test
        assert load_weights(os.path.join(best_dir, "model.safetensors"))[1]["kind"] == "classifier"
