"""Train-step throughput: the A3 two-stream step vs the plain causal (AR, content stream only) step.

    python bench/train.py [--quick] [--steps 5] [--out bench/results/train.json]
    python bench/train.py --sizes demo --seqs 128 --loop 40   # the demo-sized model, + the real loop
    # a named model config (random weights), per attention kernel, on a GPU (bench/device_check.sh):
    python bench/train.py --sizes llama3.2-1b --seqs 2048 --batch 4 --kernels pallas_gpu,blockwise,dense \
        --steps 3 --budget-s 170

--sizes: names in SIZES below, or named model configs (configs/model/NAME.yaml, e.g. llama3.2-1b, in its
own dtype, bf16 compute for that one). --kernels: model.attention values, each timed for A3 then AR in
the order given; a kernel that fails (unknown name, compile error, out of memory) is recorded with its
error and the rest still run. --budget-s: no new (kernel, objective) program is started once the next
one (estimated as the longest so far, compile included) would end past the budget; the JSON is rewritten
after every program, so a run killed from outside keeps what it finished.

--data-parallel: a data-only mesh over all devices (on a CPU, with
XLA_FLAGS=--xla_force_host_platform_device_count=N, N "devices" on one host's cores).
--loop N: also runs the real training loop (`a3jax.train.trainer.train`: Grain pipeline from the
stdlib corpus, host-to-device transfer, metrics, logging) for N steps of the first size/seq under
jax.profiler, and reports the share of the loop's wall time spent outside the compiled step.

Both steps are the real jitted `a3jax.train.step` (AdamW, clipping, donation, pinned shardings) on the
same model and the same tokens per step; the AR step is train.objective=ar (the content stream with
groups = positions and next-token targets), the A3 step the query-stream loss on random groups of 4
(rows in generation order, as the pipeline emits them). Model FLOPs per token come from
each objective's entry in a3jax.objectives; MFU is reported against the chip table, or on CPUs
against a measured fp32 matmul peak of this machine (the fastest of 10 matmuls; --peak to override).
Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from a3jax import objectives  # noqa: E402
from a3jax.config import Config, MeshConfig, ModelConfig, OptimizerConfig, TrainConfig, load_config  # noqa: E402
from a3jax.model import (init_params_sharded, numpy_init, param_count, param_shapes,  # noqa: E402
                         param_shardings)
from a3jax.sharding import activate, batch_sharding, make_mesh, rules_of  # noqa: E402
from a3jax.train import metrics as M  # noqa: E402
from a3jax.train.state import create_state, make_optimizer, state_shardings  # noqa: E402
from a3jax.train.step import make_train_step  # noqa: E402

SIZES = {
    # name: model (vocab 260 = the byte tokenizer)
    "small": ModelConfig(hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4, num_kv_heads=2,
                         max_position_embeddings=4096),
    "tiny": ModelConfig(max_position_embeddings=4096),  # configs/model/tiny.yaml: d=256, L=4, 3.0M params
    # A demo-sized model (near configs/demo/pretrain.yaml's d=128, L=4): d=128, L=4, 4 heads, MLP 344, vocab 260: 0.86M params.
    "demo": ModelConfig(hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4, num_kv_heads=4,
                        max_position_embeddings=4096),
}
# The overrides that turn `model: tiny` into SIZES["demo"] (for --loop, which runs a real config).
DEMO_OVERRIDES = ["model.hidden_size=128", "model.intermediate_size=344", "model.num_heads=4",
                  "model.num_kv_heads=4"]


def matmul_peak(n: int = 1024, reps: int = 10) -> float:
    """Measured fp32 matmul FLOP/s of the default device (a practical CPU 'peak'): the fastest of `reps`
    matmuls, so a moment of load on a shared machine does not lower the peak (and inflate the MFU)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x * 1e-3)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a = f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def make_batch(rng, b, t, objective):
    tokens = rng.integers(0, 256, (b, t)).astype(np.int32)
    segs = np.ones((b, t), np.int32)
    if objectives.get(objective).position_order:  # AR: groups = positions, rows in position order
        pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
        groups = pos.copy()
    else:  # A3: random groups of 4 in random order, rows sorted by group (generation order)
        pos = np.stack([rng.permutation(t) for _ in range(b)]).astype(np.int32)
        groups = np.broadcast_to(np.arange(t, dtype=np.int32) // 4, (b, t)).copy()
    return {"tokens": tokens, "positions": pos, "groups": groups, "segment_ids": segs,
            "loss_mask": np.ones((b, t), np.int32)}


def model_config(size: str, dtype: str = "") -> ModelConfig:
    """SIZES[size], else the named model config configs/model/<size>.yaml; `dtype` overrides the compute dtype."""
    mcfg = SIZES[size] if size in SIZES else load_config(None, [f"model={size}"]).model
    return dataclasses.replace(mcfg, dtype=dtype) if dtype else mcfg


def init_params(mcfg, mesh, rules):
    """Random params on the mesh: small models drawn on the host (compiling the linen init costs seconds
    there), large ones by one jitted init straight into their shardings."""
    if param_count(mcfg) > 100e6:
        return init_params_sharded(mcfg, jax.random.PRNGKey(0), mesh, rules)
    host = jax.tree.map(lambda x: x.astype(mcfg.param_dtype), numpy_init(mcfg))
    return jax.device_put(host, param_shardings(mcfg, mesh, rules))


def time_step(mcfg, seq, batch, objective, steps, mesh, rules, params):
    """(median step s, compile + first step s, median process CPU s) of the real train step; `params`
    (placed on the mesh) are copied into a fresh state, so one init serves every kernel and objective."""
    cfg = Config(model=mcfg, train=TrainConfig(global_batch_size=batch, objective=objective,
                                               optimizer=OptimizerConfig(warmup_steps=1)))
    opt, sched = make_optimizer(cfg.train.optimizer, 1000)
    psh = param_shardings(mcfg, mesh, rules)
    ssh = state_shardings(opt, psh, param_shapes(mcfg), mesh)
    bsh = batch_sharding(mesh, rules)
    step = make_train_step(cfg, opt, sched, ssh, bsh, mesh)
    state = create_state(jax.device_put(params, psh), opt, 0, ssh)
    b = jax.device_put(make_batch(np.random.default_rng(0), batch, seq, objective), bsh)
    with activate(mesh, rules):
        t0 = time.perf_counter()
        state, m = step(state, b)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        state, m = step(state, b)  # one more warm step
        jax.block_until_ready(m)
        times, cpu = [], []
        for _ in range(steps):
            c, t0 = time.process_time(), time.perf_counter()
            state, m = step(state, b)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c)
    assert np.isfinite(float(m["loss"]))
    return float(np.median(times)), compile_s, float(np.median(cpu))


def loop_overhead(size, seq, batch, steps, objective, data_parallel, isolated_step_s):
    """Runs `steps` steps of the real loop (`a3jax train` on configs/tiny-curriculum.yaml's data, one stage of
    random:4 or ar) under jax.profiler and reads the trace: the share of the steady-state loop's wall
    time in which no compiled train step was executing is the overhead outside the step."""
    import collections
    import glob

    from a3jax.config import load_config
    from a3jax.train.trainer import train

    here = os.path.dirname(os.path.abspath(__file__))
    stage = "ar" if objectives.get(objective).position_order else "random:4"
    run_dir = tempfile.mkdtemp(prefix="a3jax_loop_")
    ov = [f"run_dir={run_dir}", f"data.seq_len={seq}", f"train.global_batch_size={batch}",
          f"data.stages=[{{'{stage}': {steps}}}]", "train.eval_every=0", "checkpoint.every=0",
          f"train.objective={objective}", "train.log_every=10"]
    ov += DEMO_OVERRIDES if size == "demo" else []
    if data_parallel:
        ov += ["mesh.data=-1", "mesh.fsdp=1"]
    cfg = load_config(os.path.join(here, "..", "configs", "tiny-curriculum.yaml"), ov)
    trace_dir = os.path.join(run_dir, "trace")
    with jax.profiler.trace(trace_dir):
        res = train(cfg, progress_bar=False, tensorboard=False)
    pd = jax.profiler.ProfileData.from_file(sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1])
    # Executions of the compiled train step: top-level executable runs ("ThunkExecutor::Execute" on
    # the PjRt client thread); their union over time is "in the step".
    spans, names = [], collections.Counter()
    for plane in pd.planes:
        for line in plane.lines:
            for ev in line.events:
                names[(line.name[:24], ev.name[:40])] += 1
                if line.name.startswith("tf_XLAPjRtCpuClient") and ev.name.startswith("ThunkExecutor::Execute"):
                    spans.append((ev.start_ns, ev.start_ns + ev.duration_ns))
    spans.sort()
    big = [s for s in spans if s[1] - s[0] > 0.2 * isolated_step_s * 1e9]  # the train steps, not small ops
    # Steady state: from the end of the 3rd step to the end of the last (compile and warm-up excluded).
    window = big[3:]
    wall = (window[-1][1] - big[2][1]) / 1e9
    busy = sum(e - s for s, e in window) / 1e9
    rec = {"steps_profiled": len(window), "loop_wall_s": wall, "in_step_s": busy,
           "outside_step_fraction": 1 - busy / wall, "loop_step_s": wall / len(window),
           "loop_tokens_per_s": batch * seq * len(window) / wall, "isolated_step_s": isolated_step_s,
           "final_loss": res.get("loss")}
    print(f"loop ({size}, T={seq}, B={batch}, {objective}): {rec['loop_step_s'] * 1e3:.1f} ms/step in the loop, "
          f"{rec['loop_tokens_per_s']:,.0f} tok/s; outside the compiled step "
          f"{100 * rec['outside_step_fraction']:.1f}% of the loop's wall time ({len(window)} steps)")
    return rec


def error_text(e: BaseException) -> str:
    """An exception in one line, cut to a size a JSON report can carry."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 600 else text[:400] + " ... " + text[-190:]


def one_objective(mcfg, seq, batch, name, steps, mesh, rules, params, peak, n_dev) -> dict:
    """Times `name`'s train step; a failure (compile error, out of memory) comes back as {"error": ...}."""
    try:
        dt, comp, cpu = time_step(mcfg, seq, batch, name, steps, mesh, rules, params)
    except Exception as e:  # noqa: BLE001 (recorded in the report; the other kernels still run)
        return {"error": error_text(e)}
    tps = batch * seq / dt
    flops = objectives.get(name).train_flops(mcfg, seq)
    return {"step_s": dt, "compile_s": comp, "cpu_s": cpu, "tokens_per_s": tps,
            "flops_per_token": flops, "mfu": flops * tps / (peak * n_dev)}


def describe(name: str, r: dict) -> str:
    if "error" in r or "skipped" in r:
        return f"{name.upper()} {r.get('skipped') or 'FAILED: ' + r['error'][:120]}"
    return (f"{name.upper()} {r['step_s'] * 1e3:8.1f} ms {r['tokens_per_s']:9,.0f} tok/s MFU {100 * r['mfu']:5.1f}% "
            f"CPU {r['cpu_s']:.2f} s (compile {r['compile_s']:.0f} s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,tiny", help="SIZES names or named model configs (llama3.2-1b)")
    ap.add_argument("--seqs", default="256,1024")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch = tokens / seq)")
    ap.add_argument("--batch", type=int, default=0, help="rows per step (default: --tokens / seq)")
    ap.add_argument("--kernels", default="", help="model.attention values to time, comma-separated, each A3 "
                                                  "then AR (default: the model's own setting)")
    ap.add_argument("--dtype", default="", help="compute dtype (default: the model's)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no program that would end past this many seconds (0 = no budget)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--peak", type=float, default=0.0, help="peak FLOP/s per device (default: table or measured)")
    ap.add_argument("--quick", action="store_true", help="small model, seq 256 only, 3 steps")
    ap.add_argument("--data-parallel", action="store_true", help="mesh data=-1 (default: fsdp=-1)")
    ap.add_argument("--loop", type=int, default=0, help="also profile N steps of the real training loop")
    ap.add_argument("--objective", default="a3", choices=("a3", "ar"), help="for --loop")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train.json"))
    a = ap.parse_args()
    if a.quick:
        a.sizes, a.seqs, a.steps = "small", "256", 3
    start = time.perf_counter()
    dev = jax.devices()[0]
    peak = M.peak_flops_per_device(dev.device_kind, a.peak)
    peak_src = "override" if a.peak else ("chip table" if peak else "measured fp32 matmul")
    if peak is None:
        peak = matmul_peak()
    mesh_cfg = MeshConfig(data=-1, fsdp=1, tensor=1) if a.data_parallel else MeshConfig(data=1, fsdp=-1, tensor=1)
    mesh, rules = make_mesh(mesh_cfg), rules_of(mesh_cfg)
    n_dev = jax.device_count()
    kernels = [k for k in a.kernels.split(",") if k]
    rows = []
    out = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": f"{n_dev} x {dev.device_kind} ({dev.platform})",
        "jax": jax.__version__,
        "peak_flops_per_device": peak, "peak_source": peak_src,
        "command": "python bench/train.py " + " ".join(sys.argv[1:]),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "mesh": dict(mesh.shape),
        "load_average": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "optimizer": "AdamW + clip (full train step)", "budget_s": a.budget_s or None,
        "results": rows,
    }
    longest = 0.0  # the longest program so far (compile + steps): the estimate of the next one's cost
    for size in a.sizes.split(","):
        base = model_config(size, a.dtype)
        params = init_params(base, mesh, rules)
        for seq in (int(s) for s in a.seqs.split(",")):
            batch = a.batch or max(n_dev, a.tokens // seq)
            for kernel in kernels or [base.attention]:
                mcfg = dataclasses.replace(base, attention=kernel)
                res = {"size": size, "seq": seq, "batch": batch, "kernel": kernel, "dtype": mcfg.dtype,
                       "params": param_count(mcfg)}
                rows.append(res)
                for name in ("a3", "ar"):
                    t0 = time.perf_counter()
                    if a.budget_s and t0 - start + longest > a.budget_s:
                        res[name] = {"skipped": f"budget: {a.budget_s:.0f} s"}
                        continue
                    try:
                        mcfg.validate()
                    except ValueError as e:
                        res[name] = {"error": error_text(e)}
                        continue
                    res[name] = one_objective(mcfg, seq, batch, name, a.steps, mesh, rules, params, peak, n_dev)
                    longest = max(longest, time.perf_counter() - t0)
                    write_json(out, a.out)
                ok = all("step_s" in res[n] for n in ("a3", "ar"))
                res["time_ratio"] = res["a3"]["step_s"] / res["ar"]["step_s"] if ok else None
                res["flops_ratio"] = (objectives.get("a3").train_flops(mcfg, seq)
                                      / objectives.get("ar").train_flops(mcfg, seq))
                ratio = f"A3/AR time {res['time_ratio']:.2f}x" if ok else "A3/AR time -"
                print(f"{size:>6} T={seq:<5} B={batch:<3} {kernel:>10} | {describe('ar', res['ar'])} | "
                      f"{describe('a3', res['a3'])} | {ratio} (FLOPs {res['flops_ratio']:.2f}x)", flush=True)
                write_json(out, a.out)
        del params
    if a.loop:
        size, seq = a.sizes.split(",")[0], int(a.seqs.split(",")[0])
        out["loop"] = loop_overhead(size, seq, max(n_dev, a.tokens // seq), a.loop, a.objective,
                                    a.data_parallel, rows[0][a.objective]["step_s"])
    write_json(out, a.out)
    print(f"wrote {a.out}")


def write_json(out: dict, path: str) -> None:
    """Writes the report whole (to a temporary name first: a kill mid-write leaves the previous one)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
