"""A local Ray private to one ``ssfer run``: its own temp/session folder and its own dashboard port.

Two runs on one machine then never find each other: Ray's helpers that look for "the" local cluster
(the placement-group cleaner's state-API client) are pointed at this run's dashboard through
``RAY_API_SERVER_ADDRESS`` instead of scanning the machine (which fails with "Found multiple active Ray
instances" once a second run exists). The dashboard listens on 127.0.0.1 only. (Ray 2.60 offers no
setting that binds the GCS and raylet ports to loopback; they still listen on all interfaces.)
"""
from __future__ import annotations

import socket
import tempfile
from typing import Any, Dict

__all__ = ["private_init_kwargs", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def private_init_kwargs(runtime_env: Dict[str, Any]) -> Dict[str, Any]:
    """``ray.init`` arguments for a private local instance (``runtime_env`` is extended, not replaced)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    env = dict(runtime_env or {})
    env["env_vars"] = dict(env.get("env_vars", {}), RAY_API_SERVER_ADDRESS=api)
    return {"_temp_dir": tempfile.mkdtemp(prefix="ssfer-ray-"), "dashboard_host": "127.0.0.1",
            "dashboard_port": port, "runtime_env": env}
