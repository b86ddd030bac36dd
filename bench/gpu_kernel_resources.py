"""Registers, spills and shared memory of the `pallas_gpu` kernels, compiled for a GPU on a CPU host.

    python bench/gpu_kernel_resources.py [--triton-python PY] [--arch 90] [--out bench/results/gpu_kernel_resources.json]

No GPU is needed. For each shape below the script lowers the kernel's forward and backward for
CUDA (as `a3jax compile --platform cuda` does), keeps the Triton IR (TTIR) Pallas hands to XLA and the
warps and stages it asks for, and compiles that IR to a cubin with Triton's own compiler and the
ptxas it ships (the `triton` wheel; CPU hosts can install it: `pip install triton` into any venv,
given with --triton-python). `cuobjdump --dump-resource-usage` then reports per kernel the
registers per thread, the stack (bytes spilled per thread), and the PTX is searched for Hopper's
wgmma instructions (tensor-core products; absent, the products run on the older mma.sync path).
Spills and missing wgmma are what a kernel's tiles and warps get wrong before any GPU time is spent;
speed itself needs the GPU (bench/device_check.sh).

The IR is taken through a hook on a private JAX function (the Pallas Triton lowering's module
builder), so this script may need updating with JAX; it is a bench tool, not part of a3jax.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src.pallas.triton import pallas_call_registration as triton_registration  # noqa: E402

from a3jax.compile import GPU_KERNEL_CALL, GPU_KINDS  # noqa: E402
from a3jax.config import MeshConfig  # noqa: E402
from a3jax.model.pallas_attention import compile_target  # noqa: E402
from a3jax.model.pallas_gpu_attention import pallas_gpu_attention  # noqa: E402
from a3jax.sharding import abstract_mesh  # noqa: E402

ARCH_GPU = {80: "a100", 89: "l4", 90: "h100", 100: "b200"}  # the GPU whose kind the lowering is told

# (name, batch, rows, keys, heads, kv heads, head dim, dtype, block, backward)
SHAPES = [
    ("llama3.2-1b train T=2048", 1, 2048, 2048, 32, 8, 64, "bfloat16", 128, True),
    ("llama3.1-8b train T=2048", 1, 2048, 2048, 32, 8, 128, "bfloat16", 128, True),
    ("llama3.2-1b train, block 64", 1, 2048, 2048, 32, 8, 64, "bfloat16", 64, True),
    ("llama3.2-1b decode step (8 rows, 2048 cached)", 1, 8, 2048, 32, 8, 64, "bfloat16", 128, False),
    ("fp32 test shape T=300", 1, 300, 300, 4, 2, 64, "float32", 128, True),
]

# The compiler side runs in the Python that has `triton` (often a separate venv: the wheel is large).
COMPILE_SNIPPET = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
jobs = json.loads(sys.argv[1])
out = {}
for job in jobs:
    k = triton.compile(job["ttir"], target=GPUTarget("cuda", job["arch"], 32),
                       options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
    open(job["cubin"], "wb").write(k.asm["cubin"])
    out[job["ttir"]] = {"shared": int(k.metadata.shared), "ptx_wgmma": k.asm["ptx"].count("wgmma.mma_async"),
                        "ptx_mma_sync": k.asm["ptx"].count("mma.sync"), "triton": triton.__version__}
print(json.dumps(out))
"""


def lower_kernels(shape, workdir, arch):
    """TTIR files and their (warps, stages) for one shape: [(kernel name, path, warps, stages)]."""
    _, b, tq, tk, h, hkv, d, dtype, block, backward = shape
    modules = []
    build = triton_registration.lowering.lower_jaxpr_to_triton_module

    def keep(*args, **kwargs):
        result = build(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    dt = jnp.dtype(dtype)
    sd = lambda *s, t=dt: jax.ShapeDtypeStruct(s, t)
    args = (sd(b, tq, h, d), sd(b, tk, hkv, d), sd(b, tk, hkv, d), sd(b, tq, t=jnp.int32), sd(b, tq, t=jnp.int32),
            sd(b, tk, t=jnp.int32), sd(b, tk, t=jnp.int32))
    attend = lambda q, k, v, qg, qs, kg, ks: pallas_gpu_attention(q, k, v, qg, qs, kg, ks, block)
    fn = jax.grad(lambda *a: attend(*a).astype(jnp.float32).sum(), (0, 1, 2)) if backward else attend
    triton_registration.lowering.lower_jaxpr_to_triton_module = keep
    try:
        # One GPU of that kind, described: newer JAX reads the compute capability from it.
        mesh = abstract_mesh(MeshConfig(data=1, fsdp=1, tensor=1), 1, GPU_KINDS[ARCH_GPU[arch]])
        with compile_target("gpu"), jax.sharding.use_abstract_mesh(mesh):
            exported = jax.export.export(jax.jit(fn), platforms=["cuda"],
                                         disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(GPU_KERNEL_CALL)])(*args)
    finally:
        triton_registration.lowering.lower_jaxpr_to_triton_module = build
    params = {m.group(1): (int(m.group(3)), int(m.group(2)))
              for m in re.finditer(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32',
                                   exported.mlir_module())}
    out = []
    for text in modules:
        name = re.search(r"tt.func public @(\w+)", text).group(1)
        path = os.path.join(workdir, f"{len(os.listdir(workdir))}_{name}.ttir")
        with open(path, "w") as f:
            f.write(text)
        warps, stages = params[name]
        out.append((name, path, warps, stages))
    return out


def resource_usage(cuobjdump, cubin):
    text = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True,
                          check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return int(m.group(1)), int(m.group(2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--triton-python", default=sys.executable,
                    help="a Python that can `import triton` (default: this one)")
    ap.add_argument("--arch", type=int, default=90, choices=sorted(ARCH_GPU),
                    help="CUDA compute capability x10 (90: H100/H200)")
    ap.add_argument("--out", default="bench/results/gpu_kernel_resources.json")
    ns = ap.parse_args()
    probe = subprocess.run([ns.triton_python, "-c", "import triton, os; print(os.path.dirname(triton.__file__))"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(f"--triton-python {ns.triton_python}: cannot import triton (pip install triton there)")
    cuobjdump = os.path.join(probe.stdout.strip(), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        sys.exit(f"{cuobjdump}: not found (the triton wheel ships it for NVIDIA targets)")
    workdir = tempfile.mkdtemp(prefix="a3jax_ttir_")
    rows = []
    try:
        for shape in SHAPES:
            kernels = lower_kernels(shape, workdir, ns.arch)
            jobs = [{"ttir": p, "cubin": p[:-5] + ".cubin", "arch": ns.arch, "num_warps": w, "num_stages": s}
                    for _, p, w, s in kernels]
            res = subprocess.run([ns.triton_python, "-c", COMPILE_SNIPPET, json.dumps(jobs)], capture_output=True,
                                 text=True)
            if res.returncode != 0:
                sys.exit(f"{shape[0]}: Triton could not compile the kernels:\n{res.stderr[-3000:]}")
            compiled = json.loads(res.stdout.strip().splitlines()[-1])
            for (name, path, warps, stages), job in zip(kernels, jobs):
                regs, stack = resource_usage(cuobjdump, job["cubin"])
                c = compiled[path]
                rows.append({"shape": shape[0], "kernel": name.replace("a3_attention_", ""), "head_dim": shape[6],
                             "dtype": shape[7], "block": shape[8], "num_warps": warps, "num_stages": stages,
                             "registers": regs, "spill_bytes": stack, "shared_bytes": c["shared"],
                             "wgmma": c["ptx_wgmma"], "mma_sync": c["ptx_mma_sync"], "triton": c["triton"]})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    head = f"{'shape':<48} {'kernel':<6} {'warps':>5} {'stages':>6} {'regs':>5} {'spill B':>7} {'shared KiB':>10} {'wgmma':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['shape']:<48} {r['kernel']:<6} {r['num_warps']:>5} {r['num_stages']:>6} {r['registers']:>5} "
              f"{r['spill_bytes']:>7} {r['shared_bytes'] / 1024:>10.1f} {r['wgmma']:>6}")
    result = {"date": datetime.date.today().isoformat(), "host": platform.processor() or platform.machine(),
              "jax": jax.__version__, "arch": f"sm_{ns.arch}", "command": " ".join(sys.argv), "rows": rows}
    os.makedirs(os.path.dirname(ns.out) or ".", exist_ok=True)
    with open(ns.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
