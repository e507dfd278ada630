"""Stage 3: semi-supervised fine-tuning (EMA teacher on weak views, pseudo-labels for the strong view,
fixed / DTM / FreeMatch / FlexMatch thresholds) → the final classifier."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ssfer_dist.data.pipeline import Source, StreamSpec, View
from ssfer_dist.distributed import collectives
from ssfer_dist.distributed.engine import engine_dtype
from ssfer_dist.errors import UserError
from ssfer_dist.plan import LaunchPlan
from ssfer_dist.ssl.ema import EMATeacher
from ssfer_dist.ssl.thresholds import build_threshold
from ssfer_dist.stages.base import Stage, StageConfigs, Views, build_classifier_for
from ssfer_dist.tasks import SemiSupervised
from ssfer_dist.tasks.base import Task

# FlexMatch max-reduces one dense int32 vector over the unlabeled set every step (8 MB at 2 M)
MAX_FLEXMATCH_SAMPLES = 2_000_000


class SemiSupStage(Stage):
    name = "semisup"
    section = "semisup"
    needs_unlabeled = True

    def preflight(self, sub: StageConfigs, plan: LaunchPlan) -> None:
        if sub.section.threshold.kind != "flexmatch":
            return
        if not plan.unlabeled:
            raise UserError("semisup.threshold.kind: flexmatch needs data.unlabeled")
        n = plan.num_unlabeled
        if n > MAX_FLEXMATCH_SAMPLES:
            raise UserError(f"semisup.threshold.kind: flexmatch keeps state per unlabeled sample and all-reduces "
                            f"{n:,} values every step; use at most {MAX_FLEXMATCH_SAMPLES:,} unlabeled samples "
                            f"(e.g. the FER remainder) or a per-class threshold (dtm, freematch)")

    def views(self, sub: StageConfigs) -> Views:
        unl = [View("weak", "weak"), View("strong", "strong")]
        if sub.section.threshold.kind == "dtm":
            unl.append(View("weak2", "weak"))
        return (View("image", "weak"),), tuple(unl)

    def stream_specs(self, sub: StageConfigs, plan: LaunchPlan) -> List[StreamSpec]:
        """The labeled stream plus the unlabeled mixture (``u_`` keys, ``mu`` x the labeled batch)."""
        specs = super().stream_specs(sub, plan)
        _, unl_views = self.data_views(sub)
        ids = sub.section.threshold.kind == "flexmatch"  # per-sample state: samples carry their manifest row as an id
        srcs = tuple(Source(tuple(u.urls), u.weight, tuple(u.offsets) if ids else (), tuple(u.counts))
                     for u in plan.unlabeled)
        specs.append(StreamSpec(sources=srcs, views=unl_views, batch_size=sub.data.batch_size_per_rank * sub.data.mu,
                                labeled=False, prefix="u_"))
        return specs

    def build_task(self, sub: StageConfigs, plan: LaunchPlan, device: torch.device) -> Tuple[Task, nn.Module]:
        s = sub.section
        th = s.threshold
        dtype = engine_dtype(sub.train)
        model = build_classifier_for(sub.model, sub.init, plan.num_classes).to(device)
        kw: Dict[str, Any] = {"fixed": {"tau": th.tau},
                              "dtm": {"tau0": th.dtm_init, "momentum": th.dtm_momentum},
                              "freematch": {"momentum": th.freematch_momentum},
                              "flexmatch": {"num_samples": int(plan.num_unlabeled), "tau": th.flexmatch_tau,
                                            "warmup": th.flexmatch_warmup,
                                            "all_reduce_max": collectives.all_reduce_max}}[th.kind]
        threshold = build_threshold(th.kind, plan.num_classes, all_reduce=collectives.all_reduce_sum, **kw)
        teacher = EMATeacher(model, decay=s.ema_decay, device=device)
        task = SemiSupervised(model, teacher, threshold, plan.num_classes, lambda_u=s.lambda_u, mu=sub.data.mu,
                              smoothing=s.label_smoothing, round_steps=th.dtm_every if th.kind == "dtm" else 0,
                              input_dtype=None if dtype == torch.float32 else dtype)
        return task, model

    def eval_module(self, sub: StageConfigs, task: Task) -> Optional[nn.Module]:
        """``semisup.eval_model: teacher``: the EMA teacher (this run's, never a stale stage-2 model)."""
        return task.teacher.module if sub.section.eval_model == "teacher" else None


STAGE = SemiSupStage()
