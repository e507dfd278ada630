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
