"""What the user sees: our own lines on the console, everything else in a log file in the run folder.

Driver side (the ``ssfer`` process):

- :func:`setup` puts one handler on the root logger. The console gets the records of our own loggers
  (``ssfer_dist``, ``sharding``) at INFO (``-q``: WARNING; ``-v``: every record, ours at DEBUG);
  every record goes to the open log files (:func:`log_file`), or to a bounded buffer until one opens.
  Python warnings go through logging (``py.warnings``), so they land in the file too.
- :func:`route_ray_output` replaces Ray's printer of worker output on the driver (``log_to_driver``):
  lines that rank 0 marked as ours (:data:`MARK`) are shown, stripped of the marker and of Ray's
  ``(RayTrainWorker pid=…)`` prefix; every other line of every Ray process (Train controller, library
  warnings, C++ ``core_worker`` messages, …) goes to the log file only (``-v``: also to the console).
- ANSI colour codes are never written to a file, and only reach the console when it is a terminal.
- :func:`stage` tells the console which stage of how many is running: progress lines from the workers
  come out as ``[2/4 scratch] step 100/700 … ETA 0:01:10 (all ~0:05:20)``.

Worker side: :func:`worker_logging` makes rank 0's ``ssfer_dist`` records print as marked lines on the
worker's stdout (Ray forwards them to the driver); other ranks' records go to the log file only.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

__all__ = ["MARK", "setup", "log_file", "route_ray_output", "worker_logging", "stage", "is_ours",
           "strip_ansi", "QUIET", "NORMAL", "VERBOSE"]

QUIET, NORMAL, VERBOSE = 0, 1, 2
OURS = ("ssfer_dist", "sharding", "__main__")
MARK = "::ssfer:"            # worker lines: "::ssfer:INFO::text" or "::ssfer:PROGRESS::{json}"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")
_BUFFER_LINES = 20000


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def is_ours(logger_name: str) -> bool:
    return any(logger_name == n or logger_name.startswith(n + ".") for n in OURS)


class _State:
    def __init__(self) -> None:
        self.verbosity = NORMAL
        self.lock = threading.RLock()
        self.files: List[Tuple[Any, str, Optional[str]]] = []   # (file object, local path, s3 url or None)
        self.buffer: Deque[str] = collections.deque(maxlen=_BUFFER_LINES)
        self.stage: Optional["_Stage"] = None
        self.installed = False


_S = _State()


def _console_stream():
    return sys.stderr


def _to_console(text: str) -> None:
    stream = _console_stream()
    if not (hasattr(stream, "isatty") and stream.isatty()):
        text = strip_ansi(text)
    with _S.lock:
        stream.write(text + "\n")
        stream.flush()


def _to_files(text: str) -> None:
    text = strip_ansi(text)
    with _S.lock:
        if not _S.files:
            _S.buffer.append(text)
            return
        for fh, _, _ in _S.files:
            fh.write(text + "\n")
            fh.flush()


def _stamp(ms: bool = False) -> str:
    now = time.time()
    text = time.strftime("%H:%M:%S", time.localtime(now))
    return f"{text}.{int(now % 1 * 1000):03d}" if ms else text


class _Handler(logging.Handler):
    """Root handler of the driver: console (ours, by verbosity) + log files (everything)."""

    _full = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            full = self._full.format(record)
            _to_files(full)
            ours = is_ours(record.name)
            if _S.verbosity >= VERBOSE:
                show, text = True, full
            elif ours and record.levelno >= (logging.WARNING if _S.verbosity == QUIET else logging.INFO):
                msg = record.getMessage()
                if record.exc_info and record.levelno >= logging.ERROR:
                    msg += "\n" + self.formatException(record.exc_info)
                prefix = "" if record.levelno < logging.WARNING else record.levelname.lower() + ": "
                show, text = True, f"{_stamp()} {prefix}{msg}"
            else:
                show = False
            if show:
                _to_console(text)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup(verbosity: int = NORMAL) -> None:
    """Console + log-file logging for one ``ssfer`` command (idempotent; the last call's verbosity wins)."""
    _S.verbosity = verbosity
    _S.installed = True
    root = logging.getLogger()
    if not any(isinstance(h, _Handler) for h in root.handlers):
        for h in list(root.handlers):      # a plain console handler (logging.basicConfig) would print it all
            if type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stderr, sys.stdout):
                root.removeHandler(h)
        root.addHandler(_Handler())
    root.setLevel(logging.INFO)
    for name in OURS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= VERBOSE else logging.INFO)
    logging.captureWarnings(True)
    if "ray" in sys.modules:           # imported before us: its loggers keep their own stderr handler otherwise
        _adopt_ray_loggers()
    # the workers print their Ray prefix without colour; Ray's own record of it stays plain
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def _adopt_ray_loggers() -> None:
    """Ray gives its ``ray`` logger a stderr handler of its own; route it through ours instead."""
    for name in ["ray"] + [n for n in logging.root.manager.loggerDict if n.startswith("ray.")]:
        lg = logging.getLogger(name)
        mine = [h for h in lg.handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)]
        if mine or name == "ray":
            for h in mine:
                lg.removeHandler(h)
            lg.propagate = True


@contextlib.contextmanager
def log_file(run_url: str, name: str = "ssfer.log") -> Iterator[str]:
    """Write every log line (ours and the libraries') to ``<run_url>/logs/<name>`` while the block runs.

    Nested blocks write to all open files (the demo's log has every stage; each run folder has its own).
    Lines logged before the first file opened are written into it. An ``s3://`` run folder gets the
    file uploaded when the block ends. Yields the path or URL of the file."""
    from ssfer_dist import storage

    remote = storage.is_s3(run_url)
    if remote:
        local = os.path.join(tempfile.mkdtemp(prefix="ssfer-log-"), name)
        url: Optional[str] = storage.join(run_url, "logs", name)
    else:
        local = os.path.join(os.path.abspath(run_url), "logs", name)
        url = None
    os.makedirs(os.path.dirname(local), exist_ok=True)
    fh = open(local, "a", encoding="utf-8")
    with _S.lock:
        first = not _S.files
        _S.files.append((fh, local, url))
        if first:
            fh.writelines(line + "\n" for line in _S.buffer)
            _S.buffer.clear()
            fh.flush()
    try:
        yield url or local
    finally:
        with _S.lock:
            _S.files = [f for f in _S.files if f[0] is not fh]
            fh.close()
        if url is not None:
            try:
                storage.put_file(local, url)
            except Exception as e:  # the run's outcome does not depend on its log upload
                logging.getLogger(__name__).warning("could not upload the log to %s: %s", url, e)


# ------------------------------------------------------------------------------------------ progress


class _Stage:
    def __init__(self, index: int, count: int, label: str, future_steps: int, future_stages: int,
                 startup_s: Optional[float]) -> None:
        self.index, self.count, self.label = index, count, label
        self.future_steps, self.future_stages = future_steps, future_stages
        self.t0 = time.time()
        self.startup_s = startup_s            # command → first progress line, measured on an earlier stage
        self.first_progress: Optional[float] = None


_startup_seen: List[float] = []


@contextlib.contextmanager
def stage(index: int, count: int, label: str, future_steps: Sequence[int] = ()) -> Iterator[None]:
    """Mark stage ``index`` (1-based) of ``count`` as running; ``future_steps``: the optimizer steps of
    the stages still to come (for the overall ETA)."""
    log = logging.getLogger("ssfer_dist.console")
    st = _Stage(index, count, label, sum(future_steps), len(future_steps),
                _startup_seen[-1] if _startup_seen else None)   # the last stage's (the first also started Ray)
    prev = _S.stage
    _S.stage = st
    log.info("stage %d of %d: %s", index, count, label)
    try:
        yield
    finally:
        if st.first_progress is not None:
            _startup_seen.append(st.first_progress - st.t0)
        _S.stage = prev


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_text(p: Dict[str, Any]) -> str:
    """A worker's progress record as the console shows it (stage k of N and the overall ETA when known)."""
    from ssfer_dist.train.metrics import format_progress

    st = _S.stage
    label = p.get("label", "?")
    text = format_progress(label, int(p["step"]), int(p["total"]), float(p["sps"]), float(p["ips"]),
                           float(p.get("loss", float("nan"))), float(p.get("lr", 0.0)))
    if st is None:
        return text
    if st.first_progress is None:
        st.first_progress = time.time()
    prefix = f"[{st.index}/{st.count} {label}]" if st.count > 1 else f"[{label}]"
    text = text.replace(f"[{label}]", prefix, 1)
    sps = float(p["sps"])
    if st.future_stages and sps > 0:
        startup = st.startup_s if st.startup_s is not None else (st.first_progress - st.t0)
        rest = (int(p["total"]) - int(p["step"])) / sps + st.future_steps / sps + st.future_stages * startup
        text += f" (all ~{_hms(rest)})"
    return text


# ------------------------------------------------------------------------------------------ Ray output


def _ray_line(data: Dict[str, Any], line: str) -> None:
    if line.startswith(MARK):
        kind, _, body = line[len(MARK):].partition("::")
        if kind == "PROGRESS":
            try:
                text = progress_text(json.loads(body))
            except (ValueError, KeyError, TypeError):
                text = body
            level = logging.INFO
        else:
            text = body
            level = getattr(logging, kind, logging.INFO)
        _to_files(f"{_stamp(ms=True)} [rank 0] {text}")
        if _S.verbosity >= VERBOSE or level >= (logging.WARNING if _S.verbosity == QUIET else logging.INFO):
            prefix = "" if level < logging.WARNING else logging.getLevelName(level).lower() + ": "
            _to_console(f"{_stamp()} {prefix}{text}")
        return
    who = data.get("actor_name") or data.get("task_name") or ""
    text = f"{_stamp(ms=True)} ({who + ' ' if who else ''}pid={data.get('pid')}) {line}"
    _to_files(text)
    if _S.verbosity >= VERBOSE:
        _to_console(text)


def _ray_handler(data: Dict[str, Any]) -> None:
    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":     # Ray's own printer keeps only the autoscaler's events, not its status
        try:
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        except Exception:  # pragma: no cover - Ray moved it
            lines = []
    for line in lines:
        try:
            _ray_line(data, line)
        except Exception:  # pragma: no cover - never lose the log thread to a bad line
            _to_files(str(line))


def route_ray_output() -> None:
    """After ``ray.init(log_to_driver=True)``: worker output to the log file, rank 0's marked lines to the
    console. Also hands Ray's own driver loggers to our handler. Idempotent; a no-op unless :func:`setup`
    ran (library use and tests keep Ray's own printer)."""
    if not _S.installed:
        return
    _adopt_ray_loggers()
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as disp
    except ImportError:  # pragma: no cover - Ray moved it: its own printer stays
        return
    # Ray registers its printer under this name and removes it by name in ray.shutdown()
    disp.remove_handler("ray_print_logs")
    disp.add_handler("ray_print_logs", _ray_handler)
    # the driver's error listener ("(raylet) A worker died …") prints through this module function
    import ray._private.worker as ray_worker

    if getattr(ray_worker, "print_to_stdstream", None) is not _print_to_stdstream:
        ray_worker.print_to_stdstream = _print_to_stdstream


def _print_to_stdstream(data: Dict[str, Any], ignore_prefix: bool = False) -> None:
    """Stands in for ``ray._private.worker.print_to_stdstream`` (same arguments)."""
    _ray_handler(data)


def prepare_ray_import() -> None:
    """Before ``ray.init``: Ray's driver loggers go through our handler (its start-up lines land in the file)."""
    import ray  # noqa: F401  (importing ray configures its loggers; adopt them afterwards)

    if _S.installed:
        _adopt_ray_loggers()


# ------------------------------------------------------------------------------------------ workers


class _MarkHandler(logging.Handler):
    """Rank 0's ``ssfer_dist`` records as marked lines on the worker's stdout (forwarded by Ray)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            p = getattr(record, "ssfer_progress", None)
            if p is not None:
                line = f"{MARK}PROGRESS::{json.dumps(p, sort_keys=True)}"
            else:
                msg = record.getMessage()
                if record.exc_info:
                    msg += " | " + logging.Formatter().formatException(record.exc_info).replace("\n", " | ")
                line = f"{MARK}{record.levelname}::{msg}"
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except Exception:  # pragma: no cover
            self.handleError(record)


def worker_logging(rank: int) -> None:
    """Called first thing in each Ray Train worker: rank 0's ``ssfer_dist`` records reach the console
    (marked), other ranks' only the log file; library warnings stay in the log file."""
    lg = logging.getLogger("ssfer_dist")
    lg.setLevel(logging.INFO)
    for h in list(lg.handlers):
        if isinstance(h, _MarkHandler):
            lg.removeHandler(h)
    if rank == 0:
        lg.addHandler(_MarkHandler())
        lg.propagate = False
    else:
        lg.propagate = True
    if not logging.getLogger().handlers:    # outside Ray Train (tests): plain stderr for the rest
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
