"""``benchmarks/gpu.py --cpu-smoke``: the GPU check's script, tiny on the CPU — as it must run on the GPU
machine, where Ray and boto3 are not installed (both are blocked from import here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCKER = '''
import sys
class _Block:
    """Ray and boto3 are absent on the GPU check machine: importing them fails here too."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "boto3", "botocore"):
            raise ImportError(f"{name} is blocked (absent on the GPU check machine)")
        return None
sys.meta_path.insert(0, _Block())
'''


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_cpu_smoke_runs_three_stages_and_a_resume_without_ray(tmp_path):
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(block), ROOT])
    env.pop("RAY_ADDRESS", None)
    probe = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert probe.returncode != 0 and "blocked" in probe.stderr          # the blocker works
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--cpu-smoke", "--out", str(out),
                        "--work", str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=840,
                       cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["cpu_smoke"] and s["matmul_peak_tflops"] > 0
    step = s["step"][0]
    assert step["img_per_s"] > 0 and step["flops_per_step"] > 0 and 0 < step["mfu"] < 1.5
    stages = s["loop"]["stages"]
    assert set(stages) == {"pretrain", "finetune", "semisup"}
    for name, st in stages.items():
        assert st["ok"] and st["exit"] == 0 and st["export"] and st["loss_falls"], (name, st)
    assert stages["semisup"]["failed_as_planned"] and stages["semisup"]["resumed"]
    for name in ("finetune", "semisup"):                  # evaluation while training, best step exported
        assert stages[name]["export_best"] and 0 <= stages[name]["eval_accuracy_last"] <= 1
    assert stages["pretrain"]["steps"] == 20 and s["loop_vs_bare"] > 0
    runs = tmp_path / "work" / "runs"
    for name in ("pretrain", "finetune", "semisup"):
        assert (runs / f"gpu-smoke-{name}" / "export" / "model.safetensors").exists()
