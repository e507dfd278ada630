"""Faults of a real cluster: bounded waits, permanent vs transient, one-line causes.

- :func:`classify` turns an exception raised on a worker into a one-line cause when the fault is
  *permanent* (a shard that is gone, a full disk, access denied: a restart cannot help) and ``None``
  when it may be transient (a lost peer, a storage outage outlasting the retries).
- :class:`PermanentFault` carries that cause from the worker to the driver. The worker records it
  (:func:`write_cause`); a worker group restarted after it finds the record (:func:`permanent_cause`) and
  stops at once, so the run ends with that cause after at most ``failure.max_failures`` quick restarts.
- :class:`StallWatchdog` ends a worker that makes no progress for ``failure.stall_timeout_s`` (a peer
  frozen inside a collective, a data reader that never returns): it writes the cause to
  ``<run>/_faults/`` (no shared disk needed) and exits the process, so Ray sees the worker die within
  a bounded time instead of waiting forever; the driver reads the cause back (:func:`read_causes`).
- :func:`one_line` reduces whatever ``trainer.fit()`` raised to the one line the CLI prints.
"""
from __future__ import annotations

import errno as _errno
import json
import logging
import os
import re
import threading
import time
from typing import Callable, Iterator, List, Optional

from ssfer_dist import storage
from ssfer_dist.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["PermanentFault", "RunFailed", "classify", "StallWatchdog", "write_cause", "read_causes",
           "permanent_cause", "one_line", "FAULTS_DIR", "STALL_EXIT_CODE"]

FAULTS_DIR = "_faults"
STALL_EXIT_CODE = 75

# errno values no retry can fix; named in the cause line
PERMANENT_ERRNOS = {_errno.ENOENT, _errno.ENOSPC, _errno.EACCES, _errno.EPERM, _errno.EROFS, _errno.EDQUOT,
                    _errno.ENOTDIR, _errno.EISDIR}
# S3 error codes no retry can fix (the storage layer's table)
PERMANENT_S3_CODES = storage.PERMANENT_S3_CODES


# the same faults after a process boundary flattened them to text (a DataLoader worker re-raises the
# exception type with the original traceback as its message; errno and response are gone)
_ERRNO_RE = re.compile(r"\[Errno (\d+)\] ([^:\n]+?)(?:: '([^'\n]+)')?$", re.M)
_S3_RE = re.compile(r"^(?:\w+Error: )?(.*\((%s)\).*)$" % "|".join(sorted(PERMANENT_S3_CODES)), re.M)


class PermanentFault(UserError):
    """A fault a restart cannot fix; the message is the one-line cause (file/URL, errno or S3 code)."""

    def __reduce__(self):
        return (self.__class__, (str(self),))


class RunFailed(UserError):
    """A training run ended without finishing; the message is one line naming the cause."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        base = getattr(exc, "_base_exc", None)          # Ray Train's UserExceptionWithTraceback
        exc = base if isinstance(base, BaseException) else (exc.__cause__ or exc.__context__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _oserror_cause(e: OSError) -> str:
    name = _errno.errorcode.get(e.errno, str(e.errno))
    where = e.filename if e.filename is not None else ""
    what = e.strerror or _first_line(e)
    return f"{where}: {what} ({name})" if where else f"{what} ({name})"


def classify(exc: BaseException) -> Optional[str]:
    """One-line cause of a permanent fault somewhere in ``exc``'s chain, else ``None`` (maybe transient)."""
    for e in _chain(exc):
        if isinstance(e, PermanentFault):
            return str(e)
        if isinstance(e, OSError) and e.errno in PERMANENT_ERRNOS:
            return _oserror_cause(e)
        code = _s3_code(e)
        if code in PERMANENT_S3_CODES:
            url = getattr(e, "url", None)
            msg = _first_line(e)
            return f"{url}: {msg} (S3 {code})" if url and url not in msg else f"{msg} (S3 {code})"
        text = str(e)
        m = _ERRNO_RE.search(text)
        if m and int(m.group(1)) in PERMANENT_ERRNOS:
            name = _errno.errorcode.get(int(m.group(1)), m.group(1))
            return f"{m.group(3)}: {m.group(2)} ({name})" if m.group(3) else f"{m.group(2)} ({name})"
        m = _S3_RE.search(text)
        if m:
            return f"{m.group(1).strip()} (S3 {m.group(2)})"
    return None


_s3_code = storage.s3_code


# ------------------------------------------------------------------------------------------- watchdog


class StallWatchdog:
    """Ends this worker process when :meth:`beat` has not been called for ``timeout_s`` seconds.

    A thread checks once a second. On a stall it logs the cause, records it with ``record(cause)`` (best
    effort, bounded by the storage timeouts) and calls ``os._exit`` — the only way out of a thread blocked
    in a C++ collective or a forked loader that never answers. ``timeout_s <= 0`` disables it."""

    def __init__(self, timeout_s: float, rank: int, record: Optional[Callable[[str], None]] = None,
                 exit_fn: Callable[[int], None] = os._exit):
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self._record = record
        self._exit = exit_fn
        self._where = "start-up"
        self._last = time.monotonic()
        self._stop = threading.Event()
        self.fired: Optional[str] = None
        self._thread: Optional[threading.Thread] = None
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._run, name="ssfer-stall-watchdog", daemon=True)
            self._thread.start()

    def beat(self, where: str) -> None:
        self._where = where
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle < self.timeout_s:
                continue
            cause = (f"rank {self.rank} made no progress for {idle:.0f} s (failure.stall_timeout_s="
                     f"{self.timeout_s:g}); last at: {self._where}")
            self.fired = cause
            log.error("stall watchdog: %s — ending this worker", cause)
            if self._record is not None:
                try:
                    self._record(cause)
                except Exception as e:  # the exit below must happen regardless
                    log.error("stall watchdog: could not record the cause: %s", e)
            self._exit(STALL_EXIT_CODE)
            return


# ------------------------------------------------------------------------------------- cause records


def write_cause(run_url: str, rank: int, cause: str, kind: str) -> None:
    """Record a worker's failure cause under ``<run>/_faults/`` (one small object per rank and process)."""
    rec = {"time": time.time(), "rank": rank, "kind": kind, "cause": cause, "pid": os.getpid()}
    url = storage.join(run_url, FAULTS_DIR, f"rank{rank}-{os.getpid()}-{int(rec['time'] * 1000)}.json")
    storage.put_bytes(url, json.dumps(rec).encode(), durable=False)


def read_causes(run_url: str, since: float) -> List[dict]:
    """Causes recorded at or after ``since`` (epoch seconds), oldest first; storage errors → []."""
    out = []
    base = storage.join(run_url, FAULTS_DIR)
    try:
        for name in storage.list_files(base):
            try:
                rec = json.loads(storage.get_bytes(storage.join(base, name)))
            except (UserError, ValueError):
                continue
            if rec.get("time", 0) >= since:
                out.append(rec)
    except UserError:
        return []
    return sorted(out, key=lambda r: r["time"])


def permanent_cause(run_url: str, since: float) -> Optional[dict]:
    """The first permanent fault recorded for the run at or after ``since`` (None: none)."""
    return next((rec for rec in read_causes(run_url, since) if rec.get("kind") == "permanent"), None)


# --------------------------------------------------------------------------------- driver-side line


def _worker_failures(exc: BaseException) -> dict:
    wf = getattr(exc, "worker_failures", None)
    return dict(wf) if isinstance(wf, dict) else {}


def one_line(exc: BaseException, causes: List[dict]) -> str:
    """The one line naming why ``trainer.fit()`` failed: a recorded permanent fault (with the rank that hit it,
    not the rank of a restarted group that stopped on finding it), else a permanent fault in the workers'
    errors, else a recorded cause (stall watchdog), else the first worker's own exception line, else Ray's
    controller error."""
    for rec in causes:
        if rec.get("kind") == "permanent":
            return f"rank {rec['rank']}: {rec['cause']}"
    failures = _worker_failures(exc)
    for rank in sorted(failures):
        c = classify(failures[rank])
        if c:
            return f"rank {rank}: {c}"
    for rec in causes:                     # written by the worker itself (stall, classified fault)
        return f"rank {rec['rank']}: {rec['cause']}"
    for rank in sorted(failures):
        e = failures[rank]
        inner = list(_chain(e))[-1]
        return f"rank {rank}: {type(inner).__name__}: {_first_line(inner)}"
    ctrl = getattr(exc, "controller_failure", None)
    if ctrl is not None:
        if type(ctrl).__name__ == "WorkerGroupStartupTimeoutError":
            return ("the worker group could not be placed in time (failure.start_timeout_s): the cluster lacks "
                    "the CPUs/GPUs/resources the scaling section asks for (see `ray status`)")
        return f"{type(ctrl).__name__}: {_first_line(ctrl)}"
    return f"{type(exc).__name__}: {_first_line(exc)}"
