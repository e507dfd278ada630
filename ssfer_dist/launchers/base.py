"""The launcher interface and what every launcher shares on the driver: the pre-flight, the machine's GPU
check, the run's result.

Pre-flight (before any worker starts): the config is valid, every shard manifest and shard URL is readable,
``init.weights`` exists, the storage is writable. Each failure is a one-line ``UserError`` naming the key path
or URL. It returns the :class:`~ssfer_dist.plan.LaunchPlan` (derived once, handed to every worker).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Tuple

import yaml

from ssfer_dist import storage
from ssfer_dist.config import Config, absolute_paths, derived, to_dict
from ssfer_dist.shards.manifest import read_manifest
from ssfer_dist.errors import UserError
from ssfer_dist.stages import get_stage
from ssfer_dist.stages.base import StageConfigs
from ssfer_dist.train import fastpath
from ssfer_dist.plan import LaunchPlan, UnlabeledPlan
from ssfer_dist.typed import ConfigError

__all__ = ["Launcher", "RunResult", "run_url", "preflight", "dry_run_text", "check_gpus", "gpus_needed",
           "on_cluster", "check_fast_path_local", "planned_steps", "export_url"]


@dataclasses.dataclass
class RunResult:
    """What a finished stage left behind."""

    run_url: str
    export_path: str
    metrics: Dict[str, Any]
    checkpoint: Optional[str] = None


class Launcher:
    """Runs one stage's workers. Driver side: :meth:`plan` (machine checks + pre-flight), :meth:`start`,
    :meth:`wait` (a :class:`RunResult`, or ``faults.RunFailed`` carrying the one-line cause)."""

    name = "abstract"

    def __init__(self, config_dir: Optional[str] = None, file_stem: Optional[str] = None) -> None:
        # where a config built in code is written when the workers read it from a file (torchrun), as
        # ``config_dir/<file_stem or run.name>.yaml`` (kept for the user; default: a temporary folder)
        self.config_dir, self.file_stem = config_dir, file_stem

    def check_machine(self, cfg: Config) -> None:
        """What this machine must offer before anything is read or written."""
        check_gpus(cfg)
        check_fast_path_local(cfg)

    def plan(self, cfg: Config) -> LaunchPlan:
        self.check_machine(cfg)
        return preflight(cfg)

    def start(self, cfg: Config, plan: LaunchPlan, label: str) -> Any:
        raise NotImplementedError

    def wait(self, handle: Any) -> RunResult:
        raise NotImplementedError

    def run(self, cfg: Config, plan: Optional[LaunchPlan] = None, label: Optional[str] = None) -> RunResult:
        """One stage to its final step (resuming from the run's newest checkpoint, if any)."""
        cfg = absolute_paths(cfg)           # configs built in code (from_dict) may hold relative paths
        plan = plan if plan is not None else self.plan(cfg)
        return self.wait(self.start(cfg, plan, label or plan.stage))

    def run_from_cli(self, config_path: str, overrides: List[str], cfg: Config) -> int:
        """``ssfer run CONFIG --launcher NAME`` → exit code (prints the result as one JSON line)."""
        raise NotImplementedError

    def finish(self, ok: bool) -> Optional[str]:
        """At the end of a command: release what this launcher started; returns a folder of logs kept."""
        return None


def abs_storage(url: str) -> str:
    return url if storage.is_s3(url) else os.path.abspath(url)


def run_url(cfg: Config) -> str:
    return storage.join(abs_storage(cfg.run.storage), cfg.run.name)


def export_url(run: str) -> str:
    return storage.join(run, "export", "model.safetensors")


# ------------------------------------------------------------------------------------------ pre-flight


def _read_manifest(url: str, key: str):
    try:
        return read_manifest(url, with_index=False)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None


def _check_shards(manifest, key: str) -> List[str]:
    urls = manifest.shard_urls()
    if not urls:
        raise UserError(f"{key}: {manifest.url}: the manifest lists no shards")
    # One listing of the manifest's folder (a few requests for thousands of shards on S3) instead of a
    # request per shard; shards stored elsewhere are checked one by one.
    base = manifest.url.rstrip("/") + "/"
    present = set(storage.list_files(manifest.url))
    for u in urls:
        found = u[len(base):] in present if u.startswith(base) else storage.exists(u)
        if not found:
            raise UserError(f"{key}: shard {u} listed in {manifest.url}/manifest.parquet is missing")
    return urls


def _unlabeled(cfg: Config, needs_unlabeled: bool) -> Tuple[Tuple[UnlabeledPlan, ...], int, List[str]]:
    """The unlabeled sources' plans; sample ids run over all of them: source after source, shard after shard."""
    out, datasets, first = [], [], 0
    for i, u in enumerate(cfg.data.unlabeled if needs_unlabeled else []):
        key = f"data.unlabeled[{i}].shards"
        m = _read_manifest(u.shards, key)
        datasets.append(m.dataset)
        offsets = []
        for s in m.shards:
            offsets.append(first)
            first += s.num_samples
        out.append(UnlabeledPlan(urls=tuple(_check_shards(m, key)), weight=u.weight, num_samples=m.num_samples,
                                 offsets=tuple(offsets), counts=tuple(int(s.num_samples) for s in m.shards)))
    return tuple(out), first, datasets


def _eval_set(cfg: Config, labeled) -> Tuple[List[str], int]:
    if not cfg.eval.shards:
        return [], 0
    em = _read_manifest(cfg.eval.shards, "eval.shards")
    if em.num_classes == 0:
        raise UserError(f"eval.shards: {em.url} is unlabeled; evaluation needs labeled shards")
    if em.num_classes != labeled.num_classes:
        raise UserError(f"eval.shards: {em.url} has {em.num_classes} classes, data.shards {labeled.num_classes}")
    return _check_shards(em, "eval.shards"), em.num_samples


def _check_weights(cfg: Config) -> None:
    if cfg.init.weights:
        w = cfg.init.weights
        if os.path.isdir(w):
            w = os.path.join(w, "model.safetensors")
        if not storage.exists(w):
            raise UserError(f"init.weights: {w}: weights file not found")


def preflight(cfg: Config, check_storage: bool = True) -> LaunchPlan:
    """Validate everything a run needs before a worker starts; returns the launch plan (derived once)."""
    cfg = absolute_paths(cfg)
    stage = get_stage(cfg.train.stage)
    labeled = _read_manifest(cfg.data.shards, "data.shards")
    urls = _check_shards(labeled, "data.shards")
    if stage.needs_labels and labeled.num_classes == 0:
        raise UserError(f"data.shards: {labeled.url} is unlabeled; stage {stage.name!r} needs labeled shards")
    unl, num_unlabeled, unl_datasets = _unlabeled(cfg, stage.needs_unlabeled)
    _check_weights(cfg)
    eval_urls, eval_n = _eval_set(cfg, labeled)
    d = derived(cfg, labeled.num_samples)
    datasets = [labeled.dataset] + unl_datasets
    plan = LaunchPlan(
        stage=stage.name, run_url=run_url(cfg), shard_urls=tuple(urls), num_samples=labeled.num_samples,
        image_size=labeled.image_size, num_ranks=d["num_ranks"], batch_size_per_rank=d["batch_size_per_rank"],
        grad_accum=d["grad_accum"], global_batch=d["global_batch"], effective_lr=d["effective_lr"],
        steps_per_epoch=d["steps_per_epoch"], total_steps=d["total_steps"], warmup_steps=d["warmup_steps"],
        num_classes=labeled.num_classes if stage.needs_labels else 0,
        class_names=tuple(labeled.class_names) if stage.needs_labels else (),
        unlabeled=unl, num_unlabeled=num_unlabeled,
        register_s3=any(storage.is_s3(x) for x in [cfg.data.shards, cfg.eval.shards or ""]
                        + [u.shards for u in cfg.data.unlabeled]),
        datasets=tuple(dict.fromkeys(d for d in datasets if d)), eval_urls=tuple(eval_urls), eval_num_samples=eval_n,
        shard_counts=tuple(int(s.num_samples) for s in labeled.shards))
    stage.preflight(StageConfigs.of(cfg), plan)
    if check_storage:
        try:
            storage.check_writable(abs_storage(cfg.run.storage))
        except UserError as e:
            raise UserError(f"run.storage: {e}") from None
    return plan


def planned_steps(cfg: Config) -> int:
    """A stage's optimizer steps as far as known before it starts (0 when its manifest is unreadable)."""
    try:
        num = _read_manifest(cfg.data.shards, "data.shards").num_samples
    except UserError:
        num = None
    return int(derived(cfg, num).get("total_steps") or 0)


def dry_run_text(cfg: Config, source: str) -> str:
    """The resolved config and the batch arithmetic (manifest sample count when readable)."""
    num_samples = None
    note = ""
    try:
        num_samples = _read_manifest(cfg.data.shards, "data.shards").num_samples
    except UserError as e:
        note = f"# manifest not readable ({e}); steps per epoch unknown\n"
    d = derived(cfg, num_samples)
    lines = [f"# resolved config: {source}", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "",
             "# derived (computed, never written back)"]
    lines += [f"{k}: {v}" for k, v in d.items()]
    lines.append(f"# global_batch = batch_size_per_rank {cfg.data.batch_size_per_rank} x ranks "
                 f"{cfg.scaling.num_workers} x grad_accum {cfg.train.grad_accum} = {d['global_batch']}")
    if cfg.optim.lr is None:
        lines.append(f"# effective_lr = base_lr {cfg.optim.base_lr:g} x {d['global_batch']} / 256"
                     f" = {d['effective_lr']:g}")
    lines += ["", "# fast path on this machine (each worker resolves the automatic switches on its own device)"]
    lines += fast_path_lines(cfg)
    return "\n".join(lines) + "\n" + note


# ------------------------------------------------------------------------------------ this machine


def local_device(cfg: Config) -> str:
    """The device type a worker on this machine would train on."""
    import torch

    return "cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu"


def fast_path_lines(cfg: Config) -> List[str]:
    dev = local_device(cfg)
    try:
        lines = fastpath.describe(fastpath.resolve(cfg, dev))
    except ConfigError as e:
        return [f"# error on this machine: {e}"]
    if cfg.scaling.use_gpu and dev == "cpu":
        lines.append("# scaling.use_gpu: true but this machine has no CUDA: on CUDA workers the automatic switches "
                     "(null) turn on data.pin_memory, optim.fused, train.compile (ZeRO 0-2), and train.tf32 applies")
    return lines


def on_cluster() -> bool:
    """``RAY_ADDRESS`` names a cluster (``local`` asks Ray for a new local instance: this machine)."""
    return os.environ.get("RAY_ADDRESS", "") not in ("", "local")


def check_fast_path_local(cfg: Config) -> None:
    """On a local run the workers share this machine: an explicit ``train.compile: true`` without a compiler
    fails here, before any worker starts (on a cluster each worker checks its own machine)."""
    if on_cluster():
        return
    fastpath.resolve(cfg, local_device(cfg))


def gpus_needed(cfg: Config) -> float:
    sc = cfg.scaling
    return sc.num_workers * float(sc.gpus_per_worker or 1.0) if sc.use_gpu else 0.0


def check_gpus(cfg: Config, local_ranks: Optional[int] = None) -> None:
    """``scaling.use_gpu`` on this machine: it must have the GPUs for the ranks that run here (``local_ranks``,
    default: every worker of the run), else one clear error before any worker starts."""
    if not cfg.scaling.use_gpu:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have == 0:
        raise UserError("scaling.use_gpu: true, but this machine has no CUDA GPU (torch.cuda.is_available() is "
                        "False) and no Ray cluster is given (RAY_ADDRESS); set scaling.use_gpu: false to train on "
                        "the CPU, or submit the run to a GPU cluster")
    if local_ranks is not None:
        if have < local_ranks:
            raise UserError(f"scaling.use_gpu: true, but this machine has {have} CUDA GPU(s) for {local_ranks} "
                            "local ranks (torchrun --nproc-per-node); set scaling.use_gpu: false to train on the CPU")
        return
    need = gpus_needed(cfg)
    if have < need:
        raise UserError(f"scaling.use_gpu: {cfg.scaling.num_workers} workers x {cfg.scaling.gpus_per_worker or 1.0:g} "
                        f"GPU need {need:g} GPUs, this machine has {have}; lower scaling.num_workers")
