"""The one step loop for every stage, run by each worker of either launcher (Ray Train or torchrun).

:func:`run_worker` builds the worker once (device, fast path, the stage's task, the DeepSpeed engine, the
checkpoint to resume from, the data) and then loops. Per optimizer step: lr from the schedule (a pure function
of the step) → ``grad_accum`` micro-batches (:mod:`ssfer_dist.train.step`) → the parts that own a cadence are
asked whether this step is theirs: the :class:`~ssfer_dist.train.metrics.MetricsLogger` (``train.log_every``),
the :class:`~ssfer_dist.train.evaluation.Evaluator` (``eval.every_steps``) and the
:class:`~ssfer_dist.train.checkpoint.CheckpointManager` (``checkpoint.every_steps``). Every rank reports to its
launcher's context (:mod:`ssfer_dist.distributed.context`) the same number of times. At the end the
consolidated weights go to ``<storage>/<run>/export/model.safetensors``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
from functools import partial
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from ssfer_dist import storage
from ssfer_dist.config import Config, DataCfg, from_dict
from ssfer_dist.data.pipeline import ShardStream, make_loader, replay
from ssfer_dist.data.transforms import build_transform
from ssfer_dist.distributed import collectives, faults
from ssfer_dist.distributed.context import WorkerContext
from ssfer_dist.distributed.engine import build_engine, build_optimizer, ds_config, engine_dtype, gather_ctx, set_lr
from ssfer_dist.stages import get_stage
from ssfer_dist.stages.base import StageConfigs
from ssfer_dist.train import fastpath, step
from ssfer_dist.train.checkpoint import CheckpointManager
from ssfer_dist.train.evaluation import Evaluator
from ssfer_dist.train.export import export_state_dict, write_export
from ssfer_dist.train.metrics import MetricsLogger
from ssfer_dist.plan import LaunchPlan
from ssfer_dist.train.schedule import warmup_cosine
from ssfer_dist.train.state import TrainState
from ssfer_dist.worker_env import check_s3_credentials

log = logging.getLogger(__name__)

__all__ = ["run_worker"]


@dataclasses.dataclass
class Worker:
    """What one worker trains, built once by :func:`_build` (``state``: the run's position, advanced by the
    loop; every other field is fixed)."""

    cfg: Config
    plan: LaunchPlan
    ctx: WorkerContext
    stage: Any
    sub: StageConfigs
    label: str
    device: torch.device
    fast: fastpath.FastPath
    zero_stage: int
    task: Any
    engine: Any
    optimizer: torch.optim.Optimizer
    state: TrainState


def run_worker(payload: Dict[str, Any], ctx: WorkerContext) -> None:
    """The loop under any launcher. ``payload``: ``config`` (plain dict), ``plan`` (the
    :class:`~ssfer_dist.plan.LaunchPlan` computed once by the launcher: read here, never recomputed),
    optional ``env`` and ``label``; ``ctx`` gives rank/world, the checkpoint to resume and the reporting."""
    cfg = from_dict(payload["config"])
    plan: LaunchPlan = payload["plan"]
    rank = ctx.rank
    # Bounded waits: the watchdog ends this worker (one-line cause in <run>/_faults/) when the loop makes no
    # progress for failure.stall_timeout_s; a permanent fault is raised as PermanentFault (never worth a retry).
    watchdog = faults.StallWatchdog(
        cfg.failure.stall_timeout_s, rank,
        record=lambda cause: faults.write_cause(plan.run_url, rank, cause, "stall"))
    try:
        _train(cfg, plan, payload, watchdog, ctx)
    except Exception as e:
        cause = faults.classify(e)
        if cause is None:
            raise
        log.error("rank %d: permanent fault, not retried: %s", rank, cause)
        try:
            faults.write_cause(plan.run_url, rank, cause, "permanent")
        except Exception:
            pass
        raise faults.PermanentFault(cause) from e
    finally:
        watchdog.stop()


def _train(cfg: Config, plan: LaunchPlan, payload: Dict[str, Any], watchdog: faults.StallWatchdog,
           ctx: WorkerContext) -> None:
    _prepare_process(cfg, plan, payload.get("env", {}))
    ctx.setup_logging()
    zero_stage = cfg.train.zero_stage
    ckpt = CheckpointManager(ctx, plan.run_url, every_steps=cfg.checkpoint.every_steps,
                             num_to_keep=cfg.checkpoint.num_to_keep, total_steps=plan.total_steps,
                             zero_stage=zero_stage, convert_timeout_s=_convert_timeout(cfg))
    w = _build(cfg, plan, ctx, payload.get("label") or plan.stage, ckpt, watchdog)
    batches, device_aug = _batches(w)
    mlog = MetricsLogger(cfg, plan, ctx.rank, w.label, w.state)
    evaluator = Evaluator(cfg.eval, plan, w.stage, w.sub, rank=ctx.rank, world=ctx.world_size, device=w.device,
                          img_size=cfg.model.img_size, max_member_bytes=cfg.data.max_member_bytes,
                          dtype=engine_dtype(cfg.train), zero_stage=w.zero_stage, label=w.label)
    _loop(w, batches, device_aug, mlog, evaluator, ckpt, watchdog)
    _export(w, mlog, watchdog)


def _prepare_process(cfg: Config, plan: LaunchPlan, env: Dict[str, str]) -> None:
    """This process's environment: the launcher's forwarded variables, DeepSpeed's accelerator (read when
    deepspeed is first imported), the storage retry budget and S3 credentials checked up front."""
    for k, v in env.items():
        if k.startswith("AWS_"):        # the storage the driver checked in pre-flight, not a stale one
            os.environ[k] = v
        else:
            os.environ.setdefault(k, v)
    os.environ["DS_ACCELERATOR"] = "cuda" if (cfg.scaling.use_gpu and torch.cuda.is_available()) else "cpu"
    storage.set_retry_budget(cfg.run.storage_retry_s)
    if plan.register_s3 or storage.is_s3(plan.run_url):
        check_s3_credentials(f"run {plan.run_url}")
    if plan.register_s3:
        storage.register_webdataset_s3()


def _convert_timeout(cfg: Config) -> float:
    """The bound on converting a checkpoint for an elastic resume: the stall watchdog's, which would end the
    worker anyway (an hour without one)."""
    return cfg.failure.stall_timeout_s if cfg.failure.stall_timeout_s > 0 else 3600.0


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _build(cfg: Config, plan: LaunchPlan, ctx: WorkerContext, label: str, ckpt: CheckpointManager,
           watchdog: faults.StallWatchdog) -> Worker:
    """Device and fast path, the stage's task, the DeepSpeed engine and the run's position (a fresh one, or
    the checkpoint's: the manager reads it before the engine is built, whose config says whether it loads a
    universal checkpoint)."""
    rank, world = ctx.rank, ctx.world_size
    if world != plan.num_ranks:
        raise RuntimeError(f"the launch plan is for {plan.num_ranks} ranks, {ctx.name} started {world}")
    device = torch.device("cuda", ctx.local_rank) if cfg.scaling.use_gpu and torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    fast = fastpath.resolve(cfg, device.type)   # this worker's device decides the automatic switches
    fastpath.apply_backend_flags(fast)
    if rank == 0:
        log.info("[%s] fast path: %s", label, fastpath.summary(fast))
    stage, sub = get_stage(plan.stage), StageConfigs.of(cfg)
    seeds = {"base": cfg.run.seed, "model": cfg.run.seed, "rank": cfg.run.seed * 1000 + rank}
    _seed_all(seeds["model"])                    # identical initial weights on every rank
    task, trainable = stage.build_task(sub, plan, device)
    fastpath.apply_to_model(fast, trainable)    # grad checkpointing, torch.compile (in place: names kept)
    optimizer = build_optimizer(stage.param_groups(sub, trainable), cfg.optim, plan.effective_lr, fused=fast.fused)
    watchdog.beat("checkpoint restore")
    with ckpt.resuming() as resume:
        watchdog.beat("DeepSpeed initialisation")
        config = ds_config(cfg.train, plan.batch_size_per_rank, plan.global_batch,
                           load_universal=resume is not None and resume.elastic)
        engine = build_engine(trainable, optimizer, config)
        watchdog.beat("checkpoint restore")
        state = ckpt.load(resume, engine, task) if resume is not None else TrainState(stage=plan.stage, seeds=seeds)
    _set_data_position(state, resume is not None, cfg.data, plan.grad_accum, world, rank)
    _seed_all(seeds["rank"] + 7919 * state.step)
    return Worker(cfg=cfg, plan=plan, ctx=ctx, stage=stage, sub=sub, label=label, device=device, fast=fast,
                  zero_stage=ckpt.zero_stage, task=task, engine=engine, optimizer=optimizer, state=state)


def _set_data_position(state: TrainState, resumed: bool, data: DataCfg, grad_accum: int, world: int,
                       rank: int) -> None:
    """This run's data position in ``state``. The position is the step: with another rank count (an elastic
    resume: ``grad_accum`` keeps the global batch) this rank's next micro-batch is step x grad_accum, whatever
    the saving run's split was. ``data.order: shards`` cuts the order into slots: the config's, else the
    resumed run's (an elastic resume keeps its order), else ranks x loader lanes."""
    prior = state.virtual_slots if resumed and state.data_order == "shards" else 0
    slots = data.virtual_slots or prior or world * max(1, data.num_loader_workers)
    if resumed:
        state.micro_batch = state.step * grad_accum
        _check_elastic(state, world, data.order, slots, rank)
        log.info("rank %d resumed at step %d (micro-batch %d, data epoch %d)", rank, state.step,
                 state.micro_batch, state.data_epoch)
    state.num_ranks, state.data_order, state.virtual_slots = world, data.order, slots


def _check_elastic(state: TrainState, world: int, order: str, slots: int, rank: int) -> None:
    """A resume on another rank count (elastic): say what the data position guarantees. ``state`` is the
    checkpoint's; ``order`` and ``slots`` this run's."""
    if not state.num_ranks or state.num_ranks == world or rank != 0:
        return
    if order != "shards":
        log.warning("resuming a %d-rank checkpoint on %d ranks with data.order=resampled: each rank's stream "
                    "is seeded by its rank, so the samples after the resume differ from an uninterrupted run's "
                    "(data.order=shards keeps them)", state.num_ranks, world)
        return
    if state.virtual_slots and slots != state.virtual_slots:
        log.warning("resuming with data.virtual_slots=%d but the checkpoint's run used %d: the data order changes "
                    "(set data.virtual_slots=%d to keep it)", slots, state.virtual_slots, state.virtual_slots)
    else:
        log.info("elastic resume: %d ranks → %d, same data order (%d slots) from step %d", state.num_ranks, world,
                 slots, state.step)


def _batches(w: Worker) -> Tuple[Iterator[Dict[str, Any]], Optional[Callable]]:
    """The data builder: this rank's micro-batches from its data position, and the stage's on-device
    augmentation (``augment_on``)."""
    d, plan, rank = w.cfg.data, w.plan, w.ctx.rank
    stream = ShardStream(w.stage.stream_specs(w.sub, plan), img_size=w.cfg.model.img_size, rank=rank,
                         world_size=w.ctx.world_size, batches_per_epoch=plan.steps_per_epoch * plan.grad_accum,
                         seed=w.cfg.run.seed, shuffle_buffer=d.shuffle_buffer, uint8=d.uint8, draft=d.draft_decode,
                         start_batch=w.state.micro_batch, num_lanes=max(1, d.num_loader_workers), decode=d.decode,
                         transform_factory=partial(build_transform, scale=d.crop_scale, ratio=d.crop_ratio,
                                                   interpolation=d.interpolation),
                         max_member_bytes=d.max_member_bytes, order=d.order, virtual_slots=w.state.virtual_slots)
    device_aug = w.stage.device_augment(w.sub, plan, rank)
    batches = iter(make_loader(stream, d.num_loader_workers, pin_memory=w.fast.pin_memory))
    if d.replay_batches:                                   # benchmarks: the loop without the loader
        batches = replay(batches, d.replay_batches, pin_memory=w.fast.pin_memory)
        if rank == 0:
            log.warning("data.replay_batches=%d: training on the same %d micro-batches over and over",
                        d.replay_batches, d.replay_batches)
    return batches, device_aug


def _loop(w: Worker, batches: Iterator[Dict[str, Any]], device_aug: Optional[Callable], mlog: MetricsLogger,
          evaluator: Evaluator, ckpt: CheckpointManager, watchdog: faults.StallWatchdog) -> None:
    """Optimizer steps until ``plan.total_steps``; each part that owns a cadence is asked about each step."""
    plan, state, train = w.plan, w.state, w.cfg.train
    grad_accum, batches_per_epoch = plan.grad_accum, plan.steps_per_epoch * plan.grad_accum
    gather = gather_ctx(w.zero_stage)
    window, corrupt_by_lane = step.DeviceMetrics(w.device), {}     # summed on the device, read per log step
    w.engine.train()
    while state.step < plan.total_steps:
        lr = warmup_cosine(state.step, plan.total_steps, plan.effective_lr, plan.warmup_steps, w.cfg.optim.min_lr)
        set_lr(w.optimizer, lr)
        digest, batch = step.train_step(w.task, w.engine, batches, grad_accum, state.step, w.device, window,
                                        corrupt_by_lane, gather, device_aug=device_aug, beat=watchdog.beat)
        state.advance(grad_accum, batches_per_epoch, plan.global_batch)
        if train.preview_every and state.step % train.preview_every == 0:
            w.stage.preview(w.task, batch, state.step, plan.run_url, mlog.log, w.ctx.rank)
        save, evaluate = ckpt.should_save(state.step), evaluator.should_eval(state.step)
        if not (save or evaluate or mlog.should_log(state.step)):
            continue
        watchdog.beat(f"step {state.step}: metrics/checkpoint")
        record = mlog.record(state, lr, window, corrupt_by_lane, digest)    # every rank: collectives
        if evaluate:
            record.update(evaluator.run(w.task, w.engine, state, watchdog.beat))
        mlog.write(record)
        if save:
            mlog.sync()
            ckpt.save(w.engine, w.task, state, record)
        else:
            w.ctx.report(record)


def _export(w: Worker, mlog: MetricsLogger, watchdog: faults.StallWatchdog) -> None:
    """The consolidated weights to ``<run>/export/model.safetensors`` (every rank takes part in the ZeRO-3
    gather; rank 0 writes), then the metrics' final sync."""
    watchdog.beat("export")
    sd = export_state_dict(w.stage, w.sub, w.task, w.engine, w.zero_stage, w.ctx.rank)
    url = storage.join(w.plan.run_url, "export", "model.safetensors")
    if w.ctx.rank == 0:
        write_export(w.stage, w.sub, w.plan, w.task, sd, url)
        log.debug("[%s] weights: %s", w.label, url)
    mlog.close()
    collectives.barrier()
