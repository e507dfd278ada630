"""Trim KubeRay's published CRDs to the v1 OpenAPI schemas the manifest tests validate against.

Usage: python cluster/crds/trim.py KUBERAY/ray-operator/config/crd/bases
Writes ray.io_rayjobs.json and ray.io_rayclusters.json next to this file (descriptions dropped).
"""
import json
import os
import sys

import yaml


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def main(src: str) -> None:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("ray.io_rayjobs", "ray.io_rayclusters"):
        with open(os.path.join(src, name + ".yaml")) as f:
            crd = yaml.load(f, Loader=loader)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        spec = crd["spec"]
        out = {"apiVersion": crd["apiVersion"], "kind": crd["kind"],
               "metadata": {"name": crd["metadata"]["name"], "annotations": crd["metadata"].get("annotations", {})},
               "spec": {"group": spec["group"], "names": spec["names"], "scope": spec["scope"],
                        "versions": [{"name": "v1", "served": v1.get("served", True),
                                      "storage": v1.get("storage", True), "schema": _strip(v1["schema"])}]}}
        with open(os.path.join(here, name + ".json"), "w") as f:
            json.dump(out, f, separators=(",", ":"), sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
