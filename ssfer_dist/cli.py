"""ssfer: train, evaluate and use facial-expression models (run | pipeline | evaluate | predict | export | demo).

argparse lives here only; every subcommand hands plain values to a function in the module that
owns the work (training goes through :mod:`ssfer_dist.launchers`; ray and deepspeed load only when used).
Each handler returns a process exit code. Errors meant for the user are raised as ``UserError``
(one line, non-zero exit, no traceback). ``-q`` / ``-v`` set what the console shows
(:mod:`ssfer_dist.console`); the full log of a run is in its run folder either way.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


from ssfer_dist import console, launchers
from ssfer_dist.demo import demo_cli
from ssfer_dist.errors import UserError, run_command
from ssfer_dist.evaluate import evaluate_cli
from ssfer_dist.export import export_cli
from ssfer_dist.predict import predict_cli
from ssfer_dist.sweep import sweep_from_cli

__all__ = ["main", "build_parser", "UserError"]


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run one training stage (MAE pretrain / FaceMix fine-tune / semi-supervised)",
                       **_common())
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and batch arithmetic, then exit")
    p.add_argument("--launcher", choices=["ray", "torchrun"], default="ray",
                   help="ray: Ray Train workers (local Ray, or the cluster in RAY_ADDRESS); torchrun: "
                        "scaling.num_workers processes on this machine, no Ray")
    p.set_defaults(handler=_cmd_run)


def _cmd_run(a) -> int:
    return launchers.run_from_cli(a.config, a.overrides, dry_run=a.dry_run, launcher=a.launcher)


def _add_pipeline(sub) -> None:
    p = sub.add_parser("pipeline", help="pretrain -> FaceMix -> semi-supervised on the same cluster", **_common())
    p.add_argument("config", help="pipeline YAML naming the three stage configs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value: pretrain.train.max_steps=100 (one stage), *.run.storage=s3://b/runs "
                        "(every stage) or storage=... (the pipeline YAML); repeatable")
    p.add_argument("--dry-run", action="store_true",
                   help="print each stage's resolved config and batch arithmetic, then exit")
    p.set_defaults(handler=_cmd_pipeline)


def _cmd_pipeline(a) -> int:
    return launchers.pipeline_from_cli(a.config, a.overrides, dry_run=a.dry_run)


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="label fractions x folds x models, one run per cell, then a mean ± std table",
                       **_common())
    p.add_argument("config", help="sweep YAML (see configs/sweep_rafdb.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the sweep YAML, e.g. --set folds=1 (repeatable)")
    p.add_argument("--table-only", action="store_true", help="write the table of the cells finished so far, "
                                                              "train nothing")
    p.set_defaults(handler=_cmd_sweep)


def _cmd_sweep(a) -> int:
    return sweep_from_cli(a.config, a.overrides, table_only=a.table_only)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy, per-class metrics and confusion matrix on shards", **_common())
    p.add_argument("--weights", required=True, help="classifier weights (.safetensors or an export/ folder)")
    p.add_argument("--shards", required=True, help="shard folder/URL holding manifest.parquet")
    p.add_argument("--out", default=None, help="folder for metrics.json and confusion PNG/JSON "
                                                 "(default: print the metrics only)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    p.add_argument("--ray", action="store_true", help="evaluate as a Ray job (large sets)")
    p.add_argument("--max-member-bytes", type=int, default=64 * 1024 * 1024,
                   help="tar members larger than this are refused (counted corrupt), never loaded (default 64 MiB)")
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_evaluate(a) -> int:
    return evaluate_cli(weights=a.weights, shards=a.shards, out=a.out, batch_size=a.batch_size, use_ray=a.ray,
                        max_member_bytes=a.max_member_bytes)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="detect faces in photos and classify their expression", **_common())
    p.add_argument("--weights", required=True, help="classifier weights (.safetensors or an export/ folder)")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--annotate", default=None, metavar="DIR", help="write annotated PNGs here")
    p.add_argument("--detector", default="haar", choices=["haar", "mtcnn", "none"],
                   help="face detector (none: each image is one face crop)")
    p.add_argument("--margin", type=float, default=0.2,
                   help="crop side = (1 + margin) x the detected box side")
    p.set_defaults(handler=_cmd_predict)


def _cmd_predict(a) -> int:
    return predict_cli(weights=a.weights, inputs=a.inputs, as_json=a.json, annotate=a.annotate,
                       detector=a.detector, margin=a.margin)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a classifier to safetensors / ONNX / TorchScript", **_common())
    p.add_argument("--weights", required=True, help="classifier weights (.safetensors or an export/ folder)")
    p.add_argument("--format", required=True, choices=["safetensors", "onnx", "torchscript"],
                   help="output format")
    p.add_argument("--out", default=None, help="output file (default: next to the weights)")
    p.set_defaults(handler=_cmd_export)


def _cmd_export(a) -> int:
    return export_cli(weights=a.weights, fmt=a.format, out=a.out)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="synthetic end-to-end demo: shard, pretrain, FaceMix, semi-supervised, evaluate",
                       **_common())
    p.add_argument("--out", default="ssfer-demo", help="folder for data, shards, runs and reports")
    p.add_argument("--quick", action="store_true", help="a much smaller run (for tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data, splits and training")
    p.add_argument("--workers", type=int, default=2, help="training workers (ranks) per run")
    p.add_argument("--launcher", choices=["ray", "torchrun"], default="ray",
                   help="ray: a local Ray with Ray Train workers; torchrun: the same runs without Ray")
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(a) -> int:
    return demo_cli(out=a.out, quick=a.quick, seed=a.seed, num_workers=a.workers, launcher=a.launcher)


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to a flag's help when it has a real default not already in the text."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if (action.option_strings and d is not None and d is not False and d != [] and d != argparse.SUPPRESS
                and "default" not in text and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ssfer-dist")
    except Exception:  # not installed (source checkout on PYTHONPATH)
        return "unknown"


def _verbosity_parent() -> argparse.ArgumentParser:
    """``-q`` / ``-v`` on every subcommand too (``ssfer run CFG -q``); SUPPRESS keeps the top-level value."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="console: warnings, errors and results only")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="console: every line, Ray's and the libraries' too (always in the run's log file)")
    return p


_PARENT = None


def _common() -> dict:
    return {"parents": [_PARENT], "formatter_class": _HelpFormatter}


def build_parser() -> argparse.ArgumentParser:
    global _PARENT
    _PARENT = _verbosity_parent()
    parser = argparse.ArgumentParser(prog="ssfer", description=__doc__.splitlines()[0], formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"ssfer-dist {_version()}")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true",
                   help="console: warnings, errors and results only")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="console: every line, Ray's and the libraries' too (always in the run's log file)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_pipeline, _add_sweep, _add_evaluate, _add_predict, _add_export, _add_demo):
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup(console.QUIET if args.quiet else console.VERBOSE if args.verbose else console.NORMAL)
    before = launchers.local_ray_started()
    rc = run_command("ssfer", args)
    if launchers.local_ray_started() not in (None, before):  # a local Ray this command started: shut it down,
        kept = launchers.finish_local_ray(ok=rc == 0)         # its temp folder removed after success
        if kept and rc != 0:
            print(f"ssfer {args.command}: the local Ray's own logs are in {kept}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
