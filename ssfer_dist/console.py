"""What the user sees: our own lines on the console, everything else in a log file in the run folder.

Driver side (the ``ssfer`` process):

- :func:`setup` puts one handler on the root logger. The console gets the records of our own loggers
  (``ssfer_dist``, ``sharding``) at INFO (``-q``: WARNING; ``-v``: every record, ours at DEBUG);
  every record goes to the open log files (:func:`log_file`), or to a bounded buffer until one opens.
  Python warnings go through logging (``py.warnings``), so they land in the file too. Ray's driver-side
  loggers are handed to the same handler (:func:`adopt_library_loggers`).
- Worker output never reaches the driver (the launcher starts Ray with ``log_to_driver=False``): the
  driver prints progress from the metrics the workers report (:func:`report_lines`), in the stage it is
  told about by :func:`stage` (``[2/4 scratch] step 100/700 … ETA 0:01:10 (all ~0:05:20)``).
- ANSI colour codes are never written to a file, and only reach the console when it is a terminal.

Worker side: :func:`worker_setup` sends every record of the worker process (ours and the libraries') to
the log files it opens with :func:`log_file` (``<run>/logs/worker-<rank>.log``), and none to the console.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

from ssfer_dist import storage

__all__ = ["setup", "worker_setup", "adopt_library_loggers", "log_file", "stage", "is_ours", "strip_ansi",
           "format_progress", "progress_text", "report_lines", "QUIET", "NORMAL", "VERBOSE"]

QUIET, NORMAL, VERBOSE = 0, 1, 2
OURS = ("ssfer_dist", "sharding", "__main__")
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
        self.console = True                 # a worker process writes to its log files only


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
            if show and _S.console:
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
    adopt_library_loggers()


def worker_setup() -> None:
    """In a training worker process: every record (ours and the libraries', INFO and above) to the log files
    opened with :func:`log_file`, nothing to the console (the driver prints the reported progress)."""
    setup(NORMAL)
    _S.console = False
    adopt_library_loggers()


def adopt_library_loggers() -> None:
    """Ray gives its ``ray`` logger a stderr handler of its own; route it through ours instead (call again
    after importing Ray: its loggers are configured at import)."""
    if not _S.installed or "ray" not in sys.modules:
        return
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
    file uploaded when the block ends (appended to the one there: a restarted worker keeps the earlier
    attempt's lines). Yields the path or URL of the file."""
    remote = storage.is_s3(run_url)
    if remote:
        local = os.path.join(tempfile.mkdtemp(prefix="ssfer-log-"), name)
        url: Optional[str] = storage.join(run_url, "logs", name)
        try:
            if storage.exists(url):
                storage.get_file(url, local)
        except Exception as e:  # the run does not depend on its earlier log lines
            logging.getLogger(__name__).warning("could not read the earlier log %s: %s", url, e)
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


def format_progress(stage: str, step: int, total: int, steps_per_s: float, images_per_s: float,
                    loss: float, lr: float) -> str:
    """``[mae] step 40/200  3.10 steps/s  396.8 img/s  loss 0.8123  lr 1.20e-04  ETA 0:00:52``."""
    eta = (total - step) / steps_per_s if steps_per_s > 0 else float("inf")
    eta_s = "?" if not math.isfinite(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
    return (f"[{stage}] step {step}/{total}  {steps_per_s:.2f} steps/s  {images_per_s:.1f} img/s  "
            f"loss {loss:.4f}  lr {lr:.2e}  ETA {eta_s}")


def progress_text(p: Dict[str, Any]) -> str:
    """A progress record (label, step, total, sps, ips, loss, lr) as the console shows it (stage k of N and the
    overall ETA when known)."""
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




def report_lines(label: str, total: int, record: Dict[str, Any]) -> List[str]:
    """The console lines of one reported metrics record (a log step's: step, steps_per_s, images_per_s, loss,
    lr, and eval_* after an evaluation)."""
    sps = float(record.get("steps_per_s", 0.0))
    lines = [progress_text({"label": label, "step": int(record["step"]), "total": int(total), "sps": sps,
                            "ips": float(record.get("images_per_s", 0.0)),
                            "loss": float(record.get("loss", float("nan"))), "lr": float(record.get("lr", 0.0))})]
    if "eval_accuracy" in record:
        lines.append(f"[{label}] step {int(record['step'])} eval: accuracy {float(record['eval_accuracy']):.4f}  "
                     f"mean class accuracy {float(record.get('eval_mean_class_accuracy', float('nan'))):.4f}  "
                     f"macro-F1 {float(record.get('eval_macro_f1', float('nan'))):.4f}"
                     + ("  (best)" if record.get("eval_best") else ""))
    return lines
