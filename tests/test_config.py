"""Typed config: key-path errors, --set typing, dry-run arithmetic, shipped configs, schedules."""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import subprocess
import sys

import pytest
import yaml

from ssfer_dist.config import ConfigError, apply_overrides, derived, from_dict, load_config, load_pipeline, to_dict
from ssfer_dist.stages import load_stage_config, stage_names
from ssfer_dist.train.schedule import warmup_cosine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def _write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


BASE = {"data": {"shards": "/data/fr"}}


@pytest.mark.parametrize("data, needle", [
    ({"optim": {"base_lr": "abc"}}, "optim.base_lr: expected float, got 'abc'"),
    ({"optim": {"bse_lr": 1.0}}, "optim.bse_lr: unknown key"),
    ({"trian": {}}, "trian: unknown key"),
    ({"train": {"zero_stage": 4}}, "train.zero_stage: expected one of 0|1|2|3, got 4"),
    ({"train": {"precision": "fp8"}}, "train.precision: expected one of"),
    ({"scaling": {"num_workers": 1.5}}, "scaling.num_workers: expected int"),
    ({"train": {"tensorboard": "yes"}}, "train.tensorboard: expected bool"),
    ({"optim": {"betas": [0.9]}}, "optim.betas: expected list of 2"),
    ({"data": {"shards": "/x", "unlabeled": [{"shards": "/u", "weight": "w"}]}},
     "data.unlabeled[0].weight: expected float"),
    ({"data": {"shards": "/x", "unlabeled": [{"shardz": "/u"}]}}, "data.unlabeled[0].shardz: unknown key"),
    ({"model": {"img_size": 30, "patch_size": 8}}, "model.img_size: must be a multiple of model.patch_size"),
    ({"train": {"stage": "semisup"}}, "data.unlabeled: semisup needs at least one unlabeled source"),
    ({"data": {"shards": ""}}, "data.shards: expected a shard folder"),
])
def test_bad_values_name_the_key_path(tmp_path, data, needle):
    merged = apply_overrides(BASE, [])
    for k, v in data.items():
        merged.setdefault(k, {})
        merged[k] = {**merged[k], **v} if isinstance(v, dict) else v
    path = _write(tmp_path, merged)
    with pytest.raises(ConfigError) as e:
        load_stage_config(path)
    msg = str(e.value)
    assert msg.startswith(path + ": "), msg
    assert needle in msg, msg
    assert "\n" not in msg


def test_yaml_syntax_error_names_line(tmp_path):
    path = _write(tmp_path, "data:\n  shards: /x\ntrain: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: invalid YAML"):
        load_config(path)


def test_overrides_use_yaml_scalar_typing(tmp_path):
    path = _write(tmp_path, BASE)
    cfg = load_config(path, ["train.max_steps=100", "optim.base_lr=3e-4", "train.zero_stage=3",
                             "data.uint8=false", "optim.betas=[0.9, 0.99]", "init.weights=null",
                             "run.name=abc", "scaling.resources_per_worker={TPU: 1}"])
    assert cfg.train.max_steps == 100 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.base_lr == pytest.approx(3e-4)
    assert cfg.train.zero_stage == 3 and cfg.data.uint8 is False
    assert cfg.optim.betas == (0.9, 0.99) and cfg.init.weights is None and cfg.run.name == "abc"
    assert cfg.scaling.resources_per_worker == {"TPU": 1.0}
    with pytest.raises(ConfigError, match="train.max_steps: expected"):
        load_config(path, ["train.max_steps=many"])
    # a --set typo is reported as that --set (not as the YAML file), with the closest key
    with pytest.raises(ConfigError, match=r"^--set train\.nope=1: unknown key 'nope' in train \(expected"):
        load_config(path, ["train.nope=1"])
    with pytest.raises(ConfigError, match=r"^--set train\.max_step=5: .*\(did you mean 'max_steps'\?\)"):
        load_config(path, ["train.max_step=5"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["train.max_steps"])


def test_config_is_frozen_and_roundtrips():
    cfg = from_dict(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 3  # type: ignore[misc]
    again = from_dict(to_dict(cfg))
    assert again == cfg


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, {"data": {"shards": "shards/fr"}, "run": {"storage": "runs"}})
    cfg = load_config(path, ["data.unlabeled=[{shards: u}]"])
    assert cfg.data.shards == str(tmp_path / "shards" / "fr")
    assert cfg.run.storage == str(tmp_path / "runs")
    assert cfg.data.unlabeled[0].shards == str(tmp_path / "u")
    cfg = load_config(path, ["data.shards=s3://b/fr"])
    assert cfg.data.shards == "s3://b/fr"


def test_derived_arithmetic_not_written_back():
    cfg = from_dict({"data": {"shards": "/x", "batch_size_per_rank": 48}, "scaling": {"num_workers": 4},
                     "train": {"grad_accum": 2, "epochs": 3}, "optim": {"base_lr": 1.5e-4, "warmup_epochs": 0.5}})
    d = derived(cfg, num_samples=10_000)
    assert d["global_batch"] == 48 * 4 * 2 == 384
    assert d["effective_lr"] == pytest.approx(1.5e-4 * 384 / 256)
    assert d["steps_per_epoch"] == 10_000 // 384 == 26
    assert d["total_steps"] == 78 and d["warmup_steps"] == 13
    assert cfg.optim.lr is None                      # never written back
    cfg2 = from_dict({**to_dict(cfg), "optim": {**to_dict(cfg.optim), "lr": 1e-3}})
    assert derived(cfg2, 10_000)["effective_lr"] == 1e-3


def test_dry_run_prints_resolved_config_and_arithmetic(tmp_path):
    path = _write(tmp_path, {"data": {"shards": str(tmp_path / "missing"), "batch_size_per_rank": 32},
                             "scaling": {"num_workers": 2}, "optim": {"base_lr": 1e-4}})
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "ssfer_dist", "run", path, "--dry-run", "--set", "train.grad_accum=4"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "global_batch: 256" in out
    assert "effective_lr: 0.0001" in out
    assert "grad_accum: 4" in out and "batch_size_per_rank: 32" in out
    assert "batch_size_per_rank 32 x ranks 2 x grad_accum 4 = 256" in out
    # the YAML on disk is untouched
    assert "grad_accum" not in open(path).read()


def test_cli_bad_config_is_one_line_nonzero(tmp_path):
    path = _write(tmp_path, {"data": {"shards": "/x"}, "optim": {"base_lr": "fast"}})
    r = subprocess.run([sys.executable, "-m", "ssfer_dist", "run", path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "optim.base_lr: expected float" in lines[0], r.stderr


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "*.yaml"))))
def test_shipped_configs_validate(path):
    data = yaml.safe_load(open(path))
    if "fractions" in data:                       # a sweep: its models' stage configs with their overrides
        from ssfer_dist.sweep import load_sweep

        sw = load_sweep(path)
        for m in sw.models:
            assert load_stage_config(m.config, m.overrides).train.stage in ("facemix", "semisup")
    elif "pretrain" in data:
        p = load_pipeline(path)
        for name in ("pretrain", "finetune", "semisup"):
            assert os.path.exists(getattr(p, name).config), getattr(p, name).config
            load_stage_config(getattr(p, name).config)
    else:
        cfg = load_stage_config(path)
        assert cfg.train.stage in stage_names()


def test_warmup_cosine_is_a_pure_function_of_step():
    peak, total, warm = 1e-3, 100, 10
    lrs = [warmup_cosine(s, total, peak, warm, 1e-5) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warm)
    assert lrs[warm - 1] == pytest.approx(peak)
    assert max(lrs) == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    assert warmup_cosine(total, total, peak, warm, 1e-5) == pytest.approx(1e-5)
    mid = warm + (total - warm) // 2
    assert lrs[mid] == pytest.approx(1e-5 + (peak - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_core_config_checks_shared_keys_and_the_registry_checks_the_stage():
    from ssfer_dist.stages import check_stage_config

    cfg = from_dict({"data": {"shards": "/x"}, "train": {"stage": "probe"}}, source="c.yaml")
    with pytest.raises(ConfigError, match=r"^c\.yaml: train\.stage: unknown stage 'probe' \(expected one of: mae"):
        check_stage_config(cfg, "c.yaml")
    mae = from_dict({"data": {"shards": "/x"}, "eval": {"shards": "/e"}})
    with pytest.raises(ConfigError, match=r"eval\.shards: the mae stage trains no classifier"):
        check_stage_config(mae)
