"""XLA:CPU compiler options on the comparison step (docs/performance.md): each variant's A3 and AR fwd+bwd compiled in ONE process
with `compiled = jit(f).lower(...).compile(options)`, timed in interleaved rounds (so the machine's drift
hits every variant alike), and each variant's A3 loss and gradients compared with the default's.

    python bench/xla_options.py [--reps 5] [--variants default,eigen_dots,...] [--out ...]

Per-process XLA_FLAGS runs of the same step differ by ~5% between processes on the 2-core VM, more than
most options change; compiling every variant in one process removes that. An option counts only if its
gradients match the default's (f32 tolerance) and it wins in both A3 and AR or at least in A3 without
losing AR. Options that cannot be expressed as compile options (e.g. --xla_force_host_platform_device_count)
are not here.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import forward  # noqa: E402  (bench/forward.py: the comparison step's config and the same loss functions)

# name -> compile options (DebugOptions fields). A repeated enum field takes one enum name, or "" for none.
VARIANTS = {
    "default": {},
    # dots to XLA's own Eigen/tiled dot thunks instead of YNNPACK; YNNPACK keeps the reductions
    "eigen_dots": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"},
    "no_ynn": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "vec512": {"xla_cpu_prefer_vector_width": 512},
    "eigen_dots_vec512": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
                          "xla_cpu_prefer_vector_width": 512},
    "eigen_dots_1thread": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
                           "xla_cpu_multi_thread_eigen": False},
    "default_again": {},  # the same options compiled again: the noise floor of one run
    "no_ynn_vec512": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_prefer_vector_width": 512},
    "no_concurrency_sched": {"xla_cpu_enable_concurrency_optimized_scheduler": False},
    "no_fusion_emitters": {"xla_cpu_use_fusion_emitters": False},
    "ynn_dot_fusion": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "xnn_graph_greedy": {"xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"},
}


def grads_close(a, b) -> float:
    """Largest |a - b| / max|a| over the loss and every gradient leaf."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / (np.max(np.abs(np.asarray(x))) + 1e-30))
               for x, y in zip(la, lb))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "xla_options.json"))
    args = ap.parse_args()
    names = args.variants.split(",")
    (a3, a3_args), (arf, ar_args) = forward.step_inputs(forward.ISSUE_CFG, 4, 1024, "blockwise",
                                                        np.random.default_rng(0))
    result = {"machine": f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cores",
              "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": "python bench/xla_options.py " + " ".join(sys.argv[1:]),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_before": forward.load_average(), "variants": {}}
    fns, ref = {}, None
    for n in names:
        try:
            c3 = a3.lower(*a3_args).compile(VARIANTS[n])
            car = arf.lower(*ar_args).compile(VARIANTS[n])
            out = c3(*a3_args)
        except Exception as e:  # an option this jaxlib rejects or cannot compile: a result, not a crash
            print(f"{n}: failed: {str(e).splitlines()[0][:160]}", flush=True)
            result["variants"][n] = {"options": VARIANTS[n], "error": str(e)[:400]}
            continue
        ref = out if ref is None else ref
        diff = grads_close(ref, out)
        fns[n + " A3"] = (lambda c=c3: jax.block_until_ready(c(*a3_args)))
        fns[n + " AR"] = (lambda c=car: jax.block_until_ready(c(*ar_args)))
        result["variants"][n] = {"options": VARIANTS[n], "loss": float(out[0]), "max_rel_diff_vs_first": diff}
        print(f"{n}: compiled; A3 loss {float(out[0]):.7f}, grads vs {names[0]}: max rel diff {diff:.2e}", flush=True)
    r = forward.interleaved(fns, args.reps)
    base = names[0]
    print(f"\n{'variant':>22} {'A3 s':>7} {'CPU s':>6} {'AR s':>7} {'CPU s':>6} {'A3/AR':>6} {'A3 vs ' + base:>12}")
    for n in result["variants"]:
        if n + " A3" not in r:
            continue
        (w3, c3), (wr, cr) = r[n + " A3"], r[n + " AR"]
        v = result["variants"][n]
        v.update(a3_s=w3, a3_cpu_s=c3, ar_s=wr, ar_cpu_s=cr, a3_over_ar=w3 / wr)
        rel = w3 / r[base + " A3"][0] if base + " A3" in r else float("nan")
        print(f"{n:>22} {w3:>7.3f} {c3:>6.2f} {wr:>7.3f} {cr:>6.2f} {w3 / wr:>6.2f} {rel:>12.3f}")
    forward.finish(result, args.out)


if __name__ == "__main__":
    main()
