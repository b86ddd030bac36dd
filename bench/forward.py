"""Forward+backward of the two-stream A3 loss vs the same model in content-only causal (AR) mode,
dense vs blockwise attention, plus the reference-code comparison and attention memory vs T.

    python bench/forward.py [--quick] [--out bench/results/forward.json]

Prints a table and writes JSON. Ratios are measured in one run, on one machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from a3jax.config import ModelConfig  # noqa: E402
from a3jax.model import apply_model, init_params  # noqa: E402

ISSUE_CFG = ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                        num_kv_heads=4, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)


def random_groups_sorted(rng, b, t, k=4):
    """Random groups of k positions in random order, rows in generation order (sorted by group)."""
    positions = np.stack([rng.permutation(t) for _ in range(b)])
    groups = np.broadcast_to(np.arange(t) // k, (b, t)).copy()
    return positions.astype(np.int32), groups.astype(np.int32)


def loss_fn(cfg, stream):
    def loss(params, tokens, positions, groups, segs):
        logits = apply_model(cfg, params, tokens, positions, groups, segs, stream)
        if stream == "content":  # AR: position i predicts token i+1
            logits, target = logits[:, :-1], tokens[:, 1:]
        else:  # A3: query row i predicts token i
            target = tokens
        lp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(lp, target[..., None], -1).mean()
    return jax.jit(jax.value_and_grad(loss))


def time_it(fn, args, reps):
    out = fn(*args)
    jax.block_until_ready(out)  # compile + warm
    best = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best.append(time.perf_counter() - t0)
    return float(np.median(best))


def a3_vs_ar(cfg, b, t, kind, reps, rng):
    cfg = dataclasses.replace(cfg, attention=kind)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    segs = jnp.ones((b, t), jnp.int32)
    positions, groups = random_groups_sorted(rng, b, t)
    ar = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    t_a3 = time_it(loss_fn(cfg, "query"), (params, tokens, jnp.asarray(positions), jnp.asarray(groups), segs), reps)
    t_ar = time_it(loss_fn(cfg, "content"), (params, tokens, ar, ar, segs), reps)
    return t_a3, t_ar


def attention_temp_bytes(cfg, b, t, kind):
    """XLA's temp allocation for fwd+bwd of the A3 loss: what grows with T."""
    cfg = dataclasses.replace(cfg, attention=kind)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    i32 = jax.ShapeDtypeStruct((b, t), jnp.int32)
    compiled = loss_fn(cfg, "query").lower(params, i32, i32, i32, i32).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def torch_reference_time(cfg, b, t, reps, rng):
    import torch

    from torch_reference import RefA3

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = RefA3(cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
                  cfg.intermediate_size)
    tokens = torch.as_tensor(rng.integers(0, cfg.vocab_size, (b, t)))
    # Random groups of 4 in the reference's layout: group id per position, original order.
    groups = torch.as_tensor(np.stack([rng.permutation(t) // 4 for _ in range(b)]))

    def step():
        model.zero_grad()
        logits = model(tokens, groups)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), tokens.reshape(-1))
        loss.backward()

    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, skip T=2048 memory point")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference timing")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "forward.json"))
    args = ap.parse_args()
    reps = 2 if args.quick else 3
    rng = np.random.default_rng(0)
    result = {"machine": f"{platform.node()} {platform.processor() or platform.machine()} "
                         f"{os.cpu_count()} cores", "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d"), "a3_vs_ar": [], "memory": [], "issue_step": {}}

    print(f"{'seq':>5} {'kernel':>9} {'A3 fwd+bwd s':>13} {'AR fwd+bwd s':>13} {'A3/AR':>6}")
    for t in (256, 1024):
        for kind in ("dense", "blockwise"):
            a3, ar = a3_vs_ar(ISSUE_CFG, 4, t, kind, reps, rng)
            result["a3_vs_ar"].append(dict(seq=t, kernel=kind, a3_s=a3, ar_s=ar, ratio=a3 / ar))
            print(f"{t:>5} {kind:>9} {a3:>13.3f} {ar:>13.3f} {a3 / ar:>6.2f}")

    print(f"\n{'seq':>5} {'dense temp MiB':>15} {'blockwise temp MiB':>19}")
    for t in (256, 512, 1024) + (() if args.quick else (2048,)):
        d, bw = (attention_temp_bytes(ISSUE_CFG, 4, t, k) / 2**20 for k in ("dense", "blockwise"))
        result["memory"].append(dict(seq=t, dense_mib=d, blockwise_mib=bw))
        print(f"{t:>5} {d:>15.1f} {bw:>19.1f}")

    best = min((r for r in result["a3_vs_ar"] if r["seq"] == 1024), key=lambda r: r["a3_s"])
    issue = {"a3jax_s": best["a3_s"], "a3jax_kernel": best["kernel"]}
    if not args.no_torch:
        issue["torch_reference_s"] = torch_reference_time(ISSUE_CFG, 4, 1024, reps, rng)
        issue["speedup"] = issue["torch_reference_s"] / issue["a3jax_s"]
    result["issue_step"] = issue
    print("\nissue config (4L, d256, 8h/4kv, MLP 688, V1024, B4, T1024, random groups of 4, fp32):")
    for k, v in issue.items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
