"""The import structure: four layers that import downward only, no import cycle, pure model code.

core -> components -> launchers -> apps. Every import statement counts, function-level ones included (a
function-level import hides a dependency; it does not remove it). ``models/``, ``tasks/``, ``ssl/`` import no
ray, deepspeed or torch.distributed (DESIGN rule 1). ``sharding/`` builds on the core and the shard contract
only, and no library module of ssfer_dist imports sharding (the demo and the sweep drive both).
"""
from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys
from typing import Dict, Iterator, List, Set, Tuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
OWN = ("ssfer_dist", "sharding")

# ------------------------------------------------------------------------------------------ the layers
# A name ending in ".*" is a package and everything under it; the first layer that names a module wins.
CORE = ["ssfer_dist", "ssfer_dist.errors", "ssfer_dist.typed", "ssfer_dist.config", "ssfer_dist.plan",
        "ssfer_dist.storage", "ssfer_dist.worker_env", "ssfer_dist.console", "ssfer_dist.compat",
        "ssfer_dist.shards.*"]
COMPONENTS = ["ssfer_dist.data.*", "ssfer_dist.models.*", "ssfer_dist.tasks.*", "ssfer_dist.ssl.*",
              "ssfer_dist.stages.*", "ssfer_dist.distributed.*", "ssfer_dist.train.*", "ssfer_dist.evaluate",
              "ssfer_dist.export", "ssfer_dist.predict", "ssfer_dist.detect", "ssfer_dist.synth", "sharding",
              "sharding.build", "sharding.inspection", "sharding.process", "sharding.split", "sharding.verify",
              "sharding.writer", "sharding.sources.*"]
LAUNCHERS = ["ssfer_dist.launchers.*"]
APPS = ["ssfer_dist.cli", "ssfer_dist.__main__", "ssfer_dist.demo", "ssfer_dist.sweep", "sharding.cli",
        "sharding.__main__"]
LAYERS = [("core", CORE), ("components", COMPONENTS), ("launchers", LAUNCHERS), ("apps", APPS)]

PURE = ["ssfer_dist/models", "ssfer_dist/tasks", "ssfer_dist/ssl", "ssfer_dist/data/facemix.py",
        "ssfer_dist/data/transforms.py"]
FORBIDDEN = ("ray", "deepspeed", "torch.distributed")
# what sharding/ may import of ssfer_dist: the core, the shard contract, and face detection
SHARDING_MAY_USE = ("ssfer_dist.errors", "ssfer_dist.storage", "ssfer_dist.typed", "ssfer_dist.detect",
                    "ssfer_dist.worker_env", "ssfer_dist.shards")
DRIVES_BOTH = {"ssfer_dist/demo.py", "ssfer_dist/sweep.py"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Dict[str, pathlib.Path]:
    return {_module_name(p): p for d in OWN for p in sorted((ROOT / d).rglob("*.py"))}


def _imported_modules(path: pathlib.Path) -> Iterator[Tuple[int, List[str]]]:
    """Every module an import statement in ``path`` names, at any depth (function-level imports included)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield node.lineno, [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            yield node.lineno, [node.module] + [f"{node.module}.{a.name}" for a in node.names]


def _resolve(name: str, mods) -> str:
    """The project module an imported name lands in ('' when it is not ours)."""
    while name and name not in mods:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name


def _graph() -> Dict[str, Dict[str, int]]:
    """module -> {imported project module: line}; a module importing its own package's __init__ is no edge."""
    mods = _modules()
    graph: Dict[str, Dict[str, int]] = {m: {} for m in mods}
    for m, path in mods.items():
        for line, names in _imported_modules(path):
            for n in names:
                t = _resolve(n, mods)
                if t and t != m and not m.startswith(t + "."):
                    graph[m].setdefault(t, line)
    return graph


def _under(name: str, pkg: str) -> bool:
    return name == pkg or name.startswith(pkg + ".")


def _layer(module: str) -> int:
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if (n.endswith(".*") and _under(module, n[:-2])) or module == n:
                return i
    return -1


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one member (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[0] if parts[0] == "sharding" else ".".join(parts[:2])


# ------------------------------------------------------------------------------------------ the tests
def test_every_module_has_a_layer():
    assert [m for m in _modules() if _layer(m) < 0] == []


def test_imports_run_down_the_layers():
    bad = []
    graph = _graph()
    for m, targets in sorted(graph.items()):
        for t, line in sorted(targets.items()):
            if _layer(t) > _layer(m):
                bad.append(f"{m}:{line} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules():
    graph = {m: set(ts) for m, ts in _graph().items()}
    assert _cycles(graph) == []


def test_no_import_cycle_between_packages():
    pgraph: Dict[str, Set[str]] = {}
    for m, ts in _graph().items():
        pgraph.setdefault(_package(m), set()).update(_package(t) for t in ts if _package(t) != _package(m))
    assert _cycles(pgraph) == []


def test_the_checks_catch_a_cycle_and_a_function_level_import(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from sharding.build import run_build\n")
    assert [n for _, n in _imported_modules(f)] == [["sharding.build", "sharding.build.run_build"]]
    assert _layer("ssfer_dist.shards.tario") == 0 and _layer("ssfer_dist.launchers.ray") == 2
    assert _layer("sharding.cli") == 3 and _layer("ssfer_dist.nowhere") == -1


# ------------------------------------------------------------------------------- pure model code
def _forbidden(name: str) -> bool:
    return any(_under(name, f) for f in FORBIDDEN)


def _pure_files():
    for p in PURE:
        path = ROOT / p
        yield from ([path] if path.is_file() else sorted(path.rglob("*.py")))


def test_no_forbidden_import_statements():
    bad = []
    files = list(_pure_files())
    assert len(files) >= 10
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                bad += [f"{f}:{node.lineno} {a.name}" for a in node.names if _forbidden(a.name)]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
                bad += [f"{f}:{node.lineno} {n}" for n in names if _forbidden(n)]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                    "import_module", "__import__"):
                bad.append(f"{f}:{node.lineno} dynamic import")
    assert not bad, bad


def test_importing_pure_packages_loads_no_ray_or_deepspeed():
    code = (
        "import sys, json\n"
        "import ssfer_dist.models.mae, ssfer_dist.models.classifier, ssfer_dist.models.io\n"
        "import ssfer_dist.tasks, ssfer_dist.ssl, ssfer_dist.data.facemix, ssfer_dist.data.transforms\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# ------------------------------------------------------------------------- sharding -> ssfer_dist, one way
def test_ssfer_dist_never_imports_sharding():
    bad = []
    files = sorted((ROOT / "ssfer_dist").rglob("*.py"))
    assert len(files) >= 30
    for f in files:
        rel = f.relative_to(ROOT).as_posix()
        for line, names in _imported_modules(f):
            if any(_under(n, "sharding") for n in names) and rel not in DRIVES_BOTH:
                bad.append(f"{rel}:{line} {names[0]}")
    assert not bad, bad


def test_sharding_imports_only_the_core_of_ssfer_dist():
    bad = []
    files = sorted((ROOT / "sharding").rglob("*.py"))
    assert len(files) >= 10
    for f in files:
        for line, names in _imported_modules(f):
            mod = names[0]
            allowed = [any(_under(n, c) for c in SHARDING_MAY_USE) for n in names]
            # ``from ssfer_dist import storage`` names a package and then core modules
            if _under(mod, "ssfer_dist") and not (allowed[0] or (len(names) > 1 and all(allowed[1:]))):
                bad.append(f"{f.relative_to(ROOT).as_posix()}:{line} {mod}")
    assert not bad, bad
