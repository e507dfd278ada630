"""Where benchmark figures live: ``benchmarks/results/<name>.json``, one file per benchmark, and one table,
``benchmarks/results/README.md``, regenerated from all of them. Docs link there instead of quoting timings.

A benchmark calls, once it has its numbers::

    import results   # benchmarks/ is on sys.path when a benchmark runs as `python benchmarks/x.py`
    results.record("loader", results.command_line(),
                   {"decode-only, PIL": [2173.0, 2423.0], "augment_on: device": [2010.0, 2175.0]},
                   unit="img per CPU-s", baseline="decode-only, PIL")

``rows`` maps a row label to its repeats (a list of numbers; min and median are computed) or to a dict with
precomputed ``min`` and ``median``. ``baseline`` names the row every median is divided by (``vs_baseline``).
Each file records the command, ``OMP_NUM_THREADS``, the machine (cores, CPU model, memory, GPU when given) and
the UTC time. ``SSFER_BENCH_RESULTS`` redirects the folder (tests do, so a smoke run never overwrites a
measurement). ``python benchmarks/results.py`` rewrites the table from the JSON files.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

DEFAULT_DIR = Path(__file__).resolve().parent / "results"
Row = Union[Sequence[float], Mapping[str, float]]


def checkouts(root: str, baseline_tree: Optional[str] = None) -> Dict[str, str]:
    """The code each run of a comparison uses: ``{"baseline": DIR, "this checkout": root}`` in the order the runs
    alternate (just this checkout without a baseline)."""
    trees = {"this checkout": root}
    return {"baseline": os.path.abspath(baseline_tree), **trees} if baseline_tree else trees


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """This benchmark's command as typed, its script path relative to the repository (threads go apart)."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(DEFAULT_DIR.parent.parent)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *(sys.argv[1:] if argv is None else argv)])


def results_dir() -> Path:
    return Path(os.environ.get("SSFER_BENCH_RESULTS") or DEFAULT_DIR)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> Optional[float]:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def machine(gpu: Optional[str] = None) -> Dict[str, Any]:
    """The machine a figure was measured on (CPU count is what this process may use)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {"cores": usable, "cpu": _cpu_model(), "memory_gib": _memory_gib(), "os": platform.platform()}
    if gpu:
        out["gpu"] = gpu
    return out


def _summarise(label: str, value: Row) -> Dict[str, Any]:
    if isinstance(value, Mapping):
        row = {"row": label, "min": value["min"], "median": value["median"]}
        row.update({k: v for k, v in value.items() if k not in row})
        return row
    values = [float(v) for v in value]
    if not values:
        raise ValueError(f"row {label!r} has no values")
    return {"row": label, "min": min(values), "median": statistics.median(values), "repeats": len(values),
            "values": values}


def record(name: str, command: str, rows: Mapping[str, Row], *, unit: str = "", baseline: Optional[str] = None,
           note: str = "", gpu: Optional[str] = None, extra: Optional[Mapping[str, Any]] = None,
           measured: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``<results>/<name>.json`` and regenerate the README table; returns the JSON path.

    ``measured`` replaces the machine/threads/time this process would record: for figures measured elsewhere
    and entered by hand (say how in ``note``)."""
    table = [_summarise(label, v) for label, v in rows.items()]
    if baseline is not None:
        base = next((r["median"] for r in table if r["row"] == baseline), None)
        if base is None:
            raise ValueError(f"baseline {baseline!r} is not one of the rows {list(rows)}")
        for r in table:
            r["vs_baseline"] = r["median"] / base if base else None
    doc = {"name": name, "command": command, "unit": unit, "baseline": baseline, "rows": table, "note": note}
    doc.update(dict(measured) if measured is not None else {
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "machine": machine(gpu),
        "measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
    if extra:
        doc["extra"] = dict(extra)
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_table(folder)
    return path


def _num(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def _machine_text(doc: Mapping[str, Any]) -> str:
    m = doc.get("machine") or {}
    if isinstance(m, str):
        return m
    parts = [f"{m['cores']} cores" if m.get("cores") else "", m.get("cpu", ""),
             f"{m['memory_gib']:g} GiB" if m.get("memory_gib") else "", m.get("gpu", "")]
    return ", ".join(p for p in parts if p)


def render_table(docs: List[Mapping[str, Any]]) -> str:
    lines = ["# Benchmark results", "",
             "<!-- Generated by benchmarks/results.py from the JSON files in this folder: do not edit by hand. -->",
             "", "Each benchmark writes `<name>.json` here (command, threads, machine, min / median of its repeats,",
             "each median ÷ the baseline row's). Compare figures only within one file: they come from shared",
             "machines whose load varies.", "",
             "| benchmark | row | min | median | unit | vs baseline | threads | machine | measured |",
             "|---|---|---|---|---|---|---|---|---|"]
    for doc in docs:
        for r in doc["rows"]:
            ratio = f"{r['vs_baseline']:.2f}×" if r.get("vs_baseline") is not None else ""
            lines.append(f"| [{doc['name']}]({doc['name']}.json) | {r['row']} | {_num(r['min'])} | "
                         f"{_num(r['median'])} | {doc.get('unit', '')} | {ratio} | "
                         f"{doc.get('omp_num_threads') or ''} | {_machine_text(doc)} | {doc.get('measured_at', '')} |")
    lines += ["", "## Commands and notes", ""]
    for doc in docs:
        note = f" {doc['note']}" if doc.get("note") else ""
        lines.append(f"- **{doc['name']}**: `{doc['command']}`.{note}")
    return "\n".join(lines) + "\n"


def write_table(folder: Optional[Path] = None) -> Path:
    """Regenerate ``README.md`` of ``folder`` from every ``*.json`` in it."""
    folder = Path(folder or results_dir())
    docs = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]
    out = folder / "README.md"
    out.write_text(render_table(docs), encoding="utf-8")
    return out


if __name__ == "__main__":
    print(write_table(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
