"""models/, tasks/, ssl/ are pure torch: they import no ray, deepspeed or torch.distributed."""
from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PURE = ["ssfer_dist/models", "ssfer_dist/tasks", "ssfer_dist/ssl", "ssfer_dist/data/facemix.py",
        "ssfer_dist/data/transforms.py"]
FORBIDDEN = ("ray", "deepspeed", "torch.distributed")


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def _files():
    for p in PURE:
        path = ROOT / p
        yield from ([path] if path.is_file() else sorted(path.rglob("*.py")))


def test_no_forbidden_import_statements():
    bad = []
    files = list(_files())
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
# sharding/ builds on the core of ssfer_dist (the shard contract and the helpers both sides need); no library
# module of ssfer_dist imports sharding. The demo and the sweep, the applications that drive both, are the
# exceptions.
CORE = ("ssfer_dist.errors", "ssfer_dist.storage", "ssfer_dist.typed", "ssfer_dist.detect",
        "ssfer_dist.shards.schema", "ssfer_dist.shards.manifest", "ssfer_dist.shards.tario", "ssfer_dist.worker_env",
        "ssfer_dist.shards.safeimage")
DRIVES_BOTH = {"ssfer_dist/demo.py", "ssfer_dist/sweep.py"}


def _imported_modules(path: pathlib.Path):
    """Every module an import statement in ``path`` names, at any depth (function-level imports included)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield node.lineno, [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            yield node.lineno, [node.module] + [f"{node.module}.{a.name}" for a in node.names]


def _under(name: str, pkg: str) -> bool:
    return name == pkg or name.startswith(pkg + ".")


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
            in_core = [any(_under(n, c) for c in CORE) for n in names]
            # ``from ssfer_dist import storage`` names a package and then core modules
            if _under(mod, "ssfer_dist") and not (in_core[0] or (len(names) > 1 and all(in_core[1:]))):
                bad.append(f"{f.relative_to(ROOT).as_posix()}:{line} {mod}")
    assert not bad, bad


def test_the_one_way_rule_catches_a_back_edge(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from sharding.build import run_build\n")
    assert [n for _, n in _imported_modules(f)] == [["sharding.build", "sharding.build.run_build"]]
