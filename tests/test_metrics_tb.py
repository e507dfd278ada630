"""TensorBoard as users expect: grouped tags (train/, eval/, data/, sys/), housekeeping values only in
metrics.jsonl, the eval confusion matrix as an image, the run's hyper-parameters in the HParams dashboard."""
from __future__ import annotations

import json
import os

import pytest

from ssfer_dist.train.metrics import MetricsLog, flatten, tb_tag


def test_tag_groups():
    assert [tb_tag(k) for k in ("loss", "loss_mix", "lr", "acc", "mask_rate")] == \
        ["train/loss", "train/loss_mix", "train/lr", "train/acc", "train/mask_rate"]
    assert tb_tag("eval_accuracy") == "eval/accuracy" and tb_tag("eval_macro_f1") == "eval/macro_f1"
    assert tb_tag("epoch") == "data/epoch" and tb_tag("corrupt_samples") == "data/corrupt_samples"
    assert tb_tag("images_per_s") == "sys/images_per_s"
    assert tb_tag("batch_digest") is None and tb_tag("time") is None and tb_tag("step") is None
    assert tb_tag("mae/preview") == "mae/preview"
    assert flatten({"a": {"b": 1, "c": [1, 2], "d": None}, "e": "x"}) == {"a.b": 1, "a.c": "[1, 2]",
                                                                          "a.d": "null", "e": "x"}


def test_events_grouped_hparams_and_confusion_image(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = str(tmp_path / "run")
    log = MetricsLog(run, tensorboard=True, class_names=["a", "b", "c"])
    log.log_hparams({"optim.lr": 1e-3, "train.stage": "facemix", "train.model_ema": True, "plan.global_batch": 16})
    base = {"lr": 1e-3, "epoch": 0.5, "samples_seen": 80, "steps_per_s": 2.0, "images_per_s": 32.0,
            "batch_digest": 123456789, "time": 1.7e9, "loss": 1.5}
    log.write({"step": 5, **base})
    log.write({"step": 10, **base, "loss": 1.2, "eval_accuracy": 0.5, "eval_macro_f1": 0.4, "eval_best": True,
               "eval_weights": "ema", "eval_confusion": [[2, 1, 0], [0, 1, 1], [1, 0, 2]]})
    log.close()
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert lines[0]["batch_digest"] == 123456789 and lines[1]["eval_weights"] == "ema"    # jsonl keeps all
    acc = EventAccumulator(os.path.join(run, "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = set(tags["scalars"])
    assert {"train/loss", "train/lr", "eval/accuracy", "eval/macro_f1", "data/epoch", "data/samples_seen",
            "sys/steps_per_s", "sys/images_per_s"} <= scalars
    assert not [t for t in scalars if "batch_digest" in t or t.endswith("time") or "/" not in t]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([1.5, 1.2])
    assert tags["images"] == ["eval/confusion"]
    img = acc.Images("eval/confusion")
    assert [e.step for e in img] == [10] and img[0].width > 200 and img[0].height > 200
    # HParams: the experiment (metric columns), the session's values; the config also as text
    content = acc.PluginTagToContent("hparams")
    data = {}
    for tag, raw in content.items():
        d = plugin_data_pb2.HParamsPluginData.FromString(raw)
        data[tag] = d
    exp = next(d.experiment for d in data.values() if d.HasField("experiment"))
    assert "eval/accuracy" in [m.name.tag for m in exp.metric_infos]
    start = next(d.session_start_info for d in data.values() if d.HasField("session_start_info"))
    assert start.hparams["optim.lr"].number_value == 1e-3 and start.hparams["train.stage"].string_value == "facemix"
    ema = start.hparams["train.model_ema"]         # torch records bools as numbers (bool is an int)
    assert ema.bool_value is True or ema.number_value == 1.0
    assert "config/text_summary" in tags["tensors"]


def test_run_hparams_from_a_shipped_config(tmp_path):
    from ssfer_dist.config import load_config
    from ssfer_dist.train.metrics import hparams
    from ssfer_dist.plan import LaunchPlan

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "debug_cpu_semisup.yaml"), ["train.zero_stage=3"])
    plan = LaunchPlan(stage="semisup", run_url=str(tmp_path), shard_urls=("a.tar",), num_samples=56, image_size=32,
                      num_ranks=2, batch_size_per_rank=8, grad_accum=1, global_batch=16, effective_lr=5e-4,
                      steps_per_epoch=3, total_steps=20, warmup_steps=2, num_classes=7)
    hp = hparams(cfg, plan)
    assert hp["train.zero_stage"] == 3 and hp["semisup.threshold.kind"] == "fixed" and hp["plan.global_batch"] == 16
    assert hp["optim.betas"] == "[0.9, 0.999]" and not [k for k in hp if k.startswith(("debug.", "failure."))]
    log = MetricsLog(str(tmp_path / "run"), tensorboard=True)
    log.log_hparams(hp)                           # every value is one the HParams summary accepts
    log.close()
