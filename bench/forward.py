"""Forward+backward of the two-stream A3 loss vs the same model in content-only causal (AR) mode,
per attention kernel (dense, blockwise), the comparison step (docs/performance.md) against the reference A3 code itself, and
attention memory vs T.

    python bench/forward.py [--quick] [--reference DIR] [--out bench/results/forward.json]

--reference DIR: a local copy of github.com/PKU-ML/Any-order-Any-subset-AR (it has no license: it is
run from there, never copied; see bench/reference_a3.py). Its step (torch CPU, 2 threads) is then
timed beside a3jax's A3 and AR steps in the same run, so the ratios come from one run.

The comparison table runs each implementation in its own worker process (`--worker`), the processes
taking turns round by round (`--rounds`): timed in one process, the A3 step right after the torch
step was 15-30% slower than alone (page faults and caches after torch's large allocations), which
biased the ratio against a3jax. `--same-process` times all three in one process, in turn.
Each time is the best of all rounds (wall clock; the machine may be shared) with the median process
CPU time beside it. Prints tables and writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
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


def interleaved(fns: dict, reps: int) -> dict:
    """Runs each zero-arg fn once to warm (compile), then `reps` rounds of all of them in turn.
    Returns {name: (best wall s, median process CPU s)}."""
    for f in fns.values():
        f()
    wall = {n: [] for n in fns}
    cpu = {n: [] for n in fns}
    for _ in range(reps):
        for n, f in fns.items():
            w, c = timed(f)
            wall[n].append(w)
            cpu[n].append(c)
    return {n: (float(np.min(wall[n])), float(np.median(cpu[n]))) for n in fns}


def timed(f) -> tuple[float, float]:
    """(wall s, process CPU s) of one call of f."""
    c, t0 = time.process_time(), time.perf_counter()
    f()
    return time.perf_counter() - t0, time.process_time() - c


A3_NAME, AR_NAME, REF_NAME = "a3jax A3 (blockwise)", "a3jax AR (blockwise)", "reference A3 code (torch, 2 threads)"


def issue_fns(names, reference: str, rng) -> dict:
    """The comparison table's zero-arg steps, by name (the reference needs its repo's path)."""
    fns = {}
    if A3_NAME in names or AR_NAME in names:
        fns[A3_NAME], fns[AR_NAME] = step_fns(ISSUE_CFG, 4, 1024, "blockwise", rng)
    if REF_NAME in names:
        import reference_a3

        c = ISSUE_CFG
        fns[REF_NAME] = reference_a3.make_step(reference, c.vocab_size, c.hidden_size, c.num_layers, c.num_heads,
                                               c.num_kv_heads, c.intermediate_size, 4, 1024)
    return {n: fns[n] for n in names}


def isolated(names, reference: str, reps: int, rounds: int) -> dict:
    """Each name's step timed in its own fresh process, the processes taking turns for `rounds`
    rounds of `reps` steps each. Returns {name: (best wall s, median process CPU s)}."""
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", n, "--reps", str(reps)]
            if reference:
                cmd += ["--reference", reference]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rec = json.loads(out.strip().splitlines()[-1])
            wall[n] += rec["wall"]
            cpu[n] += rec["cpu"]
    return {n: (float(np.min(wall[n])), float(np.median(cpu[n]))) for n in names}


def worker(name: str, reference: str, reps: int) -> None:
    """--worker: warm one step, time `reps`, print {"wall": [...], "cpu": [...]} as the last line."""
    f = issue_fns([name], reference, np.random.default_rng(0))[name]
    f()
    wall, cpu = zip(*(timed(f) for _ in range(reps)))
    print(json.dumps({"wall": wall, "cpu": cpu}))


def step_inputs(cfg, b, t, kind, rng):
    """The comparison step's A3 and AR fwd+bwd for `kind`: ((a3 fn, its args), (ar fn, its args)); jitted, not run."""
    cfg = dataclasses.replace(cfg, attention=kind)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    segs = jnp.ones((b, t), jnp.int32)
    positions, groups = random_groups_sorted(rng, b, t)
    ar = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    a3_args = (params, tokens, jnp.asarray(positions), jnp.asarray(groups), segs)
    return (loss_fn(cfg, "query"), a3_args), (loss_fn(cfg, "content"), (params, tokens, ar, ar, segs))


def step_fns(cfg, b, t, kind, rng):
    """Zero-arg fwd+bwd of the A3 loss and of the AR loss for `kind`, blocking on the result."""
    (a3, a3_args), (arf, ar_args) = step_inputs(cfg, b, t, kind, rng)
    return (lambda: jax.block_until_ready(a3(*a3_args)),
            lambda: jax.block_until_ready(arf(*ar_args)))


def attention_temp_bytes(cfg, b, t, kind):
    """XLA's temp allocation for fwd+bwd of the A3 loss: what grows with T."""
    cfg = dataclasses.replace(cfg, attention=kind)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    i32 = jax.ShapeDtypeStruct((b, t), jnp.int32)
    compiled = loss_fn(cfg, "query").lower(params, i32, i32, i32, i32).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, skip T=2048 memory point")
    ap.add_argument("--reference", metavar="DIR", default="",
                    help="local copy of the reference A3 repo: time its step in the comparison table")
    ap.add_argument("--issue-only", action="store_true",
                    help="only the comparison table (A3, AR, reference): a quick before/after of a code change, "
                         "run once per checkout with PYTHONPATH set to it")
    ap.add_argument("--reps", type=int, default=0, help="timed steps per round (default 3, 2 with --quick)")
    ap.add_argument("--rounds", type=int, default=2, help="comparison table: rounds of one process per implementation")
    ap.add_argument("--same-process", action="store_true",
                    help="comparison table: time all implementations in this process, in turn (biased: see above)")
    ap.add_argument("--worker", metavar="NAME", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "forward.json"))
    args = ap.parse_args()
    reps = args.reps or (2 if args.quick else 3)
    if args.worker:
        return worker(args.worker, args.reference, reps)
    rng = np.random.default_rng(0)
    result = {"machine": f"{platform.node()} {platform.processor() or platform.machine()} "
                         f"{os.cpu_count()} cores", "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": "python bench/forward.py " + " ".join(sys.argv[1:]),
              "load_before": load_average(), "a3_vs_ar": [], "memory": [], "issue_step": {}}

    # The comparison table: the default kernel's A3 and AR steps and the reference.
    names = [A3_NAME, AR_NAME] + ([REF_NAME] if args.reference else [])
    if args.same_process:
        fns = issue_fns(names, args.reference, rng)
        issue = interleaved(fns, reps)
        del fns
    else:
        issue = isolated(names, args.reference, reps, args.rounds)
    result["issue_step_timing"] = "same process, in turn" if args.same_process else \
        f"one process per implementation, {args.rounds} rounds of {reps} steps"
    a3 = issue[A3_NAME][0]
    print("comparison step (4L, d256, 8h/4kv, MLP 688, V1024, B4, T1024, random groups of 4, fp32), fwd+bwd:")
    print(f"{'implementation':>38} {'best s':>8} {'CPU s':>7} {'vs A3':>6}")
    for n, (w, c) in issue.items():
        print(f"{n:>38} {w:>8.3f} {c:>7.2f} {w / a3:>6.2f}")
    result["issue_step"] = {n: {"s": w, "cpu_s": c} for n, (w, c) in issue.items()}
    result["issue_step"]["a3_over_ar"] = a3 / issue[AR_NAME][0]
    if args.reference:
        result["issue_step"]["speedup_vs_reference"] = issue[REF_NAME][0] / a3
        print(f"  a3jax A3 speed-up over the reference: {result['issue_step']['speedup_vs_reference']:.2f}x; "
              f"A3/AR {result['issue_step']['a3_over_ar']:.2f}")
    if args.issue_only:
        return finish(result, args.out)

    print(f"\n{'seq':>5} {'kernel':>9} {'A3 fwd+bwd s':>13} {'AR fwd+bwd s':>13} {'A3/AR':>6}")
    for t in (256, 1024):
        for kind in ("dense", "blockwise"):
            f_a3, f_ar = step_fns(ISSUE_CFG, 4, t, kind, rng)
            r = interleaved({"a3": f_a3, "ar": f_ar}, reps)
            a3, ar = r["a3"][0], r["ar"][0]
            result["a3_vs_ar"].append(dict(seq=t, kernel=kind, a3_s=a3, ar_s=ar, ratio=a3 / ar,
                                           a3_cpu_s=r["a3"][1], ar_cpu_s=r["ar"][1]))
            print(f"{t:>5} {kind:>9} {a3:>13.3f} {ar:>13.3f} {a3 / ar:>6.2f}", flush=True)

    print(f"\n{'seq':>5} {'dense temp MiB':>15} {'blockwise temp MiB':>19}")
    for t in (256, 512, 1024) + (() if args.quick else (2048,)):
        d, bw = (attention_temp_bytes(ISSUE_CFG, 4, t, k) / 2**20 for k in ("dense", "blockwise"))
        result["memory"].append(dict(seq=t, dense_mib=d, blockwise_mib=bw))
        print(f"{t:>5} {d:>15.1f} {bw:>19.1f}")
    finish(result, args.out)


def finish(result: dict, out: str) -> None:
    result["load_after"] = load_average()
    print(f"\nload average before {result['load_before']}, after {result['load_after']}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
