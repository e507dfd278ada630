"""The launch plan: every value derived once, by the launcher's pre-flight, before a worker starts.

Frozen and typed; the launcher hands it to every worker, which reads it and never recomputes it
(DESIGN rule 3: derived values are computed, logged and never written back).
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

__all__ = ["LaunchPlan", "UnlabeledPlan"]


@dataclasses.dataclass(frozen=True)
class UnlabeledPlan:
    """One unlabeled source: its shard URLs, mixing weight, sample count and the sample id of each
    shard's first sample (ids run over all unlabeled sources, source after source, shard after shard)."""

    urls: Tuple[str, ...]
    weight: float
    num_samples: int
    offsets: Tuple[int, ...]
    counts: Tuple[int, ...] = ()      # samples per shard


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    stage: str                        # the registry name (ssfer_dist.stages)
    run_url: str                      # <storage>/<run name>
    shard_urls: Tuple[str, ...]       # the labeled (or MAE) shards
    num_samples: int
    image_size: int
    num_ranks: int
    batch_size_per_rank: int
    grad_accum: int
    global_batch: int                 # batch_size_per_rank x num_ranks x grad_accum
    effective_lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    num_classes: int = 0              # 0: unlabeled stage (MAE)
    class_names: Tuple[str, ...] = ()
    unlabeled: Tuple[UnlabeledPlan, ...] = ()
    num_unlabeled: int = 0
    register_s3: bool = False
    datasets: Tuple[str, ...] = ()   # the manifests' dataset names (labeled / MAE first), for the export
    eval_urls: Tuple[str, ...] = ()   # eval.shards' shard URLs (empty: no evaluation while training)
    eval_num_samples: int = 0
    shard_counts: Tuple[int, ...] = ()   # samples per labeled (or MAE) shard, as the manifest lists them
