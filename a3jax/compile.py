"""`a3jax compile CONFIG --topology v5p:4x4x4 [key=value ...]`: compile before you rent.

Lowers and compiles, ahead of time and on this (CPU) host, the programs a run would execute on a TPU
slice, using the TPU compiler shipped in the `libtpu` wheel and a topology description
(`jax.experimental.topologies.get_topology_desc`):

    train     the real train step (a3jax.train.step.make_train_step: state donated, shardings pinned,
              microbatch scan, remat and scanned layers as configured) on a global batch
              [train.global_batch_size, data.seq_len]
    prefill   a3jax.decode.cache.prefill: encode a [decode_batch, decode_length] prompt into the KV cache
    decode    one cached decode step (a3jax.decode.cache.cached_step_logits + greedy pick): commit
              `group_size` tokens, query `group_size` positions, update the cache (donated)

Nothing is materialised: every input is a `jax.ShapeDtypeStruct` carrying its sharding over a Mesh of
the topology's devices (cfg.mesh, resolved against the slice's chip count), so an 8B model compiles
on a laptop. For each program it reports per-device memory from `compiled.memory_analysis()`
(arguments, outputs, aliased (donated), temporaries, generated code), the per-device total against
the chip's HBM, and FLOPs from `compiled.cost_analysis()` next to the analytic count.

Exit status: 0 all programs fit; 3 a program does not fit; 1 config/topology error.

Notes: XLA's cost analysis counts the body of a loop once, so with model.scan_layers=true (or
microbatches > 1) its FLOPs are per iteration; the analytic column is the whole step. Memory is what
the compiler plans for one device; the runtime also reserves some HBM of its own, so treat
"headroom" under a few percent as not fitting.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P

from a3jax import fs
from a3jax.config import ConfigError, load_config, split_config_args
from a3jax.decode.cache import cached_step_logits, prefill
from a3jax.layout import LAYOUT_KEYS, Layout
from a3jax.model import KVCache, choose_kernel, dtype_of, param_count, param_shapes, param_shardings
from a3jax.model.pallas_attention import compile_target
from a3jax.sharding import abstract_mesh, activate, batch_sharding, cache_shardings, make_mesh, rules_of
from a3jax.train import metrics as metrics_lib
from a3jax.train.state import abstract_state, make_optimizer, state_shardings
from a3jax.train.step import make_train_step

# HBM per chip (GiB) by topology family, as Google publishes it (v5p "95 GB", v6e "32 GB", ...).
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
FAMILY_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v6lite": "v6e"}
PROGRAMS = ("train", "prefill", "decode")
# GPUs to lower for (`--platform cuda --gpu NAME`): the device kind JAX reports for each; the Triton
# lowering reads the compute capability from it.
GPU_KINDS = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200", "a100": "NVIDIA A100-SXM4-80GB",
             "b200": "NVIDIA B200", "l4": "NVIDIA L4"}
GPU_KERNEL_CALL = "__gpu$xla.gpu.triton"  # the custom call a Pallas Triton kernel lowers to

USAGE = """\
usage: a3jax compile CONFIG.yaml --topology v5p:4x4x4 [options] [key.sub=value ...]
       a3jax compile CONFIG.yaml --platform cuda [--gpus N] [--gpu h100] [options] [key.sub=value ...]

Compiles the train step (and the cached decode programs) of CONFIG for a TPU slice on this host and
reports per-device memory, FLOPs and whether it fits the chip's HBM. Needs `pip install libtpu`.
With --platform cuda it lowers them for N GPUs instead (compiling needs the GPUs): the attention
kernel `auto` picks there, the Triton kernels in each program, and any lowering error, before a run.

options:
  --topology NAME      TPU slice, FAMILY:SHAPE (v4:2x2x2, v5e:2x2, v5e:4x4, v5p:4x4x4, v6e:4x4, ...)
  --programs LIST      comma-separated subset of train,prefill,decode (default: all)
  --decode-batch N     decode batch (default: train.global_batch_size)
  --decode-length N    decode length = KV cache length (default: data.seq_len)
  --group-size N       tokens committed and queried per decode step (default: 4)
  --hbm-gib X          HBM per chip, overriding the table (v4 32, v5e 16, v5p 95, v6e 32)
  --json PATH          also write the report as JSON
  --platform cuda      lower for GPUs instead of compiling for a TPU slice (no --topology)
  --gpus N             GPUs the mesh spans with --platform (default 1)
  --gpu NAME           the GPU to lower for: h100, h200, a100, b200, l4 (default h100)

exit status: 0 everything fits (with --platform: everything lowers); 3 something does not fit;
1 bad config, topology, missing libtpu, or a program that does not lower.
examples:
  a3jax compile configs/pod/llama3.1-8b-v5p.yaml --topology v5p:4x4x4
  a3jax compile configs/recipe/llama3.2-1b.yaml --platform cuda --gpus 8
"""


class CompileError(RuntimeError):
    pass


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """'v5p:4x4x4' -> ('v5p', (4, 4, 4)); raises CompileError naming the problem."""
    if ":" not in name:
        raise CompileError(f"--topology {name!r} must look like FAMILY:SHAPE, e.g. v5p:4x4x4 or v5e:2x2")
    fam, shape = name.split(":", 1)
    fam = FAMILY_ALIASES.get(fam.lower(), fam.lower())
    if fam not in HBM_GIB:
        raise CompileError(f"--topology {name!r}: unknown TPU family {fam!r} (known: {', '.join(HBM_GIB)})")
    try:
        dims = tuple(int(d) for d in shape.lower().split("x"))
    except ValueError:
        raise CompileError(f"--topology {name!r}: shape {shape!r} must look like 4x4x4") from None
    if not dims or any(d <= 0 for d in dims):
        raise CompileError(f"--topology {name!r}: bad shape {shape!r}")
    return fam, dims


def accelerator_type(family: str, dims) -> str:
    """Cloud TPU accelerator type of a slice: v5e:2x2 -> v5litepod-4, v5p:4x4x4 -> v5p-128 (v4/v5p
    count TensorCores, two per chip), v6e:4x4 -> v6e-16."""
    chips = _prod(dims)
    return {"v4": f"v4-{2 * chips}", "v5p": f"v5p-{2 * chips}", "v5e": f"v5litepod-{chips}",
            "v6e": f"v6e-{chips}"}[family]


def _quiet_libtpu_env(topology: str = "") -> None:
    """libtpu looks for TPU workers and the GCE metadata server when it loads; on a CPU host tell it
    what it would find there (otherwise it logs TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES errors)."""
    if topology and "TPU_ACCELERATOR_TYPE" not in os.environ:
        try:
            os.environ["TPU_ACCELERATOR_TYPE"] = accelerator_type(*parse_topology(topology))
        except CompileError:
            pass  # reported properly by compile_report
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compile-only use: several compiles may run side by side (libtpu otherwise takes /tmp/libtpu_lockfile).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    if "JAX_PLATFORMS" not in os.environ:
        # The host's own backend; the TPU one is compile-only. JAX read JAX_PLATFORMS when it was
        # imported, so its config is told too (its backends start later, at the first device query).
        os.environ["JAX_PLATFORMS"] = "cpu"
        jax.config.update("jax_platforms", "cpu")


def topology_devices(topology: str):
    """The devices of a TPU topology description (compile-only; no TPU needed)."""
    _quiet_libtpu_env(topology)
    try:
        # deferred: optional (a dev requirement), and it must load after the environment set above
        import libtpu  # noqa: F401
    except ImportError:
        raise CompileError("`a3jax compile` needs the TPU compiler: pip install libtpu "
                           "(see requirements-dev.txt)") from None
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # noqa: BLE001 - libtpu raises several types for a bad name
        raise CompileError(f"--topology {topology!r}: libtpu cannot describe it ({type(e).__name__}: {e})") from e
    return list(desc.devices)


# ----------------------------------------------------------------------------- the programs


def _abstract(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _lower(fn, args, mesh, rules, platform):
    """`fn.lower(*args)` for the mesh's own devices, or, with `platform` ('cuda', 'rocm'), a
    `jax.export.Exported` lowered for that platform without its devices (compiling needs them).
    Pallas GPU kernels are custom calls without export compatibility guarantees; the export is for
    inspection on this host, never serialised, so that check is turned off for them."""
    with activate(mesh, rules):
        if platform is None:
            return fn.lower(*args)
        checks = [jax.export.DisabledSafetyCheck.custom_call(GPU_KERNEL_CALL)]
        return jax.export.export(fn, platforms=[platform], disabled_checks=checks)(*args)


def lower_train(cfg, mesh, rules, platform: str | None = None):
    """(lowered, description) of the real train step over `mesh` (see `_lower` for `platform`)."""
    optimizer, schedule = make_optimizer(cfg.train.optimizer, cfg.total_steps,
                                         [s.steps for s in cfg.data.stages])
    pshapes = param_shapes(cfg.model)
    psh = param_shardings(cfg.model, mesh, rules)
    ssh = state_shardings(optimizer, psh, pshapes, mesh)
    bsh = batch_sharding(mesh, rules)
    step_fn = make_train_step(cfg, optimizer, schedule, ssh, bsh, mesh)
    state = abstract_state(optimizer, pshapes, ssh)
    gbs, seq = cfg.train.global_batch_size, cfg.data.seq_len
    batch = Layout(*(_abstract((gbs, seq), jnp.int32, bsh) for _ in LAYOUT_KEYS))
    lowered = _lower(step_fn, (state, batch), mesh, rules, platform)
    return lowered, {"batch": [gbs, seq], "microbatches": cfg.train.microbatches,
                     "tokens": gbs * seq}


def _decode_shardings(cfg, mesh, rules, b, t):
    """(k/v shape, the cache's shardings as a3jax.sharding defines them for the decoder)."""
    m = cfg.model
    kv_shape = (m.num_layers, b, t, m.num_kv_heads, m.head_size)
    return kv_shape, KVCache(**cache_shardings(kv_shape, mesh, rules))


def _serving_params(cfg, mesh, rules):
    dt = dtype_of(cfg.model.param_dtype)
    psh = param_shardings(cfg.model, mesh, rules)
    return jax.tree.map(lambda s, sh: _abstract(s, dt, sh), param_shapes(cfg.model), psh,
                        is_leaf=lambda x: isinstance(x, tuple)), psh


def lower_prefill(cfg, mesh, rules, b, t, platform: str | None = None):
    params, psh = _serving_params(cfg, mesh, rules)
    _, cache_sh = _decode_shardings(cfg, mesh, rules, b, t)
    bsh = batch_sharding(mesh, rules)
    fn = jax.jit(lambda p, tok, pos, grp: prefill(cfg.model, p, tok, pos, grp),
                 in_shardings=(psh, bsh, bsh, bsh), out_shardings=cache_sh)
    args = [_abstract((b, t), jnp.int32, bsh) for _ in range(3)]
    return _lower(fn, (params, *args), mesh, rules, platform), {"batch": [b, t], "tokens": b * t}


def lower_decode(cfg, mesh, rules, b, t, c, platform: str | None = None):
    params, psh = _serving_params(cfg, mesh, rules)
    kv_shape, cache_sh = _decode_shardings(cfg, mesh, rules, b, t)
    bsh = batch_sharding(mesh, rules)
    rep = NamedSharding(mesh, P())

    def step(p, cache, tokens, new_pos, q_pos, q_valid, s):
        logits, cache = cached_step_logits(cfg.model, p, cache, tokens, new_pos, t + s - 1, q_pos, q_valid, t + s)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    fn = jax.jit(step, in_shardings=(psh, cache_sh, bsh, bsh, bsh, bsh, rep),
                 out_shardings=(bsh, cache_sh), donate_argnums=(1,))
    dt = dtype_of(cfg.model.dtype)
    cache = KVCache(_abstract(kv_shape, dt, cache_sh.k), _abstract(kv_shape, dt, cache_sh.v),
                    _abstract((b, t), jnp.int32, cache_sh.groups), _abstract((b, t), jnp.int32, cache_sh.segments))
    args = (_abstract((b, t), jnp.int32, bsh), _abstract((b, c), jnp.int32, bsh), _abstract((b, c), jnp.int32, bsh),
            _abstract((b, c), jnp.bool_, bsh), _abstract((), jnp.int32, rep))
    lowered = _lower(fn, (params, cache, *args), mesh, rules, platform)
    return lowered, {"batch": [b, t], "group_size": c, "cache_bytes_global": 2 * int(_prod(kv_shape)) * jnp.dtype(dt).itemsize}


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


# ----------------------------------------------------------------------------- analysis


def analyse(compiled, hbm_bytes: float) -> dict:
    mem = compiled.memory_analysis()
    out = {}
    for key in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                "generated_code_size_in_bytes"):
        out[key.replace("_size_in_bytes", "")] = int(getattr(mem, key, 0) or 0) if mem is not None else None
    if mem is None:
        raise CompileError("the compiler returned no memory analysis")
    # Live at once: inputs, outputs not aliased to (donated) inputs, temporaries, code.
    total = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    out["total"] = total
    out["hbm"] = int(hbm_bytes)
    out["fits"] = bool(total <= hbm_bytes)
    out["headroom_fraction"] = 1.0 - total / hbm_bytes
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    cost = cost or {}
    out["flops_xla"] = float(cost.get("flops", -1.0))
    out["bytes_accessed_xla"] = float(cost.get("bytes accessed", -1.0))
    return out


def _check_programs(programs) -> None:
    for p in programs:
        if p not in PROGRAMS:
            raise CompileError(f"--programs: {p!r} is not one of {', '.join(PROGRAMS)}")


def lower_program(prog, cfg, mesh, rules, b, t, group_size, platform: str | None = None):
    """(lowered, description) of one of PROGRAMS: the train step, or prefill / a cached decoding step
    of b rows and t cached positions committing `group_size` tokens (see `_lower` for `platform`)."""
    if prog == "train":
        return lower_train(cfg, mesh, rules, platform)
    if prog == "prefill":
        return lower_prefill(cfg, mesh, rules, b, t, platform)
    return lower_decode(cfg, mesh, rules, b, t, group_size, platform)


def compile_report(cfg, topology: str, programs=PROGRAMS, decode_batch: int = 0, decode_length: int = 0,
                   group_size: int = 4, hbm_gib: float = 0.0, log=print) -> dict:
    """Compiles `programs` of `cfg` for `topology`; returns the report dict (see the module docstring)."""
    fam, dims = parse_topology(topology)
    _check_programs(programs)
    devices = topology_devices(topology)
    n = len(devices)
    hbm = float(hbm_gib or HBM_GIB[fam]) * 2 ** 30
    mesh = make_mesh(cfg.mesh, devices=devices)
    rules = rules_of(cfg.mesh)
    kind = devices[0].device_kind
    peak = metrics_lib.peak_flops_per_device(kind)
    b = decode_batch or cfg.train.global_batch_size
    t = decode_length or cfg.data.seq_len
    report = {"topology": topology, "device_kind": kind, "devices": n, "hosts": len({d.process_index for d in devices}),
              "mesh": dict(mesh.shape), "hbm_per_chip_gib": hbm / 2 ** 30, "peak_flops_per_chip": peak,
              "model": {k: getattr(cfg.model, k) for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                                          "intermediate_size", "vocab_size", "dtype", "param_dtype",
                                                          "scan_layers", "remat", "attention")},
              "params": param_count(cfg.model), "programs": {}}
    with compile_target("tpu"):  # what `model.attention` resolves to for a training forward on TPU
        report["attention_kernel"] = choose_kernel(cfg.model, cfg.data.seq_len)
    log(f"[a3jax compile] {topology}: {n} x {kind} ({report['hosts']} hosts), mesh {report['mesh']}, "
        f"{report['params']:,} params")
    for prog in programs:
        t0 = time.perf_counter()
        # Traced for TPU although this host is a CPU: `auto` resolves as on a TPU and Pallas kernels
        # lower through Mosaic instead of interpret mode.
        with compile_target("tpu"):
            lowered, info = lower_program(prog, cfg, mesh, rules, b, t, group_size)
        analytic = (metrics_lib.train_flops_per_token(cfg.model, cfg.data.seq_len, "a3") * info["tokens"] / n
                    if prog == "train" else None)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        r = analyse(compiled, hbm)
        r.update(info)
        r["flops_analytic"] = analytic
        r["lower_s"], r["compile_s"] = round(t1 - t0, 2), round(t2 - t1, 2)
        if prog == "train" and peak and analytic:
            r["step_time_at_peak_s"] = analytic / peak
        report["programs"][prog] = r
        log(f"[a3jax compile] {prog}: compiled in {t2 - t0:.1f} s, {_gib(r['total'])} per device "
            f"({'fits' if r['fits'] else 'DOES NOT FIT'})")
    report["fits"] = all(r["fits"] for r in report["programs"].values())
    return report


def lower_for_gpu(cfg, num_gpus: int = 1, gpu: str = "h100", programs=PROGRAMS, decode_batch: int = 0,
                  decode_length: int = 0, group_size: int = 4, platform: str = "cuda", log=print) -> dict:
    """Lowers `programs` of `cfg` for `num_gpus` GPUs of type `gpu` (a GPU_KINDS key) on this host,
    without them: the mesh is an AbstractMesh, the programs are traced for GPU (`auto` resolves as
    on a GPU and Pallas kernels lower to Triton instead of interpret mode) and exported with
    jax.export. Reports, per program, the Triton kernels it holds; a lowering error is a CompileError."""
    if gpu not in GPU_KINDS:
        raise CompileError(f"--gpu {gpu!r} is not one of {', '.join(GPU_KINDS)}")
    if num_gpus < 1:
        raise CompileError(f"--gpus must be >= 1, got {num_gpus}")
    _check_programs(programs)
    try:
        mesh = abstract_mesh(cfg.mesh, num_gpus, GPU_KINDS[gpu])
    except ValueError as e:
        raise CompileError(f"mesh: {e}") from e
    rules = rules_of(cfg.mesh)
    b = decode_batch or cfg.train.global_batch_size
    t = decode_length or cfg.data.seq_len
    report = {"platform": platform, "gpu": gpu, "device_kind": GPU_KINDS[gpu], "devices": num_gpus,
              "mesh": dict(zip(mesh.axis_names, mesh.axis_sizes)), "params": param_count(cfg.model),
              "model": {k: getattr(cfg.model, k) for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                                          "dtype", "scan_layers", "remat", "attention")},
              "programs": {}}
    with compile_target("gpu"):
        report["attention_kernel"] = choose_kernel(cfg.model, cfg.data.seq_len)
        log(f"[a3jax compile] lowering for {num_gpus} x {GPU_KINDS[gpu]} ({platform}), mesh {report['mesh']}")
        for prog in programs:
            t0 = time.perf_counter()
            try:
                exported, info = lower_program(prog, cfg, mesh, rules, b, t, group_size, platform)
            except Exception as e:  # noqa: BLE001 - any lowering failure is the report's answer
                raise CompileError(f"{prog}: does not lower for {platform}: {type(e).__name__}: {e}") from e
            text = exported.mlir_module()
            kernels = re.findall(r'name = "([\w.-]+)", num_stages', text)
            info.update({"lower_s": round(time.perf_counter() - t0, 2), "stablehlo_bytes": len(text),
                         "triton_kernels": len(kernels), "kernel_names": sorted(set(kernels))})
            report["programs"][prog] = info
            log(f"[a3jax compile] {prog}: lowered in {info['lower_s']} s, {len(kernels)} Triton kernel call(s)")
    return report


def format_gpu_report(rep: dict) -> str:
    lines = [f"{rep['devices']} x {rep['device_kind']} ({rep['platform']}); mesh {rep['mesh']}",
             f"model: {rep['params']:,} params, " + ", ".join(f"{k}={v}" for k, v in rep["model"].items())
             + f"; attention kernel {rep['attention_kernel']}", ""]
    for name, r in rep["programs"].items():
        lines.append(f"{name}: batch {r['batch']}, lowered in {r['lower_s']} s, {r['triton_kernels']} Triton "
                     f"kernel call(s) ({', '.join(r['kernel_names']) or 'none'})")
    lines += ["", "lowers: yes (compiling needs the GPUs)"]
    return "\n".join(lines)


def _gib(x) -> str:
    if x is None:
        return "-"
    if abs(x) >= 2 ** 30:
        return f"{x / 2 ** 30:.2f} GiB"
    return f"{x / 2 ** 20:.2f} MiB"


def format_report(rep: dict) -> str:
    lines = [f"topology {rep['topology']}: {rep['devices']} x {rep['device_kind']} on {rep['hosts']} host(s), "
             f"{rep['hbm_per_chip_gib']:.0f} GiB HBM per chip; mesh {rep['mesh']}",
             f"model: {rep['params']:,} params, " + ", ".join(f"{k}={v}" for k, v in rep["model"].items())
             + f"; attention kernel {rep.get('attention_kernel', '?')}",
             "",
             "per device      arguments    outputs    aliased  temporaries       code      total   HBM use  fits",
             ]
    for name, r in rep["programs"].items():
        lines.append(f"{name:<12}" + "".join(f"{_gib(r[k]):>11}" for k in ("argument", "output", "alias", "temp",
                                                                            "generated_code", "total"))
                     + f"  {100 * (1 - r['headroom_fraction']):6.2f}%  {'yes' if r['fits'] else 'NO'}")
    lines.append("")
    for name, r in rep["programs"].items():
        desc = f"{name}: batch {r['batch']}"
        if "microbatches" in r:
            desc += f", {r['microbatches']} microbatch(es)"
        if "group_size" in r:
            desc += f", {r['group_size']} tokens per step"
        desc += f"; XLA FLOPs/device {r['flops_xla']:.3e}"
        if r.get("flops_analytic"):
            desc += f" (analytic {r['flops_analytic']:.3e}"
            if r.get("step_time_at_peak_s"):
                desc += f", {r['step_time_at_peak_s'] * 1e3:.3g} ms/step at 100% MFU"
            desc += ")"
        desc += f"; lowered {r['lower_s']} s, compiled {r['compile_s']} s"
        lines.append(desc)
    lines.append("")
    lines.append("fits: " + ("yes" if rep["fits"] else "NO"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def cli_main(argv) -> int:
    argv = list(argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0 if argv else 2
    parser = argparse.ArgumentParser(prog="a3jax compile", usage=USAGE, add_help=False)
    parser.add_argument("args", nargs="*")
    parser.add_argument("--topology", default="")
    parser.add_argument("--platform", default="")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--programs", default=",".join(PROGRAMS))
    parser.add_argument("--decode-batch", type=int, default=0)
    parser.add_argument("--decode-length", type=int, default=0)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--hbm-gib", type=float, default=0.0)
    parser.add_argument("--json", default="")
    ns = parser.parse_intermixed_args(argv)
    try:
        path, overrides = split_config_args(ns.args)
    except ConfigError as e:
        print(f"a3jax compile: {e}", file=sys.stderr)
        return 2
    programs = tuple(p.strip() for p in ns.programs.split(",") if p.strip())
    log = lambda m: print(m, file=sys.stderr, flush=True)
    if ns.platform:
        return _gpu_main(ns, path, overrides, programs, log)
    if not ns.topology:
        print("a3jax compile: give --topology (a TPU slice) or --platform cuda (GPUs)", file=sys.stderr)
        return 2
    _quiet_libtpu_env(ns.topology)

    try:
        cfg = load_config(path, overrides)
        rep = compile_report(cfg, ns.topology, programs, ns.decode_batch, ns.decode_length, ns.group_size,
                             ns.hbm_gib, log=log)
    except (ConfigError, CompileError) as e:
        print(f"a3jax compile: {e}", file=sys.stderr)
        return 1
    rep["config"] = path
    rep["overrides"] = overrides
    print(format_report(rep), flush=True)
    if ns.json:
        fs.write_text(ns.json, json.dumps(rep, indent=2))  # local or gs://
    return 0 if rep["fits"] else 3


def _gpu_main(ns, path, overrides, programs, log) -> int:
    if ns.platform not in ("cuda", "rocm"):
        print(f"a3jax compile: --platform {ns.platform!r} is not one of cuda, rocm", file=sys.stderr)
        return 2
    if ns.topology:
        print("a3jax compile: --topology (a TPU slice) and --platform (GPUs) exclude each other", file=sys.stderr)
        return 2
    try:
        cfg = load_config(path, overrides)
        rep = lower_for_gpu(cfg, ns.gpus, ns.gpu, programs, ns.decode_batch, ns.decode_length, ns.group_size,
                            ns.platform, log=log)
    except (ConfigError, CompileError) as e:
        print(f"a3jax compile: {e}", file=sys.stderr)
        return 1
    rep["config"], rep["overrides"] = path, overrides
    print(format_gpu_report(rep), flush=True)
    if ns.json:
        fs.write_text(ns.json, json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
