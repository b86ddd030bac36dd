"""Where the comparison step's fwd+bwd (docs/performance.md) spends its time: a jax.profiler trace of the A3 and AR steps read
per executed XLA:CPU thunk, made exclusive (children subtracted), summed by HLO op kind and by the
model code region (op_name), plus the exact FLOPs of each compiled step (XLA's cost analysis).

    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python bench/profile_step.py [--reps 3] [--top 25]

Run it on a quiet machine: the shares are of thread-busy time, the absolute ms of one step.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import forward  # noqa: E402  (bench/forward.py: the comparison step's config and the same loss functions)


def op_table(hlo_text: str) -> dict:
    """instruction name -> (opcode-ish kind, op_name metadata) from the compiled module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(", line)
        if not m:
            continue
        name, shape, opcode = m.groups()
        kind = opcode
        km = re.search(r'kind=(\w+)', line)
        if opcode == "fusion" and km:
            kind = f"fusion:{km.group(1)}"
        if "__cpu$ynn" in line or "ynn" in name:
            kind = "ynn_fusion"
        opn = re.search(r'op_name="([^"]*)"', line)
        out[name] = (kind, shape, opn.group(1) if opn else "")
    return out


def region(op_name: str) -> str:
    """A coarse model-code region from an op_name (jit(...)/jvp(...)/transpose(...)/... path)."""
    bwd = "transpose(" in op_name
    s = op_name
    for key, lab in (("_flash", "attention kernel"), ("swiglu", "mlp"), ("silu", "mlp"),
                     ("rms_norm", "rms_norm"), ("apply_rope", "rope"), ("log_softmax", "loss/lm_head"),
                     ("take_along_axis", "loss/lm_head")):
        if key in s:
            return lab + (" bwd" if bwd else "")
    m = re.search(r"(dot_general|concatenate|broadcast_in_dim|slice|add_any|transpose|reshape|"
                  r"gather|scatter|mul|add|select_n|convert_element_type|reduce_sum|dynamic_slice|"
                  r"dynamic_update_slice|copy|exp|rsqrt)", s.split("/")[-1] if s else "")
    return (m.group(1) if m else (s.split("/")[-1][:30] or "?")) + (" bwd" if bwd else "")


def profile(fn, args, reps):
    """Traces `reps` calls of fn(*args) (after a warm call); returns {thunk name: exclusive ns / rep}."""
    jax.block_until_ready(fn(*args))
    d = tempfile.mkdtemp(prefix="a3jax_prof_")
    with jax.profiler.trace(d):
        for _ in range(reps):
            jax.block_until_ready(fn(*args))
    pd = jax.profiler.ProfileData.from_file(sorted(glob.glob(f"{d}/**/*.xplane.pb", recursive=True))[-1])
    excl = collections.Counter()
    for plane in pd.planes:
        for line in plane.lines:
            evs = sorted(((e.start_ns, e.duration_ns, e.name) for e in line.events), key=lambda x: (x[0], -x[1]))
            stack = []  # (end, name, index) of the open events on this thread
            durs = [dur for _, dur, _ in evs]
            for i, (s, dur, name) in enumerate(evs):
                while stack and stack[-1][0] <= s:
                    stack.pop()
                if stack:
                    durs[stack[-1][2]] -= dur
                stack.append((s + dur, name, i))
            for (s, dur, name), ex in zip(evs, durs):
                excl[name] += ex
    return {n: v / reps for n, v in excl.items()}


def report(label, jitted, args, reps, top, dump=""):
    compiled = jitted.lower(*args).compile()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    flops = float(ca.get("flops", 0.0))
    ops = op_table(compiled.as_text())
    t0 = time.perf_counter()
    excl = profile(jitted, args, reps)
    by_kind, by_region, by_op = collections.Counter(), collections.Counter(), collections.Counter()
    by_part = collections.Counter()
    for name, ns in excl.items():
        if name not in ops:
            continue
        kind, shape, opn = ops[name]
        by_kind[kind] += ns
        by_region[region(opn)] += ns
        # The attention kernel's loops are while loops; everything else is outside them.
        part = "attention loops" if "while" in opn else "outside attention"
        cls = "matmul" if kind in ("ynn_fusion", "dot") else ("copy" if kind in ("copy", "transpose") else "elementwise")
        by_part[f"{part}, {cls}{' bwd' if 'transpose(' in opn else ''}"] += ns
        by_op[(name, kind, shape[:60], opn)] += ns
    busy = sum(by_kind.values())
    print(f"\n== {label}: XLA flops {flops / 1e9:.1f} GFLOP; thread-busy {busy / 1e6:.0f} ms per step "
          f"(profiled {time.perf_counter() - t0:.1f} s)")
    for title, table in (("op kind", by_kind), ("part", by_part), ("region", by_region)):
        print(f"  by {title}:")
        for k, v in table.most_common(14):
            print(f"    {k:<40} {v / 1e6:8.1f} ms {100 * v / busy:5.1f}%")
    if dump:
        with open(f"{dump}.{label.split()[0]}.tsv", "w") as f:
            for (name, kind, shape, opn), v in by_op.most_common():
                f.write(f"{v / 1e6:.3f}\t{name}\t{kind}\t{shape}\t{opn}\n")
    print("  top thunks:")
    for (name, kind, shape, opn), v in by_op.most_common(top):
        print(f"    {v / 1e6:7.1f} ms {100 * v / busy:4.1f}% {kind:<18} {shape[:48]:<48} {opn[-70:]}")
    return {"flops": flops, "busy_ms": busy / 1e6, "parts_ms": {k: v / 1e6 for k, v in by_part.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--which", default="a3,ar")
    ap.add_argument("--dump", default="", help="write every thunk's time to DUMP.A3.tsv / DUMP.AR.tsv")
    a = ap.parse_args()
    cfg = forward.ISSUE_CFG
    rng = np.random.default_rng(0)
    b, t = 4, a.seq
    from a3jax.model import init_params
    import dataclasses
    cfg = dataclasses.replace(cfg, attention="blockwise")
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    segs = jnp.ones((b, t), jnp.int32)
    positions, groups = forward.random_groups_sorted(rng, b, t)
    ar = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    res = {}
    if "a3" in a.which:
        res["a3"] = report("A3 (query-stream loss)", forward.loss_fn(cfg, "query"),
                           (params, tokens, jnp.asarray(positions), jnp.asarray(groups), segs), a.reps, a.top, a.dump)
    if "ar" in a.which:
        res["ar"] = report("AR (content stream)", forward.loss_fn(cfg, "content"),
                           (params, tokens, ar, ar, segs), a.reps, a.top, a.dump)
    if len(res) == 2:
        print(f"\nA3/AR: XLA flops {res['a3']['flops'] / res['ar']['flops']:.3f}, "
              f"thread-busy time {res['a3']['busy_ms'] / res['ar']['busy_ms']:.3f}")
        print(f"  {'part':<40} {'A3 ms':>8} {'AR ms':>8} {'A3/AR':>6}")
        pa, pr = res["a3"]["parts_ms"], res["ar"]["parts_ms"]
        for k in sorted(set(pa) | set(pr), key=lambda k: -pa.get(k, 0)):
            print(f"  {k:<40} {pa.get(k, 0):8.1f} {pr.get(k, 0):8.1f} {pa.get(k, 0) / max(pr.get(k, 0), 1e-9):6.2f}")


if __name__ == "__main__":
    main()
