"""One layer's attention of the comparison step (docs/performance.md), fwd+bwd: a3jax's blockwise kernel at several block
sizes against torch's SDPA called as the reference A3 code calls it (one call per stream, a boolean
T x T mask, K/V repeated to all heads).

    python bench/attention_cpu.py [--blocks 128x128,256x256] [--rounds 7] [--out bench/results/attention_cpu.json]

Shapes: B = 4, T = 1024 keys, the fused content+query stack of 2T rows, 8 heads / 4 KV heads, d = 32,
random groups of 4 in generation order. All variants are timed in one process, in interleaved
rounds; gradients are checked against the first variant's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import forward  # noqa: E402  (the comparison step's group layout)
from a3jax import masks  # noqa: E402
from a3jax.model.attention import blockwise_attention  # noqa: E402

B, T, H, HKV, D = 4, 1024, 8, 4, 32


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="128x128,256x256,256x128", help="query x key block sizes")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attention_cpu.json"))
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    _, groups = forward.random_groups_sorted(rng, B, T)
    groups, segs = jnp.asarray(groups), jnp.ones((B, T), jnp.int32)
    q = jnp.asarray(rng.standard_normal((B, 2 * T, H, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, HKV, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, HKV, D)), jnp.float32)
    do = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    qg = jnp.concatenate([masks.stream_groups(groups, masks.CONTENT), masks.stream_groups(groups, masks.QUERY)], 1)
    qs = jnp.concatenate([segs, segs], 1)
    fns, diffs, first = {}, {}, None
    for pair in a.blocks.split(","):
        bq, bk = (int(x) for x in pair.split("x"))
        loss = lambda q, k, v, bq=bq, bk=bk: (blockwise_attention(q, k, v, qg, qs, groups, segs, bq, bk) * do).sum()
        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        out = jax.block_until_ready(g(q, k, v))
        first = first or out
        name = f"a3jax blockwise {bq} x {bk}"
        diffs[name] = max(float(jnp.abs(x - y).max()) for x, y in zip(out, first))
        fns[name] = lambda g=g: jax.block_until_ready(g(q, k, v))
    if not a.no_torch:
        import torch

        torch.set_num_threads(2)
        to_t = lambda x: torch.tensor(np.asarray(x)).permute(0, 2, 1, 3).contiguous()  # noqa: E731
        tq, tk, tv = to_t(q), to_t(k).repeat_interleave(H // HKV, 1), to_t(v).repeat_interleave(H // HKV, 1)
        tdo = to_t(do)
        gg = torch.tensor(np.asarray(groups))
        cmask = (gg[:, None, :] <= gg[:, :, None])[:, None]  # content rows: groups <= own
        qmask = (gg[:, None, :] < gg[:, :, None])[:, None]  # query rows: groups < own
        qmask[..., 0] |= ~qmask.any(-1)  # SDPA needs a visible key in every row

        def torch_step():
            qc, qq = (tq[:, :, s].clone().requires_grad_() for s in (slice(0, T), slice(T, None)))
            kk, vv = tk.clone().requires_grad_(), tv.clone().requires_grad_()
            sdpa = torch.nn.functional.scaled_dot_product_attention
            oc, oq = sdpa(qc, kk, vv, attn_mask=cmask), sdpa(qq, kk, vv, attn_mask=qmask)
            (oc * tdo[:, :, :T]).sum().add((oq * tdo[:, :, T:]).sum()).backward()

        torch_step()
        fns["torch SDPA (2 calls, boolean masks)"] = torch_step
    times = {n: [] for n in fns}
    for _ in range(a.rounds):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    rows = {n: {"median_ms": 1e3 * statistics.median(t), "best_ms": 1e3 * min(t), "max_grad_diff": diffs.get(n)}
            for n, t in times.items()}
    print(f"{'kernel':>38} {'median ms':>10} {'best ms':>8} {'grad diff':>10}")
    for n, r in rows.items():
        gd = "" if r["max_grad_diff"] is None else f"{r['max_grad_diff']:.1e}"
        print(f"{n:>38} {r['median_ms']:>10.1f} {r['best_ms']:>8.1f} {gd:>10}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "command": "python bench/attention_cpu.py " +
                   " ".join(sys.argv[1:]), "load": os.getloadavg(), "rows": rows}, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
