"""Start-up cost of a DeepSpeed engine (issue 16): with ZeRO on, DeepSpeed imports its Muon optimizer to check
ours, and Muon's ``torch.compile`` decorators import ``torch._inductor`` (1.3-1.5 s per rank). ``build_engine``
imports the same modules with the compile deferred to the first call: no inductor before or after training
steps, DeepSpeed's own Muon class in place, and the same losses as an engine built by ``deepspeed.initialize``
itself. Run in a fresh interpreter: what this process imported before must not hide the import."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r"""
    import json, sys, torch
    torch.set_num_threads(1)
    import deepspeed
    from ssfer_dist.config import OptimCfg, TrainCfg
    from ssfer_dist.distributed.engine import build_engine, build_optimizer, ds_config
    from ssfer_dist.models.classifier import param_groups
    from ssfer_dist.models.mae import build_mae

    INDUCTOR = "torch._inductor.compile_fx"

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
    before = INDUCTOR in sys.modules
    model, opt = model_opt()
    ours = losses(build_engine(model, opt, cfg))
    after = INDUCTOR in sys.modules
    from deepspeed.runtime.zero.muon import muon_optimizer, original_muon
    wrapped = getattr(original_muon.muon_update, "__wrapped__", None) is not None
    model, opt = model_opt()
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    plain = losses(engine)
    print("RESULT " + json.dumps({"before": before, "after": after, "ours": ours, "plain": plain,
                                  "muon_class": muon_optimizer.MuonWithAuxAdam.__module__, "wrapped": wrapped}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_zero_engine_does_not_import_inductor_and_trains_the_same(tmp_path):
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stdout[-2000:] + p.stderr[-4000:]
    r = json.loads(line[0][len("RESULT "):])
    assert not r["before"] and not r["after"], r          # no torch._inductor for an AdamW run
    assert r["muon_class"] == "deepspeed.runtime.zero.muon.muon_optimizer" and r["wrapped"], r
    assert r["ours"] == r["plain"], r                     # the same engine, bit for bit
