"""The issue-15 table's steps only (a3jax A3, a3jax AR, and the reference A3 code when REF=DIR is
set), 3 interleaved rounds, best wall s / median CPU s: a quick before/after of a code change. Run it
once per checkout, back to back, under the CPU lock:

    PYTHONPATH=/path/to/main REF=/tmp/a3ref python bench/ab_step.py /tmp/before.json
    PYTHONPATH=$PWD          REF=/tmp/a3ref python bench/ab_step.py /tmp/after.json
"""
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import a3jax  # noqa: E402
import forward  # noqa: E402

print(a3jax.__file__, "load", os.getloadavg())
rng = np.random.default_rng(0)
a3, ar = forward.step_fns(forward.ISSUE_CFG, 4, 1024, "blockwise", rng)
fns = {"A3": a3, "AR": ar}
if os.environ.get("REF"):
    import reference_a3

    c = forward.ISSUE_CFG
    fns["reference"] = reference_a3.make_step(os.environ["REF"], c.vocab_size, c.hidden_size, c.num_layers,
                                              c.num_heads, c.num_kv_heads, c.intermediate_size, 4, 1024)
r = forward.interleaved(fns, 3)
for n, (w, c) in r.items():
    print(f"{n} best {w:.3f} s cpu {c:.2f}")
print(f"A3/AR {r['A3'][0] / r['AR'][0]:.3f}", f"reference/A3 {r['reference'][0] / r['A3'][0]:.3f}" if "reference" in r else "")
print("load after", os.getloadavg())
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump({n: {"s": w, "cpu_s": c} for n, (w, c) in r.items()}, f, indent=1)
