"""The one step loop for every stage, run by each worker of either launcher (Ray Train or torchrun).

Per optimizer step: lr from the schedule (a pure function of the step) → ``grad_accum`` micro-batches
(task forward → ``engine.backward`` → ``engine.step``) → task hook (EMA teacher) → metrics → maybe a
checkpoint. Every rank reports to its launcher's context (:mod:`ssfer_dist.distributed.context`) the same
number of times (every ``log_every`` steps, and with a checkpoint every ``checkpoint.every_steps`` and at
the end). At the end the consolidated weights go to ``<storage>/<run>/export/model.safetensors``.
"""
from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from functools import partial
from typing import Any, Dict

import numpy as np
import torch

from ssfer_dist import storage
from ssfer_dist.config import DebugCfg, from_dict
from ssfer_dist.distributed import checkpoint as ckpt_mod
from ssfer_dist.distributed import collectives, faults
from ssfer_dist.distributed.context import WorkerContext
from ssfer_dist.distributed.engine import (
    build_engine,
    build_optimizer,
    consolidated_state_dict,
    ds_config,
    engine_dtype,
    gather_ctx,
    set_lr,
)
from ssfer_dist.stages import get_stage
from ssfer_dist.stages.base import StageConfigs
from ssfer_dist.train import fastpath
from ssfer_dist.plan import LaunchPlan
from ssfer_dist.train.schedule import warmup_cosine
from ssfer_dist.train.state import TrainState
from ssfer_dist.train.step import DeviceMetrics, train_step
from ssfer_dist.worker_env import check_s3_credentials

log = logging.getLogger(__name__)

__all__ = ["train_loop_per_worker", "run_worker", "InjectedFault"]


class InjectedFault(RuntimeError):
    """Raised by the test-only fault-injection hook (``debug.fail_at_step``)."""


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _fault_due(d: DebugCfg, step: int, rank: int, kinds) -> bool:
    """Whether the test-only fault fires here (once per marker file)."""
    if d.fail_at_step is None or step != d.fail_at_step or rank != d.fail_rank or d.fail_kind not in kinds:
        return False
    if d.fail_marker:
        if os.path.exists(d.fail_marker):
            return False
        with open(d.fail_marker, "w") as f:
            f.write(f"{d.fail_kind} at step {step} on rank {rank}\n")
    return True


def _maybe_fail(d: DebugCfg, step: int, rank: int) -> None:
    if not _fault_due(d, step, rank, ("error", "stall")):
        return
    if d.fail_kind == "stall":          # a frozen worker: only the watchdog / collective timeouts end this
        log.warning("injected stall at step %d on rank %d", step, rank)
        while True:
            time.sleep(3600)
    raise InjectedFault(f"injected fault at step {step} on rank {rank}")


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


def export_state_dict(stage, sub: StageConfigs, task, engine, zero_stage: int, rank: int):
    """The weights to export, full and fp32 on rank 0 (None elsewhere): the stage's ``eval_module`` (model
    EMA, semisup teacher: full copies on every rank, nothing to gather) or else the trained module
    (consolidated: every rank takes part in the ZeRO-3 gather)."""
    em = stage.eval_module(sub, task)
    if em is None:
        return consolidated_state_dict(engine, zero_stage)
    if rank != 0:
        return None
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
            for k, v in em.state_dict().items()}


def hparams(cfg, plan: LaunchPlan) -> Dict[str, Any]:
    """The run's hyper-parameters for TensorBoard: the config tree (flat keys; run/debug/failure housekeeping
    left out) plus the plan's derived values (``plan.*``)."""
    from ssfer_dist.config import to_dict
    from ssfer_dist.train.metrics import flatten

    tree = {k: v for k, v in to_dict(cfg).items() if k not in ("debug", "failure")}
    out = flatten(tree)
    for k in ("num_ranks", "global_batch", "effective_lr", "steps_per_epoch", "total_steps", "warmup_steps",
              "num_samples", "num_classes", "eval_num_samples"):
        out[f"plan.{k}"] = getattr(plan, k)
    return out


def write_export(stage, sub: StageConfigs, plan: LaunchPlan, task, sd, url: str, extra_json=None) -> None:
    """Rank 0: the stage's export of ``sd`` to ``url`` (``…/model.safetensors``), plus ``eval.json`` beside it
    when ``extra_json`` is given."""
    import json

    from ssfer_dist.models.io import save_weights

    state_dict, meta = stage.export(sub, plan, task, sd)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model.safetensors")
        save_weights(local, state_dict, meta)
        storage.put_file(local, url)
        if extra_json is not None:
            storage.put_bytes(storage.join(url.rsplit("/", 1)[0], "eval.json"),
                              json.dumps(extra_json, indent=2, sort_keys=True).encode())


def evaluate_now(stage, sub: StageConfigs, task, engine, evaluator, dtype) -> Dict[str, Any]:
    """One evaluation of what the stage evaluates (``eval_module``, else the trained module in eval mode);
    every rank takes part. Returns the ``eval_*`` record keys."""
    from ssfer_dist.train.evaluation import eval_record

    em = stage.eval_module(sub, task)
    if em is not None:
        return eval_record(evaluator.metrics(em, None), "ema")
    engine.module.eval()
    try:
        m = evaluator.metrics(engine, None if dtype == torch.float32 else dtype)
    finally:
        engine.module.train()
    return eval_record(m, "trained")


def train_loop_per_worker(payload: Dict[str, Any]) -> None:
    """Ray Train worker entry point. ``payload``: ``config`` (plain dict) and ``plan`` (the
    :class:`~ssfer_dist.plan.LaunchPlan` computed once by the launcher: steps, lr, global batch,
    shard URLs, class names, run URL; read here, never recomputed)."""
    from ssfer_dist.distributed.context import RayContext
    from ssfer_dist.startup import relax_gc

    relax_gc()      # a cluster's workers too (a private Ray's start relaxed): timm, DeepSpeed and the build follow
    run_worker(payload, RayContext(payload["plan"].run_url))


def run_worker(payload: Dict[str, Any], ctx: WorkerContext) -> None:
    """The loop under any launcher: ``ctx`` gives rank/world, the checkpoint to resume and the reporting."""
    cfg = from_dict(payload["config"])
    plan: LaunchPlan = payload["plan"]
    rank = ctx.rank
    # Bounded waits: the watchdog ends this worker (one-line cause in <run>/_faults/) when the loop makes no
    # progress for failure.stall_timeout_s; a permanent fault is raised as PermanentFault (Ray does not retry).
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


def _train(cfg, plan: LaunchPlan, payload: Dict[str, Any], watchdog: "faults.StallWatchdog",
           ctx: WorkerContext) -> None:
    from ssfer_dist.data.pipeline import ShardStream, make_loader
    from ssfer_dist.data.transforms import build_transform

    stage = get_stage(plan.stage)
    sub = StageConfigs.of(cfg)
    for k, v in payload.get("env", {}).items():
        if k.startswith("AWS_"):        # the storage the driver checked in pre-flight, not a stale one
            os.environ[k] = v
        else:
            os.environ.setdefault(k, v)
    # DeepSpeed's accelerator must match this worker's devices (read before deepspeed is imported)
    os.environ["DS_ACCELERATOR"] = "cuda" if (cfg.scaling.use_gpu and torch.cuda.is_available()) else "cpu"
    storage.set_retry_budget(cfg.run.storage_retry_s)
    if plan.register_s3 or storage.is_s3(plan.run_url):
        check_s3_credentials(f"run {plan.run_url}")
    if plan.register_s3:
        storage.register_webdataset_s3()
    collectives.maybe_install_guard()           # test-only (SSFER_COMM_GUARD=1)
    rank, world = ctx.rank, ctx.world_size
    ctx.setup_logging()                           # Ray: rank 0's lines reach the console; the rest the log file
    label = payload.get("label") or plan.stage
    device = torch.device("cuda", ctx.local_rank) if cfg.scaling.use_gpu and torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    fast = fastpath.resolve(cfg, device.type)   # this worker's device decides the automatic switches
    fastpath.apply_backend_flags(fast)
    if rank == 0:
        log.info("[%s] fast path: %s", label, fastpath.summary(fast))

    total = plan.total_steps
    ga = plan.grad_accum
    seeds = {"base": cfg.run.seed, "model": cfg.run.seed, "rank": cfg.run.seed * 1000 + rank}
    _seed_all(seeds["model"])                    # identical initial weights on every rank
    if world != plan.num_ranks:
        raise RuntimeError(f"the launch plan is for {plan.num_ranks} ranks, {ctx.name} started {world}")
    task, trainable = stage.build_task(sub, plan, device)
    fastpath.apply_to_model(fast, trainable)    # grad checkpointing, torch.compile (in place: names kept)
    groups = stage.param_groups(sub, trainable)
    optimizer = build_optimizer(groups, cfg.optim, plan.effective_lr, fused=fast.fused)
    watchdog.beat("DeepSpeed initialisation")
    engine = build_engine(trainable, optimizer, ds_config(cfg.train, plan.batch_size_per_rank, plan.global_batch))
    gather = gather_ctx(cfg.train.zero_stage)

    state = TrainState(stage=plan.stage, seeds=seeds)
    watchdog.beat("checkpoint restore")
    resume_from = ctx.latest_checkpoint()
    if rank == 0:                                # no partial checkpoint survives (nothing else writes now)
        keep = [os.path.basename(resume_from.path.rstrip("/"))] if resume_from is not None else []
        ckpt_mod.sweep_incomplete(plan.run_url, keep=keep)
    resumed = ckpt_mod.restore(resume_from, engine, task)
    if resumed is not None:
        state = resumed
        # the data position is the step: with another rank count (elastic resume: grad_accum keeps the global
        # batch) this rank's next micro-batch is step x grad_accum, whatever the saving run's split was
        state.micro_batch = state.step * ga
    # data.order "shards": the slots the order is cut into — the config's, else the resumed run's (an elastic
    # resume keeps its order), else ranks x loader lanes
    prior = state.virtual_slots if resumed is not None and state.data_order == "shards" else 0
    slots = cfg.data.virtual_slots or prior or world * max(1, cfg.data.num_loader_workers)
    if resumed is not None:
        _check_elastic(state, world, cfg.data.order, slots, rank)
        log.info("rank %d resumed at step %d (micro-batch %d, data epoch %d)", rank, state.step,
                 state.micro_batch, state.data_epoch)
    state.num_ranks, state.data_order, state.virtual_slots = world, cfg.data.order, slots
    _seed_all(seeds["rank"] + 7919 * state.step)

    metrics_log = None
    if rank == 0:
        from ssfer_dist.train.metrics import MetricsLog

        metrics_log = MetricsLog(plan.run_url, tensorboard=cfg.train.tensorboard, class_names=plan.class_names)
        metrics_log.truncate_after(state.step)
        metrics_log.log_hparams(hparams(cfg, plan))

    bpe = plan.steps_per_epoch * ga             # micro-batches per epoch per rank
    d = cfg.data
    stream = ShardStream(stage.stream_specs(sub, plan), img_size=cfg.model.img_size, rank=rank,
                         world_size=world, batches_per_epoch=bpe, seed=cfg.run.seed,
                         shuffle_buffer=d.shuffle_buffer, uint8=d.uint8,
                         draft=d.draft_decode, start_batch=state.micro_batch,
                         num_lanes=max(1, d.num_loader_workers), decode=d.decode,
                         transform_factory=partial(build_transform, scale=d.crop_scale, ratio=d.crop_ratio,
                                                   interpolation=d.interpolation),
                         max_member_bytes=d.max_member_bytes, order=d.order, virtual_slots=state.virtual_slots)
    device_aug = stage.device_augment(sub, plan, rank)    # mae/weak geometry on this device (augment_on)
    from ssfer_dist.startup import settle_gc

    settle_gc()          # start-up is over: the collector's thresholds back, what it allocated frozen (pre-fork)
    batches = iter(make_loader(stream, cfg.data.num_loader_workers, pin_memory=fast.pin_memory))
    if d.replay_batches:                                   # benchmarks: the loop without the loader
        from ssfer_dist.data.pipeline import replay

        batches = replay(batches, d.replay_batches, pin_memory=fast.pin_memory)
        if rank == 0:
            log.warning("data.replay_batches=%d: training on the same %d micro-batches over and over",
                        d.replay_batches, d.replay_batches)
    evaluator = None
    if plan.eval_urls:                           # evaluation while training (eval.shards)
        from ssfer_dist.train.evaluation import TrainingEval

        evaluator = TrainingEval(plan.eval_urls, plan.class_names, cfg.model.img_size,
                                 cfg.eval.batch_size_per_rank, rank, world, device, d.max_member_bytes)

    global_batch = plan.global_batch
    corrupt_by_lane: Dict[int, int] = {}
    corrupt_base = state.corrupt_samples
    t_last, step_last = time.time(), state.step
    metrics = DeviceMetrics(device)             # summed on the device, read once per log step
    engine.train()
    while state.step < total:
        lr = warmup_cosine(state.step, total, plan.effective_lr, plan.warmup_steps, cfg.optim.min_lr)
        set_lr(optimizer, lr)
        keys_digest, batch = train_step(task, engine, batches, ga, state.step, device, metrics, corrupt_by_lane,
                                        gather, device_aug=device_aug, beat=watchdog.beat)
        _maybe_fail(cfg.debug, state.step, rank)
        state.step += 1
        state.micro_batch += ga
        state.data_epoch = state.micro_batch // bpe
        state.samples_seen += global_batch

        is_last = state.step >= total
        do_ckpt = is_last or (cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0)
        do_eval = evaluator is not None and (is_last or (cfg.eval.every_steps > 0
                                                         and state.step % cfg.eval.every_steps == 0))
        do_log = do_ckpt or do_eval or state.step % cfg.train.log_every == 0
        if cfg.train.preview_every and state.step % cfg.train.preview_every == 0:
            stage.preview(task, batch, state.step, plan.run_url, metrics_log, rank)
        if not do_log:
            continue
        watchdog.beat(f"step {state.step}: metrics/checkpoint")
        # ---- metrics (all ranks take part in the reductions and in the report)
        avg = metrics.read(collectives.all_reduce_sum)   # the window's one host read
        state.corrupt_samples = corrupt_base + collectives.sum_ints([sum(corrupt_by_lane.values())])[0]
        now = time.time()
        sps = (state.step - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, state.step
        record = {"step": state.step, "lr": lr, "epoch": state.micro_batch / bpe, "samples_seen": state.samples_seen,
                  "steps_per_s": sps, "images_per_s": sps * global_batch, "corrupt_samples": state.corrupt_samples,
                  "data_position": state.micro_batch, "batch_digest": keys_digest, "time": now}
        record.update(avg)
        if do_eval:
            watchdog.beat(f"step {state.step}: evaluation")
            ev = evaluate_now(stage, sub, task, engine, evaluator, engine_dtype(cfg.train))
            value = ev[f"eval_{cfg.eval.best_metric}"]
            best = state.best_eval is None or value > state.best_eval   # the same on every rank
            ev["eval_best"] = bool(best)
            record.update(ev)
            if best:
                state.best_eval, state.best_step = value, state.step
                watchdog.beat(f"step {state.step}: export/best")
                sd_best = export_state_dict(stage, sub, task, engine, cfg.train.zero_stage, rank)
                if rank == 0:
                    write_export(stage, sub, plan, task, sd_best,
                                 storage.join(plan.run_url, "export", "best", "model.safetensors"),
                                 {"step": state.step, "metric": cfg.eval.best_metric, **ev})
            if rank == 0:
                log.info("[%s] step %d eval: accuracy %.4f  mean class accuracy %.4f  macro-F1 %.4f%s", label,
                         state.step, ev["eval_accuracy"], ev["eval_mean_class_accuracy"], ev["eval_macro_f1"],
                         "  (best)" if best else "")
        if metrics_log is not None:
            from ssfer_dist.train.metrics import format_progress

            metrics_log.write(record)
            loss = record.get("loss", float("nan"))
            log.info(format_progress(label, state.step, total, sps, sps * global_batch, loss, lr),
                     extra={"ssfer_progress": {"label": label, "step": state.step, "total": total, "sps": sps,
                                               "ips": sps * global_batch, "loss": loss, "lr": lr}})
        if do_ckpt:
            if metrics_log is not None:
                metrics_log.sync()
            upload_fault = _fault_due(cfg.debug, state.step, rank, ("enospc_upload",))
            ckpt_mod.save_and_report(ctx, engine, task, state, record, plan.run_url, upload_fault=upload_fault,
                                     num_to_keep=cfg.checkpoint.num_to_keep)
        else:
            ctx.report(record)

    # ---- export consolidated weights (every rank takes part in the ZeRO-3 gather)
    watchdog.beat("export")
    sd = export_state_dict(stage, sub, task, engine, cfg.train.zero_stage, rank)
    export_url = storage.join(plan.run_url, "export", "model.safetensors")
    if rank == 0:
        write_export(stage, sub, plan, task, sd, export_url)
        log.debug("[%s] weights: %s", label, export_url)
        if metrics_log is not None:
            metrics_log.close()
    collectives.barrier()
