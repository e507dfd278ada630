"""The test side of the fault injector and the collective guard (``tests/hooks/ssfer_test_hooks.py``).

:func:`setup_session` (``conftest.py``) puts ``tests/hooks`` on ``PYTHONPATH``, so every Python process the
tests start runs its ``sitecustomize``: the collective guard is on everywhere, and the injector reads the
fault a test armed — :func:`fault_env` for the environment of a command the test starts (``ssfer run``: its
torchrun ranks or its own Ray's workers inherit it), :func:`armed` around a run in this process on a Ray
that is already running (its workers read the session's fault file).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from typing import Dict, Iterator, Union

HOOKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hooks")
if HOOKS not in sys.path:          # InjectedFault / CommGuardError unpickle here, by their module
    sys.path.insert(0, HOOKS)

from ssfer_test_hooks import FAULT_ENV, FAULT_FILE_ENV, GUARD_ENV, KINDS  # noqa: E402

__all__ = ["setup_session", "fault_env", "armed"]

PathLike = Union[str, "os.PathLike[str]"]


def setup_session() -> None:
    """Every process started after this (subprocesses, Ray started later) gets the hooks."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if HOOKS not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([HOOKS] + parts)
    os.environ.setdefault(GUARD_ENV, "1")
    os.environ.setdefault(FAULT_FILE_ENV, os.path.join(tempfile.gettempdir(), f"ssfer-test-fault-{os.getpid()}.json"))


def _spec(step: int, rank: int, kind: str, marker: PathLike) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind: one of {KINDS}, not {kind!r}")
    return json.dumps({"step": int(step), "rank": int(rank), "kind": kind, "marker": os.fspath(marker)})


def fault_env(step: int, rank: int, kind: str = "error", marker: PathLike = "") -> Dict[str, str]:
    """Environment that arms one fault in a command the test starts: merge it into the subprocess's env.
    It fires once: when ``marker`` (a file) does not exist yet, which it then creates."""
    return {FAULT_ENV: _spec(step, rank, kind, marker)}


@contextlib.contextmanager
def armed(step: int, rank: int, kind: str = "error", marker: PathLike = "") -> Iterator[None]:
    """Arm one fault for the workers of a Ray that already runs (the session's fault file), until the block
    ends."""
    path = os.environ[FAULT_FILE_ENV]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(_spec(step, rank, kind, marker))
    os.replace(path + ".tmp", path)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
