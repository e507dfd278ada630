"""Wall time of ``ssfer demo --quick`` (the smaller demo the tests run), optionally against a baseline checkout.

Each run is a fresh ``python -m ssfer_dist.cli demo --quick`` process into a temp folder; with
``--baseline-tree DIR`` (a checkout of another commit, e.g. ``git worktree add DIR REV``) its runs alternate
with this checkout's and the ratio is against the baseline's median.

    python benchmarks/demo_time.py [--repeat 1] [--seed 0] [--launcher ray|torchrun] [--baseline-tree DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import results  # noqa: E402  (benchmarks/results.py: this folder is sys.path[0] for a script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(root: str, seed: int, launcher: str, timeout_s: float) -> float:
    """Seconds from the command to its exit, for the code in ``root``; a failed demo ends the benchmark."""
    out = tempfile.mkdtemp(prefix="ssfer-demo-time-")
    cmd = [sys.executable, "-m", "ssfer_dist.cli", "demo", "--quick", "--out", out, "--seed", str(seed),
           "--launcher", launcher]
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=timeout_s)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if p.returncode != 0:
        raise SystemExit(f"demo failed ({p.returncode}) in {root}:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="runs per checkout (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="the demo's --seed (default 0)")
    ap.add_argument("--launcher", default="ray", choices=["ray", "torchrun"], help="the demo's --launcher")
    ap.add_argument("--baseline-tree", default=None, metavar="DIR", help="a checkout to compare against")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds one demo may take (default 1800)")
    a = ap.parse_args()
    trees = results.checkouts(ROOT, a.baseline_tree)
    times = {label: [] for label in trees}
    for i in range(a.repeat):
        for label, root in trees.items():
            times[label].append(one_run(root, a.seed, a.launcher, a.timeout))
            print(f"{label} run {i + 1}: {times[label][-1]:.0f} s", flush=True)
    for label, ts in times.items():
        print(f"{label}: min {min(ts):.0f} s, median {statistics.median(ts):.0f} s over {len(ts)}")
    rows = {f"{label}: quick demo, seed {a.seed}, {a.launcher}": ts for label, ts in times.items()}
    base = next(iter(rows)) if a.baseline_tree else None
    results.record(f"demo_quick_{a.launcher}", results.command_line(), rows, unit="s", baseline=base,
                   note="wall time of ssfer demo --quick, runs alternating between the checkouts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
