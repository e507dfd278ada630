"""Start-up cost of a small run: the time from typing ``ssfer run configs/debug_cpu_pretrain.yaml`` to its
first optimizer step, split into phases, over a few runs.

Each run is a fresh ``python -m ssfer_dist.cli run configs/debug_cpu_pretrain.yaml`` process (new local Ray,
new workers) on tiny debug shards in a temp folder, with ``train.log_every=1`` so the first step prints a
progress line. Phases come from the console (seconds since the command started) and the run's log files:

- ``first line``     the first console line (Python start, imports, config, pre-flight);
- ``ray up``         the local Ray instance started (``ray.init``, from ``logs/ssfer.log``);
- ``workers up``     rank 0's train function started (the first line of ``logs/worker-0.log``);
- ``first step``     the ``step 1/`` progress line (torch/DeepSpeed in the workers, engine, data pipeline);
- ``exit``           the process ended (the remaining steps, export, Ray shutdown).

    python benchmarks/startup.py [--repeat 3] [--steps 3] [--launcher ray|torchrun] [--baseline-tree DIR]

Prints each run's phases and min / median per phase; there is no target to meet: Ray's own start-up is what
it is, and torchrun is the fast local path. Each run waits first (at most 120 s) for the 1-minute load
average to fall to ``--settle`` (0.7), so the previous run's processes do not slow the next; the load average
it started at is printed next to its numbers.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import results  # noqa: E402  (benchmarks/results.py: this folder is sys.path[0] for a script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PHASES = ("first line", "ray up", "workers up", "first step", "exit")


def _clock(text: str) -> float:
    """``HH:MM:SS[.mmm]`` → seconds since midnight."""
    h, m, s = text.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def one_run(shards: str, storage: str, name: str, steps: int, launcher: str = "ray", root: str = ROOT) -> dict:
    """One ``ssfer run`` of the code in ``root`` (this checkout, or a baseline checkout of another commit)."""
    cmd = [sys.executable, "-m", "ssfer_dist.cli", "run", os.path.join(root, "configs", "debug_cpu_pretrain.yaml"),
           "--set", f"data.shards={shards}", "--set", f"run.storage={storage}", "--set", f"run.name={name}",
           "--set", f"train.max_steps={steps}", "--set", "train.log_every=1", "--set", "checkpoint.every_steps=0",
           "--set", "train.preview_every=0", "--launcher", launcher]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    midnight = time.mktime(time.localtime(t0)[:3] + (0, 0, 0, 0, 0, -1))      # log clocks are local times
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=root)
    out = {}
    lines = []
    for line in p.stdout:
        now = time.time() - t0
        lines.append(line.rstrip())
        out.setdefault("first line", now)
        if re.search(r"\] step 1/", line):
            out.setdefault("first step", now)
    p.wait()
    out["exit"] = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"run failed ({p.returncode}):\n" + "\n".join(lines[-20:]))
    logs = os.path.join(storage, name, "logs")
    for at, line in _log_lines(os.path.join(logs, "ssfer.log"), midnight - t0):
        if "Started a local Ray instance" in line or "started a private local Ray" in line:
            out.setdefault("ray up", at)
    for at, _line in _log_lines(os.path.join(logs, "worker-0.log"), midnight - t0):
        out.setdefault("workers up", at)
    for at, line in _log_lines(os.path.join(logs, "ssfer.log"), midnight - t0):
        if "Started training worker group" in line:      # an earlier runtime, which had no worker log
            out.setdefault("workers up", at)
    return out


def _log_lines(path: str, offset: float):
    """``(seconds since the command started, line)`` of each time-stamped line of a log file (none if absent)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"(\d\d:\d\d:\d\d(?:\.\d+)?) |\d{4}-\d\d-\d\d (\d\d:\d\d:\d\d),(\d+) ", line)
            if m:
                clock = _clock(m.group(1)) if m.group(1) else _clock(m.group(2)) + int(m.group(3)) / 1000
                yield offset + clock, line


def settle(below: float, max_wait: float) -> float:
    """Wait until the 1-minute load average is at most ``below`` (the previous run's processes make the next
    one start on a busy machine otherwise), at most ``max_wait`` seconds. Returns the load average then."""
    t0 = time.time()
    while os.getloadavg()[0] > below and time.time() - t0 < max_wait:
        time.sleep(2.0)
    return os.getloadavg()[0]


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs (default 3)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per run (default 3)")
    ap.add_argument("--launcher", default="ray", choices=["ray", "torchrun"],
                    help="ssfer run --launcher (torchrun: no Ray phases)")
    ap.add_argument("--settle", type=float, default=0.7,
                    help="before each run, wait (at most 120 s) for the 1-minute load average to drop to this "
                         "(default 0.7; 0: no wait)")
    ap.add_argument("--baseline-tree", default=None, metavar="DIR",
                    help="a checkout of another commit (e.g. `git worktree add DIR REV`): its runs alternate with "
                         "this checkout's and are the baseline of the ratio")
    ap.add_argument("--record", default=None, metavar="NAME",
                    help="write the figures to benchmarks/results/NAME.json (default startup_<launcher>)")
    return ap.parse_args()


def _print_table(label: str, runs: list) -> None:
    print(f"\n{label}: command -> phase, seconds over {len(runs)} runs")
    print(f"{'phase':<12} {'min':>7} {'median':>7}")
    for k in PHASES:
        vals = [r[k] for r in runs if k in r]
        if vals:
            print(f"{k:<12} {min(vals):>7.1f} {statistics.median(vals):>7.1f}")


def main() -> int:
    a = _args()
    from ssfer_dist.train.debugdata import write_debug_shards

    tmp = tempfile.mkdtemp(prefix="ssfer-startup-")
    shards = write_debug_shards(os.path.join(tmp, "shards"))["fr"]
    trees = results.checkouts(ROOT, a.baseline_tree)
    runs = {label: [] for label in trees}
    for i in range(a.repeat):
        for label, root in trees.items():
            load = settle(a.settle, 120.0) if a.settle > 0 else os.getloadavg()[0]
            tag = "baseline" if root != ROOT else "this"          # each run its own folder: none resumes another
            r = one_run(shards, os.path.join(tmp, "runs"), f"startup-{tag}-{i}", a.steps, a.launcher, root)
            runs[label].append(r)
            print(f"{label} run {i + 1}: " + "  ".join(f"{k} {r[k]:.1f}s" for k in PHASES if k in r)
                  + f"   (load average before: {load:.1f}, {os.cpu_count()} CPUs)", flush=True)
    print(f"\nlauncher {a.launcher}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    for label, rs in runs.items():
        _print_table(label, rs)
    _record(a, trees, runs)
    return 0


def _record(a: argparse.Namespace, trees: dict, runs: dict) -> None:
    rows = {f"{label}: {k}": [r[k] for r in rs if k in r] for label, rs in runs.items() for k in PHASES}
    rows = {k: v for k, v in rows.items() if v}
    base = "baseline: first step" if a.baseline_tree and "baseline: first step" in rows else None
    note = (f"ssfer run --launcher {a.launcher} of configs/debug_cpu_pretrain.yaml, {a.steps} steps, runs alternating"
            + (f"; baseline: the checkout at {_commit(trees['baseline'])}" if a.baseline_tree else ""))
    results.record(a.record or f"startup_{a.launcher}", results.command_line(), rows, unit="s", baseline=base,
                   note=note, extra={"this_checkout": _commit(ROOT)})


def _commit(root: str) -> str:
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=30).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
