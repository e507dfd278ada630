"""The docs instruct and stay current: docs/config.md is generated from the config dataclasses and lists every
key; README and ARCHITECTURE stay short; the README's commands name entry points that exist."""
import dataclasses
import importlib.util
import json
import re
import typing
from pathlib import Path

from ssfer_dist import config as cfgmod

ROOT = Path(__file__).resolve().parent.parent


def _gen_config():
    spec = importlib.util.spec_from_file_location("gen_config", ROOT / "docs" / "gen_config.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _keys(cls, prefix=""):
    """Every leaf key of a config dataclass tree, as docs/config.md writes it."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(t):
            yield from _keys(t, key + ".")
            continue
        yield key
        args = typing.get_args(t)
        if typing.get_origin(t) is list and args and dataclasses.is_dataclass(args[0]):
            yield from _keys(args[0], key + "[].")


def test_config_md_lists_every_key_with_a_meaning():
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    skip = _gen_config().SKIP_SECTIONS
    keys = [k for k in _keys(cfgmod.Config) if k.split(".")[0] not in skip] + list(_keys(cfgmod.PipelineCfg))
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, f"docs/config.md lacks {missing}: run python docs/gen_config.py"
    undocumented = [line.split("|")[1].strip() for line in text.splitlines() if _gen_config().UNDOCUMENTED in line]
    assert not undocumented, f"config keys without a meaning (comment the field in config.py): {undocumented}"


def test_config_md_is_up_to_date():
    gen = _gen_config()
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8") == gen.render(), \
        "docs/config.md is out of date: run python docs/gen_config.py"


def test_generator_reads_trailing_and_continued_comments():
    gen = _gen_config()
    rows = {k: m for _, _, table in gen.sections(cfgmod.Config, "") for k, _, _, m in table}
    assert rows["run.storage"] == "local folder or s3://bucket/prefix"
    assert "a multiple of every rank count" in rows["data.virtual_slots"]   # a comment continued below the field
    assert gen.format_type(typing.Optional[int]) == "int or null"
    assert gen.format_type(typing.Literal["cpu", "device"]) == "one of cpu, device"


def _lines(path):
    return (ROOT / path).read_text(encoding="utf-8").splitlines()


def test_readme_and_architecture_stay_short():
    assert len(_lines("README.md")) <= 150
    arch = _lines("docs/ARCHITECTURE.md")
    assert len(arch) <= 100
    assert max(len(line) for line in arch) <= 200


def test_docs_quote_no_timings_and_link_the_results():
    """Measured figures live in benchmarks/results/ (written by the benchmarks), not in README prose."""
    readme = "\n".join(_lines("README.md"))
    assert "benchmarks/results/" in readme
    assert not re.search(r"\b\d+(\.\d+)? ?(s|min|ms)\b(?! per)", readme), "a timing in README.md"


def test_docs_commands_name_entry_points_and_files_that_exist():
    for doc in ("README.md", "docs/multi-node.md", "docs/ARCHITECTURE.md"):
        text = "\n".join(_lines(doc))
        for module in re.findall(r"-m (ssfer_dist[\w.]*)", text):
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{doc} runs -m {module}, which is missing"
        for path in re.findall(r"(?<![\w/])((?:configs|benchmarks|docs|cluster)/[\w./-]+\.(?:yaml|py|md|sh))", text):
            assert (ROOT / path).exists(), f"{doc} names {path}, which is missing"
    readme = "\n".join(_lines("README.md"))
    assert "ruff check ." in readme and "python -m pytest -q" in readme   # what .ci/run runs


def _bench_results():
    spec = importlib.util.spec_from_file_location("bench_results", ROOT / "benchmarks" / "results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_helper_records_min_median_baseline_and_machine(tmp_path, monkeypatch):
    res = _bench_results()
    monkeypatch.setenv("SSFER_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = res.record("toy", "python benchmarks/toy.py", {"bare": [4.0, 2.0, 3.0], "ours": {"min": 1.0, "median": 1.5}},
                      unit="img/s", baseline="bare")
    doc = json.loads(path.read_text())
    rows = {r["row"]: r for r in doc["rows"]}
    assert rows["bare"]["min"] == 2.0 and rows["bare"]["median"] == 3.0 and rows["ours"]["vs_baseline"] == 0.5
    assert doc["omp_num_threads"] == "1" and doc["machine"]["cores"] >= 1 and doc["command"].endswith("toy.py")
    table = (tmp_path / "README.md").read_text()
    assert "| [toy](toy.json) | ours | 1 | 1.5 | img/s | 0.50× | 1 |" in table


def test_results_table_is_generated_from_the_json_files():
    res = _bench_results()
    folder = ROOT / "benchmarks" / "results"
    docs = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]
    assert docs, "benchmarks/results/ holds no figures"
    assert (folder / "README.md").read_text(encoding="utf-8") == res.render_table(docs), \
        "benchmarks/results/README.md is stale: run python benchmarks/results.py"
