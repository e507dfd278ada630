"""Per-rank parameter + gradient + optimizer bytes at ZeRO 0/1/2/3 with 2 ranks (ViT-S MAE, AdamW; fp32 or bf16).

Two gloo processes build the engine exactly as training does (``ssfer_dist.distributed.engine``), take one
optimizer step (so AdamW states exist), then run a second forward/backward. Right after that backward,
every live tensor storage in the process is summed (found through the garbage collector, deduplicated by
storage): model parameters (or their ZeRO-3 shards), gradients / gradient partitions and buckets, fp32
master partitions and the AdamW moments. The input batch is excluded; activations are freed by then.

    python benchmarks/zero_memory.py [--size small] [--img-size 224] [--batch 2] [--precision fp32|bf16]

Prints one row per stage and the ratio to ZeRO-0 (target: ZeRO-3 <= 0.6x).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys

import torch
import torch.multiprocessing as mp
import results  # noqa: E402  (benchmarks/results.py: this folder is sys.path[0] for a script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _storage_ptrs(tensors):
    out = {}
    for t in tensors:
        try:
            st = t.untyped_storage()
        except Exception:
            continue
        if st.data_ptr():
            out[st.data_ptr()] = st.nbytes()
    return out


def _breakdown(engine):
    """Bytes of parameter storages and of AdamW state storages (the rest is grads, masters, buckets)."""
    ps = []
    for p in engine.module.parameters():
        ps.append(p.data)
        if hasattr(p, "ds_tensor"):
            ps.append(p.ds_tensor)
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    states = [v for st in base.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return sum(_storage_ptrs(ps).values()), sum(_storage_ptrs(states).values())


def _live_tensor_bytes(exclude) -> int:
    seen = set()
    total = 0
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor):
                continue
        except Exception:
            continue
        ts = [obj]
        if isinstance(obj, torch.nn.Parameter) and hasattr(obj, "ds_tensor"):
            ts.append(obj.ds_tensor)
        for t in ts:
            try:
                st = t.untyped_storage()
            except Exception:
                continue
            ptr = st.data_ptr()
            if ptr == 0 or ptr in seen or ptr in skip:
                continue
            seen.add(ptr)
            total += st.nbytes()
    return total


def _worker(rank: int, world: int, port: int, stage: int, size: str, img_size: int, batch: int, precision: str,
            out_q) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ssfer-torch-extensions"))
    torch.set_num_threads(1)
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from ssfer_dist.config import OptimCfg, TrainCfg
    from ssfer_dist.distributed.engine import build_engine, build_optimizer, ds_config
    from ssfer_dist.models.classifier import param_groups
    from ssfer_dist.models.mae import build_mae

    torch.manual_seed(0)
    model = build_mae(size, img_size, 16)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = build_optimizer(param_groups(model, 0.05, 1.0), OptimCfg(), 1e-4)
    engine = build_engine(model, opt, ds_config(TrainCfg(zero_stage=stage, precision=precision), batch, batch * world))
    x = torch.randn(batch, 3, img_size, img_size)
    if precision == "bf16":
        x = x.to(torch.bfloat16)
    for it in range(2):
        loss, _, _ = engine(x, mask_ratio=0.75)
        engine.backward(loss)
        if it == 1:
            gc.collect()
            measured = _live_tensor_bytes([x])
            p_bytes, s_bytes = _breakdown(engine)
        engine.step()
    out_q.put({"stage": stage, "rank": rank, "bytes": measured, "params": n_params, "trainable": n_trainable,
               "param_bytes": p_bytes, "state_bytes": s_bytes})
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(stage: int, size: str, img_size: int, batch: int, precision: str, world: int = 2):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, stage, size, img_size, batch, precision, q))
             for r in range(world)]
    for p in procs:
        p.start()
    res = [q.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(timeout=120)
    return sorted(res, key=lambda r: r["rank"])


from ssfer_dist.config import TrainCfg as TrainCfgDefault  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    rows = []
    for stage in (0, 1, 2, 3):
        res = measure(stage, a.size, a.img_size, a.batch, a.precision)
        per_rank = max(r["bytes"] for r in res)
        rows.append({"zero_stage": stage, "bytes_per_rank": per_rank, "params": res[0]["params"],
                     "param_bytes": res[0]["param_bytes"], "state_bytes": res[0]["state_bytes"],
                     "trainable": res[0]["trainable"], "ranks": [r["bytes"] for r in res]})
        ranks = ", ".join("%.1f" % (r["bytes"] / 2 ** 20) for r in res)
        print(f"ZeRO-{stage}: {per_rank / 2**20:9.1f} MiB per rank (ranks: {ranks})", flush=True)
        sys.stdout.flush()
    base = rows[0]["bytes_per_rank"]
    print(f"\nViT-{a.size} MAE, {rows[0]['params'] / 1e6:.1f} M params ({rows[0]['trainable'] / 1e6:.1f} M trainable), "
          f"2 ranks, {a.precision} AdamW, ZeRO buckets {TrainCfgDefault.zero_bucket_size:.0e} elements")
    print("stage  MiB/rank  ratio-to-ZeRO-0   params  adam-states  grads+masters+buckets (MiB)")
    mib = 2 ** 20
    for r in rows:
        r["ratio"] = r["bytes_per_rank"] / base
        rest = r["bytes_per_rank"] - r["param_bytes"] - r["state_bytes"]
        print(f"{r['zero_stage']:>5}  {r['bytes_per_rank'] / mib:8.1f}  {r['ratio']:15.3f}"
              f"   {r['param_bytes'] / mib:6.1f}"
              f"  {r['state_bytes'] / mib:11.1f}  {rest / mib:8.1f}")
    z3 = rows[3]["ratio"]
    print(f"\nZeRO-3 / ZeRO-0 = {z3:.3f}  (target <= 0.6: {'met' if z3 <= 0.6 else 'NOT met'})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    results.record(f"zero_memory_{a.size}_{a.precision}", results.command_line(argv),
                   {f"ZeRO-{r['zero_stage']}": [r["bytes_per_rank"] / mib] for r in rows},
                   unit="MiB per rank (param + grad + optimizer)", baseline="ZeRO-0",
                   note=f"ViT-{a.size} MAE, {a.img_size} px, 2 ranks, {a.precision} AdamW; target ZeRO-3 ≤ 0.6× ZeRO-0")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
