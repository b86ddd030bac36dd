"""Per-device HBM temporaries of attention vs T (dense, blockwise, pallas), from the TPU compiler's
memory analysis on this CPU host, plus `a3jax compile` reports with `attention=pallas`.

    python bench/pallas_attention.py [--topology v5p:2x2x1] [--lengths 1024,2048,...]
        [--reports] [--out bench/results/pallas_attention.json]

Part 1 compiles, for one TPU chip of --topology, the forward+backward of one attention layer at
LLaMA-3.2-1B's shapes (hidden 2048, 32 query heads, 8 kv heads, head dim 64: q/k/v projections,
attention, output projection), batch 1, bf16, over a two-stream A3 row (T content rows + T query
rows against T keys), for each kernel and T, and reports `temp_size_in_bytes` (inputs, weights and
the cotangent are arguments). Nothing runs; no TPU is needed.

Part 2 (--reports) runs `a3jax compile` on LLaMA-3.1-8B (configs/pod/llama3.1-8b-v5p.yaml) for
v5p:4x4x4 and on the 1B config at T = 32768 for v5p:2x2x1, both with model.attention=pallas.
Prints tables and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from a3jax import masks  # noqa: E402
from a3jax.compile import compile_report, format_report, topology_devices  # noqa: E402
from a3jax.config import load_config  # noqa: E402
from a3jax.model.attention import attention  # noqa: E402
from a3jax.model.pallas_attention import compile_target  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("dense", "blockwise", "pallas")


def attention_memory(device, kind, t, heads=32, kv_heads=8, head_dim=64, hidden=2048, block=128):
    """Compiled temporaries of one attention layer's forward+backward: the q/k/v projections of a
    [1, 2T, hidden] two-stream input (T content rows, then T query rows; keys from the content rows),
    the attention, the output projection, and a real cotangent (an argument). The projections are
    included so that XLA can fold the kernels' head-major layout changes into the matmuls, as it does
    in the model; they cost every kernel the same."""
    sh = jax.sharding.SingleDeviceSharding(device)
    a = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sh)

    def loss(x, wq, wk, wv, wo, cot, groups, segs):
        q = jnp.einsum("bte,ehd->bthd", x, wq)
        k = jnp.einsum("bte,ehd->bthd", x[:, :t], wk)
        v = jnp.einsum("bte,ehd->bthd", x[:, :t], wv)
        rows_g = jnp.concatenate([groups, masks.stream_groups(groups, masks.QUERY)], axis=1)
        rows_s = jnp.concatenate([segs, segs], axis=1)
        o = attention(kind, q, k, v, rows_g, rows_s, groups, segs, block)
        y = jnp.einsum("bthd,hde->bte", o, wo)
        return (y.astype(jnp.float32) * cot).sum()

    args = (a((1, 2 * t, hidden)), a((hidden, heads, head_dim)), a((hidden, kv_heads, head_dim)),
            a((hidden, kv_heads, head_dim)), a((heads, head_dim, hidden)), a((1, 2 * t, hidden)),
            a((1, t), jnp.int32), a((1, t), jnp.int32))
    t0 = time.perf_counter()
    try:
        with compile_target("tpu"):
            compiled = jax.jit(jax.grad(loss, (0, 1, 2, 3, 4))).lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:  # the compiler's own verdict: does not fit the chip
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        need = re.search(r"temporaries \(([\d.]+)G\)", str(e))
        return {"kind": kind, "T": t, "temp_bytes": None, "fits": False,
                "needs_gib": float(need.group(1)) if need else None, "error": str(e).splitlines()[0][:300],
                "compile_s": round(time.perf_counter() - t0, 2)}
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    return {"kind": kind, "T": t, "temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes), "flops_xla": float(cost.get("flops", -1)),
            "compile_s": round(time.perf_counter() - t0, 2)}


def _mib(x):
    return f"{x / 2 ** 20:10.1f}" if x is not None else "  over HBM"


def part1(topology, lengths):
    dev = topology_devices(topology)[0]
    rows = []
    for t in lengths:
        for kind in KINDS:
            r = attention_memory(dev, kind, t)
            rows.append(r)
            print(f"  {kind:<10} T={t:>6}: temporaries {_mib(r['temp_bytes'])} MiB"
                  + (f" (compiler: needs {r['needs_gib']} GiB)" if r.get("needs_gib") else "")
                  + f", compiled {r['compile_s']} s", flush=True)
    print(f"\nper-device HBM temporaries of one attention layer fwd+bwd (MiB), {dev.device_kind}, 1B shapes, batch 1, bf16")
    print(f"{'T':>7}" + "".join(f"{k:>12}" for k in KINDS))
    for t in lengths:
        by = {r["kind"]: r for r in rows if r["T"] == t}
        print(f"{t:>7}" + "".join(f"{_mib(by[k]['temp_bytes']):>12}" for k in KINDS))
    return {"device_kind": dev.device_kind, "topology": topology, "rows": rows}


def part2():
    out = {}
    runs = {
        "llama3.1-8b_v5p-4x4x4": (os.path.join(ROOT, "configs/pod/llama3.1-8b-v5p.yaml"), "v5p:4x4x4",
                                  ["model.attention=pallas"]),
        "llama3.2-1b_T32k_v5p-2x2x1": (os.path.join(ROOT, "configs/base.yaml"), "v5p:2x2x1",
                                       ["model=llama3.2-1b", "model.attention=pallas", "model.remat=full",
                                        "data.seq_len=32768", "train.global_batch_size=4"]),
    }
    for name, (path, topo, overrides) in runs.items():
        t0 = time.perf_counter()
        cfg = load_config(path, overrides)
        rep = compile_report(cfg, topo, group_size=4)
        rep["overrides"], rep["wall_s"] = overrides, round(time.perf_counter() - t0, 1)
        print(f"\n{name}: {path} {' '.join(overrides)}\n" + format_report(rep), flush=True)
        out[name] = rep
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default="v5p:2x2x1")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--reports", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/pallas_attention.json"))
    ns = ap.parse_args()
    res = {"jax": jax.__version__, "load": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    res["memory_vs_T"] = part1(ns.topology, [int(x) for x in ns.lengths.split(",") if x])
    if ns.reports:
        res["reports"] = part2()
    os.makedirs(os.path.dirname(ns.out), exist_ok=True)
    with open(ns.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\nwrote {ns.out}")


if __name__ == "__main__":
    main()
