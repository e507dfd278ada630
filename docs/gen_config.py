"""Generate docs/config.md: every key of the run config (and of a pipeline file) with type, default and meaning.

The keys, types and defaults come from the config dataclasses in ``ssfer_dist.config``; a key's meaning is the
trailing ``# comment`` of its field in the source (continued on the comment-only lines indented under it), else the
short text in ``MEANINGS`` below (which also replaces a comment too terse for a table).
``python docs/gen_config.py`` rewrites docs/config.md; ``--check`` exits 1 when the file is out of date
(``tests/test_docs.py`` runs the same comparison).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import sys
import tokenize
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Tuple, Union

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:   # run as `python docs/gen_config.py` from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

from ssfer_dist import config as cfgmod  # noqa: E402  (the public module: Config, PipelineCfg and their sections)

OUT = ROOT / "docs" / "config.md"
UNDOCUMENTED = "*undocumented: add a trailing comment to the field*"
# Sections that are test machinery, not user configuration: not documented even where they still exist.
SKIP_SECTIONS = {"debug"}

# Meanings keyed "<Class>.<field>": of the fields that carry no trailing comment in ssfer_dist/config.py, and of
# those whose comment is too terse to stand alone in a table (an entry here wins over the comment).
MEANINGS: Dict[str, str] = {
    "RunCfg.ray_dashboard": "a local Ray (no `RAY_ADDRESS`) starts its dashboard (a slower start-up)",
    "ScalingCfg.gpus_per_worker": "GPUs per worker (0 with `scaling.use_gpu`: one GPU per worker)",
    "CheckpointCfg.every_steps": "save a checkpoint every N optimizer steps (0: only at the end)",
    "CheckpointCfg.num_to_keep": "committed checkpoints kept; older ones are removed",
    "DataCfg.unlabeled": "unlabeled shard sources, mixed by weight (semisup only)",
    "DataCfg.steps_per_epoch": "optimizer steps per epoch (null: manifest samples // global batch)",
    "ThresholdCfg.tau": "fixed: confidence threshold of the pseudo-labels",
    "PipelineCfg.name": "the pipeline's name (a label; each stage keeps its own `run.name`)",
    "RunCfg.seed": "seed of the data order, crops, masks and initialisation",
    "ScalingCfg.num_workers": "training ranks (Ray workers, or the ranks `--launcher torchrun` starts)",
    "ScalingCfg.use_gpu": "one or more GPUs per worker; without CUDA and without `RAY_ADDRESS` the run fails early",
    "ScalingCfg.cpus_per_worker": "CPUs Ray reserves per worker",
    "ScalingCfg.resources_per_worker": "extra Ray resources per worker (custom resource name → amount)",
    "FailureCfg.max_failures": "worker-group restarts after a transient failure (resume from the last checkpoint)",
    "FailureCfg.collective_timeout_s": "a collective waiting on a dead or frozen peer raises after this long",
    "FailureCfg.stall_timeout_s": "a worker whose loop makes no progress this long ends the run with a one-line "
                                  "cause (0: no watchdog)",
    "FailureCfg.start_timeout_s": "a worker group that cannot start (resources, placement) within this fails the "
                                  "attempt",
    "ModelCfg.size": "ViT size (`micro` is for tests and the demo)",
    "ModelCfg.img_size": "input resolution in pixels (a multiple of `model.patch_size`)",
    "ModelCfg.patch_size": "ViT patch size in pixels",
    "ModelCfg.mask_ratio": "MAE: fraction of patches masked",
    "ModelCfg.norm_pix_loss": "MAE: reconstruct per-patch normalised pixels",
    "ModelCfg.decoder_dim": "MAE decoder width",
    "ModelCfg.decoder_depth": "MAE decoder blocks",
    "ModelCfg.decoder_heads": "MAE decoder attention heads",
    "ModelCfg.global_pool": "classifier: class token or average of the patch tokens",
    "ModelCfg.drop_path": "classifier: stochastic depth rate",
    "DataCfg.shuffle_buffer": "samples in the loader's shuffle buffer",
    "OptimCfg.min_lr": "floor of the cosine schedule",
    "OptimCfg.weight_decay": "AdamW weight decay (not on biases, norms, position embeddings, tokens)",
    "OptimCfg.betas": "AdamW betas",
    "OptimCfg.eps": "AdamW epsilon",
    "OptimCfg.warmup_steps": "linear warm-up steps (overrides `optim.warmup_epochs`)",
    "TrainCfg.max_steps": "total optimizer steps (overrides `train.epochs`)",
    "TrainCfg.grad_accum": "micro-batches per optimizer step",
    "TrainCfg.grad_clip": "gradient norm clip (null: none)",
    "TrainCfg.precision": "training precision through DeepSpeed (`bf16` on GPUs)",
    "TrainCfg.zero_stage": "DeepSpeed ZeRO stage",
    "TrainCfg.log_every": "optimizer steps between metric lines (device values are read to the host only then)",
    "TrainCfg.tensorboard": "write TensorBoard events beside `metrics.jsonl`",
    "FaceMixCfg.alpha": "Beta(alpha, alpha) of the mixing ratio",
    "ThresholdCfg.kind": "confidence threshold policy of the pseudo-labels",
    "ThresholdCfg.dtm_init": "DTM: initial per-class threshold",
    "ThresholdCfg.dtm_momentum": "DTM: momentum of the per-class threshold update",
    "ThresholdCfg.freematch_momentum": "FreeMatch: EMA momentum of the self-adaptive threshold",
    "SemiSupCfg.lambda_u": "weight of the unlabeled (consistency) loss",
    "SemiSupCfg.ema_decay": "decay of the EMA teacher per optimizer step",
    "SemiSupCfg.label_smoothing": "label smoothing of the labeled loss",
    "LinearProbeCfg.label_smoothing": "label smoothing of the probe's loss",
}


@lru_cache(maxsize=None)
def _source_comments(path: str) -> Dict[Tuple[str, str], str]:
    """(class name, field name) → the field's trailing comment (with its indented continuation lines)."""
    text = Path(path).read_text(encoding="utf-8")
    comments: Dict[int, Tuple[int, str]] = {}   # line → (column, text) of every comment
    code_lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    out: Dict[Tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                out[(node.name, stmt.target.id)] = _field_comment(stmt, comments, code_lines)
    return out


def _field_comment(stmt: ast.AnnAssign, comments: Dict[int, Tuple[int, str]], code_lines: set) -> str:
    line = stmt.end_lineno or stmt.lineno
    if line not in comments:
        return ""
    parts = [comments[line][1]]
    nxt = line + 1
    # A comment-only line indented deeper than the field continues the field's comment; one at the field's
    # own indentation is a heading for the fields below it.
    while nxt in comments and nxt not in code_lines and comments[nxt][0] > stmt.col_offset:
        parts.append(comments[nxt][1])
        nxt += 1
    return " ".join(parts)


def _meaning(cls: type, name: str) -> str:
    key = f"{cls.__name__}.{name}"
    if key in MEANINGS:
        return MEANINGS[key]
    path = inspect.getsourcefile(cls)
    comment = _source_comments(path).get((cls.__name__, name), "") if path else ""
    return comment or UNDOCUMENTED


def _scalar(t: Any) -> str:
    return getattr(t, "__name__", str(t).replace("typing.", ""))


def format_type(t: Any) -> str:
    """A type hint written for a YAML user."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return f"{format_type(rest[0])} or null"
    if origin in (list, List):
        return f"list of {_item_name(args[0])}"
    if origin in (tuple, Tuple):
        return "[" + ", ".join(format_type(a) for a in args) + "]"
    if origin in (dict, Dict):
        return f"map {format_type(args[0])} → {format_type(args[1])}"
    return _scalar(t)


def _item_name(t: Any) -> str:
    return "items (table below)" if dataclasses.is_dataclass(t) else format_type(t)


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, float):
        return float(f"{v:.6g}")
    return v


def format_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if isinstance(value, str):
        return json.dumps(value) if value == "" else value
    return json.dumps(_plain(value), ensure_ascii=False).replace('"', "")


def sections(cls: type, prefix: str) -> Iterator[Tuple[str, type, List[Tuple[str, str, str, str]]]]:
    """(section key, class, rows) for ``cls`` and, after it, every dataclass nested in it."""
    hints = typing.get_type_hints(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        t, key = hints[f.name], f"{prefix}{f.name}"
        item = typing.get_args(t)[0] if typing.get_origin(t) in (list, List) else None
        if dataclasses.is_dataclass(t):
            nested.append((key, t))
            continue
        if item is not None and dataclasses.is_dataclass(item):
            nested.append((key + "[]", item))
        rows.append((key, format_type(t), format_default(f), _meaning(cls, f.name)))
    if rows:
        yield prefix.rstrip("."), cls, rows
    for key, sub in nested:
        yield from sections(sub, key + ".")


def _table(title: str, rows: List[Tuple[str, str, str, str]]) -> List[str]:
    def cell(s: str) -> str:
        return s.replace("|", "\\|")
    lines = [f"### `{title}`" if title else "### top level", "", "| key | type | default | meaning |",
             "|---|---|---|---|"]
    lines += [f"| `{k}` | {cell(t)} | `{cell(d)}` | {cell(m)} |" for k, t, d, m in rows]
    return lines + [""]


HEADER = """# Config reference

<!-- Generated by `python docs/gen_config.py` from the dataclasses in ssfer_dist/config.py: do not edit by hand;
     change the field (or its trailing comment) and regenerate. tests/test_docs.py fails when this file is stale. -->

A stage YAML (`ssfer run CONFIG`) has one section per table below; keys map 1:1 onto the typed config tree, an
unknown key or a wrong type fails with the key path, and `--set section.key=value` overrides any key. `null` means
"not set" (for the GPU switches: automatic, on where the worker trains on CUDA). Derived values (global batch,
effective lr, steps) are computed, printed by `ssfer run CONFIG --dry-run`, and never written back.
"""


def render() -> str:
    lines = [HEADER, "## Stage config (`ssfer run`, `ssfer pipeline` stages)", ""]
    for key, _, rows in sections(cfgmod.Config, ""):
        if key.split(".")[0] not in SKIP_SECTIONS:
            lines += _table(key, rows)
    lines += ["## Pipeline file (`ssfer pipeline PIPELINE.yaml`)", "",
              "Three stage configs run in order; each stage's export initialises the next.", ""]
    for key, _, rows in sections(cfgmod.PipelineCfg, ""):
        lines += _table(key, rows)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/config.md is out of date")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is out of date: run python docs/gen_config.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
