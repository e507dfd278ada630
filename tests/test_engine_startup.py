"""``build_engine`` is DeepSpeed's own engine: a ZeRO-2 engine built from our config trains with the same losses,
bit for bit, as one built by ``deepspeed.initialize`` itself, and ``ds_config(..., load_universal=True)`` is
DeepSpeed's documented ``checkpoint.load_universal`` key, which the engine reports. Run in a fresh interpreter
(one rank of its own)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r"""
    import json, torch
    torch.set_num_threads(1)
    import deepspeed
    from ssfer_dist.config import OptimCfg, TrainCfg
    from ssfer_dist.distributed.engine import build_engine, build_optimizer, ds_config
    from ssfer_dist.models.classifier import param_groups
    from ssfer_dist.models.mae import build_mae

    def losses(engine):
        out = []
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            loss, _, _ = engine(torch.randn(4, 3, 32, 32, generator=g), mask_ratio=0.75,
                                noise=torch.rand(4, 16, generator=g))
            engine.backward(loss)
            engine.step()
            out.append(float(loss))
        return out

    def model_opt():
        torch.manual_seed(0)
        model = build_mae("micro", 32, 8)
        return model, build_optimizer(param_groups(model, 0.05, 1.0), OptimCfg(), 1e-3)

    cfg = ds_config(TrainCfg(zero_stage=2, grad_clip=1.0), 4, 4)
    model, opt = model_opt()
    ours = build_engine(model, opt, cfg)
    ours_losses = losses(ours)
    model, opt = model_opt()
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    plain = losses(engine)
    universal_cfg = ds_config(TrainCfg(zero_stage=2, grad_clip=1.0), 4, 4, load_universal=True)
    model, opt = model_opt()
    universal = build_engine(model, opt, universal_cfg)
    print("RESULT " + json.dumps({"ours": ours_losses, "plain": plain, "key": universal_cfg.get("checkpoint"),
                                  "universal": universal.load_universal_checkpoint(),
                                  "default": ours.load_universal_checkpoint()}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# generous: the first DeepSpeed engine on a machine JIT-builds its CPU comm op (then cached in TORCH_EXTENSIONS_DIR)
@pytest.mark.timeout(600)
def test_build_engine_trains_as_deepspeed_initialize_and_takes_load_universal(tmp_path):
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=540,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stdout[-2000:] + p.stderr[-4000:]
    r = json.loads(line[0][len("RESULT "):])
    assert r["ours"] == r["plain"], r                     # the same engine, bit for bit
    assert r["key"] == {"load_universal": True} and r["universal"] is True and r["default"] is False, r
