"""One typed, frozen config tree for every training stage, loaded from YAML.

YAML sections map 1:1 onto the dataclasses below. Unknown keys and wrong types are rejected with
the key path (``optim.base_lr: expected float, got 'abc'``). ``--set a.b=value`` overrides are
parsed with YAML scalar typing and validated the same way. Derived values (global batch, effective
learning rate, steps) are computed by :func:`derived` — printed by ``--dry-run`` and logged, never
written back into the tree (DESIGN rule 3).

This module checks the keys every stage shares. What depends on the stage (``train.stage`` naming a
registered one, the stage's own cross-field checks) is checked by the stage registry, which imports this
module and not the other way round: :func:`ssfer_dist.stages.load_stage_config` loads a config for a run.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple

import yaml

from ssfer_dist.typed import ConfigError, check_key_path
from ssfer_dist.typed import build as _build

__all__ = [
    "Config", "RunCfg", "ScalingCfg", "FailureCfg", "CheckpointCfg", "ModelCfg", "InitCfg", "DataCfg",
    "UnlabeledSource", "OptimCfg", "TrainCfg", "EvalCfg", "FaceMixCfg", "SemiSupCfg", "ThresholdCfg",
    "LinearProbeCfg",
    "PipelineCfg", "load_config", "load_pipeline", "from_dict", "to_dict", "apply_overrides", "derived",
    "ConfigError",
]




@dataclass(frozen=True)
class RunCfg:
    name: str = "run"                 # run folder name under storage
    storage: str = "runs"             # local folder or s3://bucket/prefix
    seed: int = 0
    storage_retry_s: float = 120.0    # transient S3 faults (connection lost, 5xx, throttling) retried this long
    ray_dashboard: bool = False       # a local Ray (no RAY_ADDRESS) starts its dashboard (off: a quieter, leaner start)


@dataclass(frozen=True)
class ScalingCfg:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0      # 0 with use_gpu -> 1 GPU per worker
    resources_per_worker: Dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FailureCfg:
    max_failures: int = 0
    # Every wait is bounded (see distributed/faults.py): a collective waiting on a dead/frozen peer raises
    # after collective_timeout_s; a worker whose loop makes no progress for stall_timeout_s ends the run
    # with a one-line cause (0: no watchdog); a worker group that cannot start (resources, placement)
    # within start_timeout_s fails the attempt, and such attempts are retried at most max_failures times.
    collective_timeout_s: int = 600
    stall_timeout_s: float = 900.0
    start_timeout_s: float = 120.0


@dataclass(frozen=True)
class CheckpointCfg:
    every_steps: int = 0              # 0: only at the end
    num_to_keep: int = 2


@dataclass(frozen=True)
class ModelCfg:
    size: Literal["micro", "tiny", "small", "base", "large", "huge"] = "base"
    img_size: int = 224
    patch_size: int = 16
    # MAE
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    # classifier
    global_pool: Literal["token", "avg"] = "token"
    drop_path: float = 0.1
    grad_checkpointing: bool = False  # activation checkpointing of the ViT/MAE blocks (memory for compute)


@dataclass(frozen=True)
class InitCfg:
    weights: Optional[str] = None     # safetensors file or export/ folder of the previous stage


@dataclass(frozen=True)
class UnlabeledSource:
    shards: str = ""                  # shard folder/URL holding manifest.parquet
    weight: float = 1.0               # mixing weight among unlabeled sources


@dataclass(frozen=True)
class DataCfg:
    shards: str = ""                  # (labeled) shard folder/URL holding manifest.parquet
    unlabeled: List[UnlabeledSource] = field(default_factory=list)   # semisup only
    batch_size_per_rank: int = 64     # labeled / MAE images per rank per micro-step
    mu: int = 1                       # unlabeled : labeled batch ratio (semisup)
    num_loader_workers: int = 2       # DataLoader worker processes per rank
    shuffle_buffer: int = 1000
    uint8: bool = True                # ship uint8 tensors, normalise on device
    draft_decode: bool = True         # PIL Image.draft reduced-size JPEG decode when upsampling is not needed
    augment_on: Literal["cpu", "device"] = "device"   # mae/weak crop+flip+resize: batched on the training device
    decode: Literal["cpu", "device"] = "cpu"          # device: workers ship JPEG bytes, decoded in batch there
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"   # RandomResizedCrop's resize
    crop_scale: Tuple[float, float] = (0.2, 1.0)      # RandomResizedCrop area fraction range
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio range
    steps_per_epoch: Optional[int] = None   # default: manifest samples // global batch
    pin_memory: Optional[bool] = None # pinned batches, asynchronous copies to the GPU (null: on with CUDA)
    max_member_bytes: int = 64 * 1024 * 1024   # tar members over this are refused (counted corrupt), never loaded
    order: Literal["resampled", "shards"] = "resampled"   # shards: the data position is a shard-level
                                      # coordinate (resume reads one shard per lane; see data/order.py)
    virtual_slots: int = 0            # order "shards": slots the order is cut into (0: ranks x loader workers);
                                      # a multiple of every rank count the run may resume with
    replay_batches: int = 0           # >0: keep the first N micro-batches in memory and cycle them (benchmarks:
                                      # the loop's speed without the loader's); 0: read the shards throughout


@dataclass(frozen=True)
class OptimCfg:
    base_lr: float = 1.5e-4           # lr = base_lr * global_batch / 256 unless lr is set
    lr: Optional[float] = None        # absolute lr (overrides the scaling rule)
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    layer_decay: Optional[float] = None   # classifier only (e.g. 0.65)
    warmup_steps: Optional[int] = None
    warmup_epochs: float = 0.0        # used when warmup_steps is not set
    fused: Optional[bool] = None      # fused AdamW kernel (null: on with CUDA)


@dataclass(frozen=True)
class TrainCfg:
    stage: str = "mae"                # a registered stage (ssfer_dist.stages): mae | facemix | semisup | linear_probe
    epochs: float = 1.0               # total steps = epochs * steps_per_epoch unless max_steps is set
    max_steps: Optional[int] = None
    grad_accum: int = 1
    grad_clip: Optional[float] = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: Literal[0, 1, 2, 3] = 2
    zero_bucket_size: int = 5_000_000 # elements per ZeRO reduce/allgather/prefetch bucket
    log_every: int = 10
    preview_every: int = 0            # MAE reconstruction PNGs every N steps (0: off)
    tensorboard: bool = True
    tf32: bool = True                 # TF32 for fp32 matmuls/convolutions on CUDA
    compile: Optional[bool] = None    # torch.compile of the model (null: on with CUDA and ZeRO 0-2)
    model_ema: bool = False           # an EMA of the weights for evaluation and export (facemix; SSFER stage 2)
    model_ema_decay: float = 0.999    # its decay per optimizer step (SSFER: 0.999)


@dataclass(frozen=True)
class EvalCfg:
    shards: Optional[str] = None      # labeled shard folder/URL evaluated while training (classifier stages)
    every_steps: int = 0              # evaluate every N optimizer steps (0: only at the end); always at the end
    batch_size_per_rank: int = 64     # eval images per rank per forward
    best_metric: Literal["accuracy", "mean_class_accuracy", "macro_f1"] = "accuracy"   # picks export/best/


@dataclass(frozen=True)
class FaceMixCfg:
    alpha: float = 1.0
    label_smoothing: float = 0.1      # on the mixed targets (and the plain-CE baseline)
    smooth_real: bool = False         # also smooth the real-image term's targets (SSFER: hard labels there)
    real_term: bool = True            # False: plain mixup (no (1 - IoU)-weighted real-image term; a baseline)
    enabled: bool = True              # False: plain supervised fine-tuning (baseline)


@dataclass(frozen=True)
class ThresholdCfg:
    kind: Literal["fixed", "dtm", "freematch", "flexmatch"] = "fixed"
    tau: float = 0.7                  # fixed
    dtm_init: float = 0.8
    dtm_momentum: float = 0.9
    dtm_every: int = 50               # steps between DTM updates
    freematch_momentum: float = 0.999
    flexmatch_tau: float = 0.95       # FlexMatch's upper threshold (scaled per class by its learning effect)
    flexmatch_warmup: bool = True     # threshold warm-up (unused samples count as a class)


@dataclass(frozen=True)
class SemiSupCfg:
    lambda_u: float = 5.0
    ema_decay: float = 0.999
    label_smoothing: float = 0.0
    threshold: ThresholdCfg = field(default_factory=ThresholdCfg)
    eval_model: Literal["student", "teacher"] = "student"   # evaluated and exported: the student or its EMA teacher


@dataclass(frozen=True)
class LinearProbeCfg:
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class Config:
    run: RunCfg = field(default_factory=RunCfg)
    scaling: ScalingCfg = field(default_factory=ScalingCfg)
    failure: FailureCfg = field(default_factory=FailureCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    init: InitCfg = field(default_factory=InitCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    facemix: FaceMixCfg = field(default_factory=FaceMixCfg)
    semisup: SemiSupCfg = field(default_factory=SemiSupCfg)
    linear_probe: LinearProbeCfg = field(default_factory=LinearProbeCfg)


@dataclass(frozen=True)
class PipelineStage:
    config: str = ""                  # stage YAML (relative to the pipeline file)
    overrides: List[str] = field(default_factory=list)   # extra --set lines for this stage


@dataclass(frozen=True)
class PipelineCfg:
    name: str = "pipeline"
    storage: Optional[str] = None     # applied to every stage (run.storage) when set
    pretrain: PipelineStage = field(default_factory=PipelineStage)
    finetune: PipelineStage = field(default_factory=PipelineStage)
    semisup: PipelineStage = field(default_factory=PipelineStage)


# --------------------------------------------------------------------------------------------- parsing


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` / ``3E+4`` as floats (YAML 1.1 needs a dot: ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml_load(text_or_stream):
    return yaml.load(text_or_stream, Loader=_Loader)


def to_dict(obj: Any) -> Any:
    """The plain (YAML-serialisable) form of a config tree."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _parse_override(item: str) -> Tuple[List[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. train.max_steps=100)")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: bad key {key!r}")
    try:
        value = _yaml_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {str(e).splitlines()[0]}") from e
    return key.split("."), value


def apply_overrides(data: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """Apply ``a.b=value`` strings onto a plain dict (values typed by YAML scalar rules)."""
    out = _deepcopy(data)
    for item in overrides or []:
        parts, value = _parse_override(item)
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"--set {'.'.join(parts)}: {'.'.join(parts[:i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def _read_yaml(path: str) -> Dict[str, Any]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = _yaml_load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: config file not found") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def from_dict(data: Dict[str, Any], source: str = "<config>") -> Config:
    """Validate a plain dict into a :class:`Config`; errors name ``source`` and the key path."""
    try:
        cfg = _build(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    _check(cfg, source)
    return cfg


def load_config(path: str, overrides: Optional[List[str]] = None) -> Config:
    """Load a stage YAML, apply ``--set`` overrides and validate. A ``--set`` key that is not in the
    config tree is reported as that ``--set`` (with the closest key), not as the YAML file."""
    data = _read_yaml(path)
    for item in overrides or []:
        parts, _ = _parse_override(item)
        check_key_path(Config, parts, f"--set {item}")
    data = apply_overrides(data, overrides or [])
    data = _expand(data)
    return absolute_paths(from_dict(data, source=path))


def _abs(url: Optional[str]) -> Optional[str]:
    if not url or "://" in url or os.path.isabs(url) or "$" in url:   # "$": an unset ${VAR}, left as written
        return url
    return os.path.abspath(url)


def absolute_paths(cfg: Config) -> Config:
    """Local paths (shards, storage, init weights) made absolute against the current directory: Ray
    workers run elsewhere. ``s3://`` URLs are left alone."""
    data = dataclasses.replace(
        cfg.data, shards=_abs(cfg.data.shards),
        unlabeled=[dataclasses.replace(u, shards=_abs(u.shards)) for u in cfg.data.unlabeled])
    return dataclasses.replace(cfg, data=data, run=dataclasses.replace(cfg.run, storage=_abs(cfg.run.storage)),
                               init=dataclasses.replace(cfg.init, weights=_abs(cfg.init.weights)),
                               eval=dataclasses.replace(cfg.eval, shards=_abs(cfg.eval.shards)))


def _expand(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _expand(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand(v) for v in data]
    if isinstance(data, str) and ("$" in data or data.startswith("~")):
        return os.path.expanduser(os.path.expandvars(data))
    return data


def load_typed(path: str, cls: Any, overrides: Optional[List[str]] = None) -> Any:
    """A YAML file (``--set`` overrides applied, ``${VAR}``/``~`` expanded) typed into dataclass ``cls``;
    errors start with the file."""
    data = _expand(apply_overrides(_read_yaml(path), overrides or []))
    try:
        return _build(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_pipeline(path: str, overrides: Optional[List[str]] = None) -> PipelineCfg:
    """Load a pipeline YAML (three stage configs); relative stage paths are relative to the file."""
    cfg = load_typed(path, PipelineCfg, overrides)
    base = os.path.dirname(os.path.abspath(path))
    stages = {}
    for name in ("pretrain", "finetune", "semisup"):
        st: PipelineStage = getattr(cfg, name)
        if not st.config:
            raise ConfigError(f"{path}: {name}.config: expected a stage YAML path")
        p = st.config if os.path.isabs(st.config) else os.path.join(base, st.config)
        stages[name] = dataclasses.replace(st, config=p)
    return dataclasses.replace(cfg, **stages)


def _check(cfg: Config, source: str) -> None:
    """Cross-field checks shared by every stage (types are already right)."""
    def err(key: str, msg: str) -> None:
        raise ConfigError(f"{source}: {key}: {msg}")

    positive_int = [("scaling.num_workers", cfg.scaling.num_workers), ("data.batch_size_per_rank",
                    cfg.data.batch_size_per_rank), ("train.grad_accum", cfg.train.grad_accum),
                    ("data.mu", cfg.data.mu), ("model.img_size", cfg.model.img_size),
                    ("model.patch_size", cfg.model.patch_size), ("train.log_every", cfg.train.log_every),
                    ("train.zero_bucket_size", cfg.train.zero_bucket_size)]
    for key, v in positive_int:
        if v < 1:
            err(key, f"expected an integer >= 1, got {v}")
    if cfg.model.img_size % cfg.model.patch_size:
        err("model.img_size", f"must be a multiple of model.patch_size ({cfg.model.patch_size}), "
                              f"got {cfg.model.img_size}")
    if not 0.0 < cfg.model.mask_ratio < 1.0:
        err("model.mask_ratio", f"expected 0 < value < 1, got {cfg.model.mask_ratio}")
    if cfg.train.max_steps is not None and cfg.train.max_steps < 1:
        err("train.max_steps", f"expected >= 1, got {cfg.train.max_steps}")
    if cfg.train.max_steps is None and cfg.train.epochs <= 0:
        err("train.epochs", f"expected > 0, got {cfg.train.epochs}")
    lo, hi = cfg.data.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        err("data.crop_scale", f"expected 0 < min <= max <= 1, got {list(cfg.data.crop_scale)}")
    lo, hi = cfg.data.crop_ratio
    if not 0.0 < lo <= hi:
        err("data.crop_ratio", f"expected 0 < min <= max, got {list(cfg.data.crop_ratio)}")
    if cfg.data.decode == "device" and cfg.data.augment_on != "device":
        err("data.decode", "device decoding feeds the device augmentation: set data.augment_on: device too")
    if cfg.data.steps_per_epoch is not None and cfg.data.steps_per_epoch < 1:
        err("data.steps_per_epoch", f"expected >= 1, got {cfg.data.steps_per_epoch}")
    if cfg.optim.base_lr <= 0:
        err("optim.base_lr", f"expected > 0, got {cfg.optim.base_lr}")
    if cfg.optim.lr is not None and cfg.optim.lr <= 0:
        err("optim.lr", f"expected > 0, got {cfg.optim.lr}")
    if cfg.optim.layer_decay is not None and not 0.0 < cfg.optim.layer_decay <= 1.0:
        err("optim.layer_decay", f"expected 0 < value <= 1, got {cfg.optim.layer_decay}")
    if cfg.train.grad_clip is not None and cfg.train.grad_clip <= 0:
        err("train.grad_clip", f"expected > 0 or null, got {cfg.train.grad_clip}")
    if not 0.0 < cfg.train.model_ema_decay < 1.0:
        err("train.model_ema_decay", f"expected 0 < value < 1, got {cfg.train.model_ema_decay}")
    if cfg.eval.every_steps < 0:
        err("eval.every_steps", f"expected >= 0 (0: only at the end), got {cfg.eval.every_steps}")
    if cfg.eval.batch_size_per_rank < 1:
        err("eval.batch_size_per_rank", f"expected an integer >= 1, got {cfg.eval.batch_size_per_rank}")
    if cfg.checkpoint.every_steps < 0:
        err("checkpoint.every_steps", f"expected >= 0, got {cfg.checkpoint.every_steps}")
    if cfg.data.replay_batches < 0:
        err("data.replay_batches", f"expected >= 0 (0: off), got {cfg.data.replay_batches}")
    if cfg.data.max_member_bytes < 1:
        err("data.max_member_bytes", f"expected >= 1, got {cfg.data.max_member_bytes}")
    if cfg.checkpoint.num_to_keep < 1:
        err("checkpoint.num_to_keep", f"expected >= 1, got {cfg.checkpoint.num_to_keep}")
    if cfg.failure.max_failures < -1:
        err("failure.max_failures", f"expected >= -1 (-1: retry forever), got {cfg.failure.max_failures}")
    if cfg.failure.collective_timeout_s < 1:
        err("failure.collective_timeout_s", f"expected >= 1, got {cfg.failure.collective_timeout_s}")
    if cfg.failure.stall_timeout_s < 0:
        err("failure.stall_timeout_s", f"expected >= 0 (0: no watchdog), got {cfg.failure.stall_timeout_s}")
    if cfg.failure.start_timeout_s <= 0:
        err("failure.start_timeout_s", f"expected > 0, got {cfg.failure.start_timeout_s}")
    if cfg.data.virtual_slots < 0:
        err("data.virtual_slots", f"expected >= 0, got {cfg.data.virtual_slots}")
    if cfg.run.storage_retry_s < 0:
        err("run.storage_retry_s", f"expected >= 0, got {cfg.run.storage_retry_s}")
    if not cfg.run.name or "/" in cfg.run.name:
        err("run.name", f"expected a non-empty name without '/', got {cfg.run.name!r}")
    if not cfg.data.shards:
        err("data.shards", "expected a shard folder/URL holding manifest.parquet")


# --------------------------------------------------------------------------------------------- derived


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Total optimizer steps of the run."""
    if cfg.train.max_steps is not None:
        return int(cfg.train.max_steps)
    return max(1, int(round(cfg.train.epochs * steps_per_epoch)))


def derived(cfg: Config, num_samples: Optional[int] = None) -> Dict[str, Any]:
    """Values computed from the config (never written back): batch arithmetic, lr, steps.

    ``num_samples`` is the labeled (or MAE) manifest's sample count when known.
    """
    global_batch = cfg.data.batch_size_per_rank * cfg.scaling.num_workers * cfg.train.grad_accum
    effective_lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.base_lr * global_batch / 256.0
    out: Dict[str, Any] = {
        "num_ranks": cfg.scaling.num_workers,
        "batch_size_per_rank": cfg.data.batch_size_per_rank,
        "grad_accum": cfg.train.grad_accum,
        "global_batch": global_batch,
        "lr_rule": "optim.lr (absolute)" if cfg.optim.lr is not None else "base_lr * global_batch / 256",
        "effective_lr": effective_lr,
    }
    if cfg.data.unlabeled:
        out["unlabeled_batch_per_rank"] = cfg.data.batch_size_per_rank * cfg.data.mu
        out["global_unlabeled_batch"] = out["unlabeled_batch_per_rank"] * cfg.scaling.num_workers * cfg.train.grad_accum
    spe = cfg.data.steps_per_epoch
    if spe is None and num_samples is not None:
        spe = max(1, num_samples // global_batch)
    if num_samples is not None:
        out["num_samples"] = num_samples
    if spe is not None:
        out["steps_per_epoch"] = spe
        steps = total_steps(cfg, spe)
        out["total_steps"] = steps
        warm = cfg.optim.warmup_steps
        if warm is None:
            warm = int(round(cfg.optim.warmup_epochs * spe))
        out["warmup_steps"] = min(warm, steps)
        out["images_seen"] = steps * global_batch
    elif cfg.train.max_steps is not None:
        out["total_steps"] = cfg.train.max_steps
    return out
