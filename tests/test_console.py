"""What a newcomer sees: only our lines on the console, everything else in the run's log files; help texts.

Unit tests drive :mod:`ssfer_dist.console` with log records and reported metrics records; the slow test
runs ``ssfer run configs/debug_cpu_pretrain.yaml`` as a user would, with stdout and
stderr redirected to a file, and counts the lines that are not ours (there must be none).
"""
from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys

import pytest

from ssfer_dist import console
from ssfer_dist.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_LINE = re.compile(r"^\d\d:\d\d:\d\d (?!\()")     # "HH:MM:SS text", never a Ray "(pid=…)" prefix


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    console._S.installed = False
    console._S.verbosity = console.NORMAL


@pytest.fixture
def captured(monkeypatch, tmp_path, restore_logging):
    """console.setup with the console going to a StringIO (not a terminal) and a log file open."""
    buf = io.StringIO()
    monkeypatch.setattr(console, "_console_stream", lambda: buf)
    console.setup(console.NORMAL)
    with console.log_file(str(tmp_path / "run")) as path:
        yield buf, path


def _lines(buf):
    return [x for x in buf.getvalue().splitlines() if x]


def test_only_our_records_reach_the_console(captured):
    buf, path = captured
    logging.getLogger("ssfer_dist.launchers.ray").info("[mae] run x: 2 workers")
    logging.getLogger("ray.train").info("Requesting resources: {'CPU': 1.0} * 2")
    logging.getLogger("deepspeed").warning("DeepSpeed op built successfully")
    logging.getLogger("ray").info("\x1b[36mcoloured\x1b[0m library line")
    import warnings

    warnings.warn("`all_gather_into_tensor` is deprecated", FutureWarning, stacklevel=1)
    shown = _lines(buf)
    assert len(shown) == 1 and OUR_LINE.match(shown[0]) and "[mae] run x" in shown[0], shown
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for needle in ("Requesting resources", "built successfully", "FutureWarning", "coloured library line",
                   "[mae] run x"):
        assert needle in text, needle
    assert "\x1b" not in text and "\x1b" not in buf.getvalue()


def test_reported_records_become_progress_and_eval_lines(captured):
    buf, _ = captured
    rec = {"step": 5, "steps_per_s": 2.0, "images_per_s": 64.0, "loss": 1.5, "lr": 1e-3, "eval_accuracy": 0.5,
           "eval_mean_class_accuracy": 0.25, "eval_macro_f1": 0.2, "eval_best": True}
    lines = console.report_lines("scratch", 30, rec)
    assert lines[0].startswith("[scratch] step 5/30") and "loss 1.5000" in lines[0] and "64.0 img/s" in lines[0]
    assert lines[1] == ("[scratch] step 5 eval: accuracy 0.5000  mean class accuracy 0.2500  macro-F1 0.2000"
                        "  (best)")
    assert len(console.report_lines("scratch", 30, {"step": 6, "steps_per_s": 2.0, "loss": 1.0})) == 1


def test_a_worker_writes_everything_to_its_log_file_and_nothing_to_the_console(tmp_path, monkeypatch,
                                                                                 restore_logging):
    buf = io.StringIO()
    monkeypatch.setattr(console, "_console_stream", lambda: buf)
    try:
        console.worker_setup()
        with console.log_file(str(tmp_path), "worker-1.log") as path:
            logging.getLogger("ssfer_dist.train.loop").info("rank 1 resumed at step 8")
            logging.getLogger("deepspeed").warning("a library line")
    finally:
        console._S.console = True
    assert buf.getvalue() == ""
    text = open(path, encoding="utf-8").read()
    assert path == str(tmp_path / "logs" / "worker-1.log")
    assert "rank 1 resumed at step 8" in text and "a library line" in text


def test_quiet_and_verbose(captured):
    buf, _ = captured
    console.setup(console.QUIET)
    logging.getLogger("ssfer_dist.x").info("progress")
    logging.getLogger("ssfer_dist.x").warning("disk almost full")
    logging.getLogger("ray.train").info("library line")
    assert [x.split(" ", 1)[1] for x in _lines(buf)] == ["warning: disk almost full"]
    console.setup(console.VERBOSE)
    logging.getLogger("ray.train").info("library line")
    assert "INFO ray.train: library line" in _lines(buf)[-1]


def test_stage_prefix_and_overall_eta(captured):
    buf, _ = captured
    with console.stage(2, 4, "scratch", future_steps=[100, 100]):
        text = console.progress_text({"label": "scratch", "step": 50, "total": 100, "sps": 10.0, "ips": 320.0,
                                      "loss": 1.0, "lr": 1e-3})
    assert text.startswith("[2/4 scratch] step 50/100")
    # 50 steps left here + 200 in the next two stages at 10 steps/s = 25 s, plus two start-ups (measured
    # on this stage: ~0 s in a test)
    m = re.search(r"\(all ~(\d+):(\d\d):(\d\d)\)", text)
    assert m and 25 <= int(m.group(2)) * 60 + int(m.group(3)) <= 27, text
    assert "stage 2 of 4: scratch" in buf.getvalue()


def test_lines_before_a_log_file_opens_are_kept(tmp_path, monkeypatch, restore_logging):
    monkeypatch.setattr(console, "_console_stream", lambda: io.StringIO())
    console.setup(console.NORMAL)
    logging.getLogger("ssfer_dist.x").info("early line")
    with console.log_file(str(tmp_path)) as path:
        logging.getLogger("ssfer_dist.x").info("later line")
    text = open(path, encoding="utf-8").read()
    assert text.index("early line") < text.index("later line")
    assert path == str(tmp_path / "logs" / "ssfer.log")


def test_help_shows_defaults_and_no_rst_markup(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    top = capsys.readouterr().out
    assert "``" not in top and "--version" in top and "-q, --quiet" in top
    for cmd, flags in {"predict": ["--weights", "--detector", "--margin"], "pipeline": ["--set", "--dry-run"],
                       "demo": ["--seed", "--out", "--workers"], "run": ["--set", "--dry-run"],
                       "evaluate": ["--batch-size"], "export": ["--format"]}.items():
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for flag in flags:
            assert re.search(re.escape(flag) + r"\S* [^-]", text), (cmd, flag)
        for action in parser._subparsers._group_actions[0].choices[cmd]._actions:
            assert action.help, (cmd, action.option_strings)
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--help"])
    demo = " ".join(capsys.readouterr().out.split())
    assert "(default: 0)" in demo and "(default: ssfer-demo)" in demo
    with pytest.raises(SystemExit):
        parser.parse_args(["--version"])
    assert capsys.readouterr().out.startswith("ssfer-dist ")


def test_set_typo_names_the_set_and_suggests(capsys, restore_logging):
    from ssfer_dist.cli import main

    code = main(["run", os.path.join(ROOT, "configs", "debug_cpu_pretrain.yaml"), "--set", "train.max_step=5",
                 "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--set train.max_step=5: unknown key 'max_step' in train (did you mean 'max_steps'?)" in err
    assert "debug_cpu_pretrain.yaml" not in err


def _debug_run_in_own_tmp(tmp_path, sets, **run_kw):
    """``ssfer run configs/debug_cpu_pretrain.yaml`` (runs under ``tmp_path/runs``) in a subprocess on its own
    local Ray, with a TMPDIR of its own: (the process, that TMPDIR, what was left in it; the folder removed)."""
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="t", dir="/tmp")      # short: Ray's socket paths live under it
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TMPDIR=tmp)
    env.pop("RAY_ADDRESS", None)
    try:
        p = subprocess.run([sys.executable, "-m", "ssfer_dist.cli", "run",
                            os.path.join(ROOT, "configs", "debug_cpu_pretrain.yaml"),
                            "--set", f"run.storage={tmp_path / 'runs'}", *sets],
                           env=env, cwd=str(tmp_path), **run_kw)
        return p, tmp, os.listdir(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_debug_run_console_has_only_our_lines(tmp_path):
    """``ssfer run configs/debug_cpu_pretrain.yaml > out.txt 2>&1``: every line is ours, no ANSI, the progress
    printed from the reported metrics; Ray's driver lines are in ``<run>/logs/ssfer.log``, each worker's lines
    (ours and the libraries') in ``<run>/logs/worker-<rank>.log``; the private Ray's temp folder is gone."""
    from ssfer_dist.train.debugdata import write_debug_shards

    shards = write_debug_shards(str(tmp_path / "shards"))
    out = tmp_path / "console.txt"
    with open(out, "w") as f:
        p, tmp, left = _debug_run_in_own_tmp(
            tmp_path, ["--set", f"data.shards={shards['fr']}", "--set", "train.max_steps=4",
                       "--set", "train.log_every=2", "--set", "checkpoint.every_steps=2",
                       "--set", "train.preview_every=0"],
            stdout=f, stderr=subprocess.STDOUT, timeout=900)
    text = out.read_text()
    assert p.returncode == 0, text[-3000:]
    assert "started a private local Ray in " + tmp in text
    assert [x for x in left if x.startswith("ssfer-ray-")] == [], left
    lines = [x for x in text.splitlines() if x.strip()]
    not_ours = [x for x in lines if not (OUR_LINE.match(x) or x.startswith("{\"export\""))]
    assert not_ours == [], not_ours
    assert "\x1b" not in text
    assert sum("] step " in x for x in lines) == 2, lines
    logs = tmp_path / "runs" / "debug-pretrain" / "logs"
    log = (logs / "ssfer.log").read_text()
    assert "started a private local Ray" in log and "] step 4/4" in log
    workers = [(logs / f"worker-{r}.log").read_text() for r in (0, 1)]
    assert "] step 4/4" in workers[0] and "fast path" in workers[0]
    assert workers[1].strip(), "rank 1 wrote no log lines"
    assert "deepspeed_shm_comm" not in text      # DeepSpeed's op-build lines (workers') stay in the log files


def test_a_bad_input_under_a_private_ray_is_one_line_and_leaves_nothing(tmp_path):
    """The inputs are checked before Ray starts: a missing manifest is the one-line error, exit 2, and no Ray
    (no temp folder) was started for nothing."""
    p, _, left = _debug_run_in_own_tmp(tmp_path, ["--set", f"data.shards={tmp_path / 'nowhere'}"],
                                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    errors = [x for x in p.stderr.splitlines() if x.startswith("ssfer run: error: ")]
    assert len(errors) == 1 and "data.shards: " in errors[0] and "nowhere" in errors[0], p.stderr[-2000:]
    assert "Traceback" not in p.stdout + p.stderr
    assert [x for x in left if x.startswith("ssfer-ray-")] == [], left
    assert not (tmp_path / "runs").exists()
