"""Stages as objects in a registry; the linear-probe stage as the worked example of adding one."""
from __future__ import annotations

import ast
import dataclasses
import os
import pathlib

import pytest
import torch

from ssfer_dist.config import ConfigError
from ssfer_dist.models.io import classifier_from_weights, save_weights
from ssfer_dist.models.mae import build_mae
from ssfer_dist.stages import get_stage, load_stage_config, stage_names
from ssfer_dist.stages.base import StageConfigs
from ssfer_dist.tasks import FaceMixFinetune, LinearProbe, MAEPretrain, SemiSupervised, Task
from ssfer_dist.plan import LaunchPlan

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
IMG, PATCH, C = 32, 8, 7


def _plan(**kw) -> LaunchPlan:
    base = dict(stage="linear_probe", run_url="/tmp/x", shard_urls=("a.tar",), num_samples=64, image_size=IMG,
                num_ranks=1, batch_size_per_rank=8, grad_accum=1, global_batch=8, effective_lr=1e-2,
                steps_per_epoch=8, total_steps=8, warmup_steps=0, num_classes=C,
                class_names=tuple(f"c{i}" for i in range(C)))
    base.update(kw)
    return LaunchPlan(**base)


@pytest.fixture(scope="module")
def mae_weights(tmp_path_factory):
    torch.manual_seed(0)
    m = build_mae("micro", IMG, PATCH, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    path = str(tmp_path_factory.mktemp("mae") / "model.safetensors")
    save_weights(path, m.state_dict(), {"kind": "mae", "arch": dict(size="micro", img_size=IMG, patch_size=PATCH,
                                                                    num_classes=0, global_pool="token")})
    return path


def _probe_cfg(weights, *extra):
    return load_stage_config(str(CONFIGS / "debug_cpu_linprobe.yaml"), [f"init.weights={weights}", *extra])


def test_registry_names_every_stage_and_config_validates_against_it():
    assert stage_names() == ("mae", "facemix", "semisup", "linear_probe")
    assert [get_stage(n).name for n in stage_names()] == list(stage_names())
    with pytest.raises(ConfigError, match=r"train\.stage: unknown stage 'probe' \(expected one of: mae, facemix, "
                                          r"semisup, linear_probe\)"):
        load_stage_config(str(CONFIGS / "debug_cpu_pretrain.yaml"), ["train.stage=probe"])
    with pytest.raises(KeyError, match="linear_probe"):
        get_stage("probe")


def test_stage_config_checks_come_from_the_stage(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.unlabeled: semisup needs at least one unlabeled source"):
        load_stage_config(str(CONFIGS / "debug_cpu_semisup.yaml"), ["data.unlabeled=[]"])
    with pytest.raises(ConfigError, match=r"init\.weights: linear_probe needs the pretrained encoder"):
        load_stage_config(str(CONFIGS / "debug_cpu_linprobe.yaml"), ["init.weights=null"])
    with pytest.raises(ConfigError, match=r"linear_probe\.label_smoothing: expected float"):
        load_stage_config(str(CONFIGS / "debug_cpu_linprobe.yaml"), ["linear_probe.label_smoothing=abc"])


def test_launch_plan_is_frozen():
    p = _plan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.global_batch = 3  # type: ignore[misc]


def test_every_task_follows_the_task_protocol():
    for cls in (MAEPretrain, FaceMixFinetune, SemiSupervised, LinearProbe):
        for name in ("__call__", "after_step", "state_dict", "load_state_dict"):
            assert callable(getattr(cls, name, None)), (cls, name)
    torch.manual_seed(0)
    task = MAEPretrain(build_mae("micro", IMG, PATCH, decoder_dim=32, decoder_depth=1, decoder_heads=2))
    assert isinstance(task, Task) and task.state_dict() == {} and task.after_step(0) == {}


def test_checkpoint_and_engine_do_not_import_stages():
    """checkpoint → stages → distributed/engine was a cycle; checkpoint now talks to the Task."""
    for rel in ("ssfer_dist/train/checkpoint.py", "ssfer_dist/distributed/engine.py"):
        tree = ast.parse((ROOT / rel).read_text())
        mods = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in mods if m.startswith(("ssfer_dist.stages", "ssfer_dist.train.loop"))], (rel, mods)
    assert not (ROOT / "ssfer_dist/train/stages.py").exists()


def test_linear_probe_trains_only_the_head(mae_weights):
    cfg = _probe_cfg(mae_weights)
    stage = get_stage(cfg.train.stage)
    sub = StageConfigs.of(cfg)
    torch.manual_seed(0)
    task, model = stage.build_task(sub, _plan(), torch.device("cpu"))
    groups = stage.param_groups(sub, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    assert sum(len(g["params"]) for g in groups) == 2
    assert isinstance(model.head[0], torch.nn.BatchNorm1d) and not model.head[0].affine
    # the encoder is the MAE's
    from ssfer_dist.models.io import load_weights

    mae_sd, _ = load_weights(mae_weights)
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], mae_sd["blocks.0.attn.qkv.weight"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(groups, lr=1e-2)
    model.train()                      # what the engine does; the task puts the encoder back in eval
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randint(0, 256, (8, 3, IMG, IMG), dtype=torch.uint8, generator=g),
             "label": torch.randint(0, C, (8,), generator=g)}
    for step in range(3):
        out = task(batch, step)
        assert not model.blocks.training and model.head.training
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert {"head.1.weight", "head.1.bias", "head.0.running_mean", "head.0.running_var"} <= changed
    assert all(k.startswith("head.") for k in changed), changed   # encoder weights unchanged
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("head."))


def test_linear_probe_export_is_a_plain_classifier(mae_weights, tmp_path):
    cfg = _probe_cfg(mae_weights)
    stage = get_stage("linear_probe")
    sub = StageConfigs.of(cfg)
    plan = _plan()
    torch.manual_seed(0)
    task, model = stage.build_task(sub, plan, torch.device("cpu"))
    with torch.no_grad():              # non-trivial BN statistics and head
        model.head[0].running_mean.normal_()
        model.head[0].running_var.uniform_(0.5, 2.0)
        model.head[1].weight.normal_()
    sd, meta = stage.export(sub, plan, task, model.state_dict())
    assert meta["kind"] == "classifier" and meta["stage"] == "linear_probe" and meta["arch"]["num_classes"] == C
    path = str(tmp_path / "probe.safetensors")
    save_weights(path, sd, meta)
    clf, _ = classifier_from_weights(path)            # what `ssfer evaluate` loads
    x = torch.randn(4, 3, IMG, IMG)
    model.eval()
    clf.eval()
    with torch.no_grad():
        torch.testing.assert_close(clf(x), model(x), rtol=1e-4, atol=1e-4)
    assert os.path.getsize(path) > 0


# ---------------------------------------------------------------- model EMA (facemix) / semisup eval_model
class _FakeEngine:
    def __init__(self, module):
        self.module = module


def test_facemix_model_ema_updates_checkpoints_and_is_what_gets_exported(mae_weights):
    from ssfer_dist.train.export import export_state_dict

    cfg = load_stage_config(str(CONFIGS / "debug_cpu_finetune.yaml"),
                      [f"init.weights={mae_weights}", "train.model_ema=true", "train.model_ema_decay=0.9"])
    stage, sub = get_stage("facemix"), StageConfigs.of(cfg)
    torch.manual_seed(0)
    task, model = stage.build_task(sub, _plan(stage="facemix"), torch.device("cpu"))
    ema = stage.eval_module(sub, task)
    assert ema is task.ema.module and ema is not model
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randint(0, 256, (8, 3, IMG, IMG), dtype=torch.uint8, generator=g),
             "label": torch.randint(0, C, (8,), generator=g), "box": torch.tensor([[0.0, 0, IMG, IMG]] * 8)}
    for step in range(2):
        out = task(batch, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        assert task.after_step(step) == {"ema_decay": 0.9}
    # two EMA steps: e = 0.9 (0.9 w0 + 0.1 w1) + 0.1 w2
    k = "blocks.0.attn.qkv.weight"
    assert not torch.equal(ema.state_dict()[k], model.state_dict()[k])
    assert not torch.equal(ema.state_dict()[k], w0[k])
    # export: the EMA's weights (rank 0), not the trained module's; other ranks nothing
    sd = export_state_dict(stage, sub, task, _FakeEngine(model), 2, rank=0)
    assert torch.equal(sd[k], ema.state_dict()[k]) and set(sd) == set(model.state_dict())
    assert export_state_dict(stage, sub, task, _FakeEngine(model), 2, rank=1) is None
    # checkpoint round trip of the EMA; without model_ema the task keeps no state
    st = task.state_dict()
    torch.manual_seed(0)
    task2, _ = stage.build_task(sub, _plan(stage="facemix"), torch.device("cpu"))
    task2.load_state_dict(st)
    assert torch.equal(task2.ema.module.state_dict()[k], ema.state_dict()[k]) and task2.ema.num_updates == 2
    off = StageConfigs.of(load_stage_config(str(CONFIGS / "debug_cpu_finetune.yaml"), [f"init.weights={mae_weights}"]))
    task3, model3 = stage.build_task(off, _plan(stage="facemix"), torch.device("cpu"))
    assert stage.eval_module(off, task3) is None and task3.state_dict() == {} and task3.after_step(0) == {}
    assert torch.equal(export_state_dict(stage, off, task3, _FakeEngine(model3), 2, rank=0)[k],
                       model3.state_dict()[k])
    with pytest.raises(ValueError, match="no model EMA"):
        task2.load_state_dict({})


def test_model_ema_config_checks():
    with pytest.raises(ConfigError, match=r"train\.model_ema: the mae stage keeps no model EMA"):
        load_stage_config(str(CONFIGS / "debug_cpu_pretrain.yaml"), ["train.model_ema=true"])
    with pytest.raises(ConfigError, match=r"train\.model_ema: the semisup stage keeps no model EMA"):
        load_stage_config(str(CONFIGS / "debug_cpu_semisup.yaml"), ["train.model_ema=true"])
    with pytest.raises(ConfigError, match=r"train\.model_ema_decay: expected 0 < value < 1"):
        load_stage_config(str(CONFIGS / "debug_cpu_finetune.yaml"), ["train.model_ema_decay=1.0"])
    with pytest.raises(ConfigError, match=r"semisup\.eval_model"):
        load_stage_config(str(CONFIGS / "debug_cpu_semisup.yaml"), ["semisup.eval_model=ema"])


def test_semisup_eval_model_student_or_teacher(mae_weights):
    stage = get_stage("semisup")
    for which in ("student", "teacher"):
        cfg = load_stage_config(str(CONFIGS / "debug_cpu_semisup.yaml"),
                          [f"init.weights={mae_weights}", f"semisup.eval_model={which}"])
        sub = StageConfigs.of(cfg)
        task, model = stage.build_task(sub, _plan(stage="semisup"), torch.device("cpu"))
        em = stage.eval_module(sub, task)
        assert (em is task.teacher.module) if which == "teacher" else (em is None)
