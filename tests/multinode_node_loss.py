"""Driver for ``test_faults_ray.py::test_a_lost_node_is_replaced_and_the_run_resumes_from_s3`` (run in its own
process: it needs a Ray of its own, not the test session's).

A simulated cluster (``ray.cluster_utils.Cluster``): a head without CPUs and two 1-CPU worker nodes, so the
two training workers land on different nodes; run storage and shards on S3 only (no shared disk is used).
When the run has logged step ``--cut-after``, the node holding rank 1 is removed (its raylet and workers
killed) and a fresh node joins; Ray Train restarts the worker group, which resumes from the last S3
checkpoint. Prints one JSON line: the run URL and when the node was removed / replaced.

    python tests/multinode_node_loss.py CONFIG S3_SHARDS S3_STORAGE NAME --steps N --cut-after K
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("shards")
    ap.add_argument("storage")
    ap.add_argument("name")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--cut-after", type=int, default=6)
    a = ap.parse_args()

    from ray.cluster_utils import Cluster

    from ssfer_dist import storage
    from ssfer_dist.config import load_config
    from ssfer_dist.launchers.ray import ensure_ray, run_stage

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address          # ssfer connects to it like to any cluster
    cfg = load_config(a.config, [
        f"data.shards={a.shards}", f"run.storage={a.storage}", f"run.name={a.name}", "train.zero_stage=2",
        "train.preview_every=0", "train.log_every=1", f"train.max_steps={a.steps}",
        f"checkpoint.every_steps={a.every}", "failure.max_failures=1", "failure.start_timeout_s=180",
        "failure.stall_timeout_s=300", "failure.collective_timeout_s=120"])
    run = storage.join(a.storage, a.name)
    events = {}

    # Ray's Cluster starts nodes with signal handlers (main thread only): the run goes to a thread, the
    # node loss is injected from here
    ensure_ray(cfg)
    result = {}

    def train():
        try:
            result["res"] = run_stage(cfg)
        except BaseException as e:  # reported below
            result["error"] = e

    t = threading.Thread(target=train, daemon=True)
    t.start()
    while t.is_alive():                    # wait until the run has logged step >= cut-after on S3
        try:
            lines = storage.get_bytes(storage.join(run, "metrics.jsonl")).decode().splitlines()
            if lines and json.loads(lines[-1])["step"] >= a.cut_after:
                break
        except Exception:
            pass
        time.sleep(1.0)
    if t.is_alive():
        victim = nodes[1]        # each worker node holds one training worker (the head has no CPU)
        try:
            # the replacement joins (an autoscaler would add it), then the worker's node is lost
            nodes.append(cluster.add_node(num_cpus=1))
            events["replaced_at"] = time.time()
            events["removed_at"] = time.time()
            events["removed_node"] = victim.node_id
            cluster.remove_node(victim, allow_graceful=False)
            nodes.remove(victim)
        except Exception as e:  # reported in the JSON line; the test fails on it
            events["error"] = f"{type(e).__name__}: {e}"
            print(f"node loss injection failed: {events['error']}", file=sys.stderr)
    t.join(timeout=1200)
    if "error" in result:
        raise result["error"]
    res = result["res"]
    print(json.dumps({"run": res.run_url, "export": res.export_path, **events}))
    sys.stdout.flush()
    try:
        cluster.shutdown()
    except Exception as e:   # Ray 2.60's Cluster.shutdown trips over a node added with wait=False
        print(f"cluster shutdown: {type(e).__name__}: {e}", file=sys.stderr)
        for node in [cluster.head_node] + nodes:
            try:
                node.kill_all_processes(check_alive=False, allow_graceful=False)
            except Exception:
                pass
        os._exit(0)          # the Cluster's own exit hook would fail the same way
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
