"""``ssfer`` — run | pipeline | evaluate | predict | export | demo.

argparse lives here only; every subcommand hands plain values to a function in the module that
owns the work (imported lazily so ``ssfer --help`` stays fast and ray/deepspeed load only when used).
Each handler returns a process exit code. Errors meant for the user are raised as ``UserError``
(one line, non-zero exit, no traceback).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


from ssfer_dist.errors import UserError, run_command

__all__ = ["main", "build_parser", "UserError"]


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run one training stage (MAE pretrain / FaceMix fine-tune / semi-supervised)")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and batch arithmetic, then exit")
    p.set_defaults(handler=_cmd_run)


def _cmd_run(a) -> int:
    from ssfer_dist.distributed.launch import run_from_cli

    return run_from_cli(a.config, a.overrides, dry_run=a.dry_run)


def _add_pipeline(sub) -> None:
    p = sub.add_parser("pipeline", help="pretrain -> FaceMix -> semi-supervised on the same cluster")
    p.add_argument("config", help="pipeline YAML naming the three stage configs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(handler=_cmd_pipeline)


def _cmd_pipeline(a) -> int:
    from ssfer_dist.distributed.launch import pipeline_from_cli

    return pipeline_from_cli(a.config, a.overrides, dry_run=a.dry_run)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy, per-class metrics and confusion matrix on shards")
    p.add_argument("--weights", required=True, help="classifier weights (.safetensors or an export/ folder)")
    p.add_argument("--shards", required=True, help="shard folder/URL holding manifest.parquet")
    p.add_argument("--out", default=None, help="folder for metrics.json and confusion PNG/JSON")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--ray", action="store_true", help="evaluate as a Ray job (large sets)")
    p.add_argument("--max-member-bytes", type=int, default=64 * 1024 * 1024,
                   help="tar members larger than this are refused (counted corrupt), never loaded (default 64 MiB)")
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_evaluate(a) -> int:
    from ssfer_dist.evaluate import evaluate_cli

    return evaluate_cli(weights=a.weights, shards=a.shards, out=a.out, batch_size=a.batch_size, use_ray=a.ray,
                        max_member_bytes=a.max_member_bytes)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="detect faces in photos and classify their expression")
    p.add_argument("--weights", required=True)
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--annotate", default=None, metavar="DIR", help="write annotated PNGs here")
    p.add_argument("--detector", default="haar", choices=["haar", "mtcnn", "none"])
    p.add_argument("--margin", type=float, default=0.2)
    p.set_defaults(handler=_cmd_predict)


def _cmd_predict(a) -> int:
    from ssfer_dist.predict import predict_cli

    return predict_cli(weights=a.weights, inputs=a.inputs, as_json=a.json, annotate=a.annotate,
                       detector=a.detector, margin=a.margin)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a classifier to safetensors / ONNX / TorchScript")
    p.add_argument("--weights", required=True)
    p.add_argument("--format", required=True, choices=["safetensors", "onnx", "torchscript"])
    p.add_argument("--out", default=None, help="output file (default: next to the weights)")
    p.set_defaults(handler=_cmd_export)


def _cmd_export(a) -> int:
    from ssfer_dist.export import export_cli

    return export_cli(weights=a.weights, fmt=a.format, out=a.out)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="synthetic end-to-end demo: shard, pretrain, FaceMix, semi-supervised, evaluate")
    p.add_argument("--out", default="ssfer-demo", help="folder for data, shards, runs and reports")
    p.add_argument("--quick", action="store_true", help="a much smaller run (for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(a) -> int:
    from ssfer_dist.demo import demo_cli

    return demo_cli(out=a.out, quick=a.quick, seed=a.seed, num_workers=a.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssfer", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_pipeline, _add_evaluate, _add_predict, _add_export, _add_demo):
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    return run_command("ssfer", build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
