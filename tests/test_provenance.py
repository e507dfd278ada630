"""Weights record what they were trained on (``trained_on`` in the export metadata, inherited through
``init.weights``); ``ssfer predict`` warns when that is the synthetic demo data."""
from __future__ import annotations

import logging

from ssfer_dist.config import from_dict
from ssfer_dist.models.io import load_weights, read_meta, save_weights
from ssfer_dist.predict import Predictor
from ssfer_dist.stages import get_stage
from ssfer_dist.stages.base import StageConfigs
from ssfer_dist.plan import LaunchPlan
from tests.test_export import make_weights


def _plan(datasets):
    return LaunchPlan(stage="facemix", run_url="/r", shard_urls=("/s/a.tar",), num_samples=10, image_size=32,
                      num_ranks=1, batch_size_per_rank=2, grad_accum=1, global_batch=2, effective_lr=1e-3,
                      steps_per_epoch=5, total_steps=5, warmup_steps=0, num_classes=7, datasets=datasets)


def test_export_metadata_lists_the_datasets_of_the_run_and_its_init_weights(tmp_path):
    parent = tmp_path / "mae.safetensors"
    make_weights(parent)
    sd, meta = load_weights(str(parent))
    save_weights(str(parent), sd, dict(meta, trained_on=["synthfr"]))
    cfg = from_dict({"data": {"shards": "/s"}, "train": {"stage": "facemix"}, "init": {"weights": str(parent)}})
    meta = get_stage("facemix").export_base(StageConfigs.of(cfg), _plan(("synthfer", "synthfr")))
    assert meta["trained_on"] == ["synthfr", "synthfer"]
    assert read_meta(str(tmp_path / "missing.safetensors")) == {}


def test_predict_warns_for_weights_trained_on_the_demo_data(tmp_path, caplog):
    w = tmp_path / "model.safetensors"
    make_weights(w)
    with caplog.at_level(logging.WARNING, logger="ssfer_dist.predict"):
        Predictor(str(w), detector="none")
    assert not caplog.records                     # no record of the data: no claim either way
    sd, meta = load_weights(str(w))
    save_weights(str(w), sd, dict(meta, trained_on=["synthfr", "synthfer"]))
    with caplog.at_level(logging.WARNING, logger="ssfer_dist.predict"):
        Predictor(str(w), detector="none")
    assert any("synthetic demo data (synthfr, synthfer)" in r.getMessage() for r in caplog.records)
