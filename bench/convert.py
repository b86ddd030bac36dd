"""Conversion time and peak host memory for a generated LLaMA-shaped checkpoint (~1.1B params, bf16).

    python bench/convert.py [--quick] [--out bench/results/convert.json] [--keep DIR]

Writes random bf16 safetensors shards directly with numpy (HF names and layout, a config.json),
then runs `a3jax convert hf-to-a3` (and `a3-to-hf` back) each in a fresh subprocess and reads
its peak RSS from resource.getrusage(RUSAGE_CHILDREN). Shows peak RSS against the checkpoint's
size: the reader fills one preallocated copy of the weights tensor by tensor. Everything is written
into a temporary directory that is deleted afterwards (about 3 x the checkpoint size on disk).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {  # ~1.14B params: hidden 2048, 16 layers, inter 8192, vocab 32000, GQA 32/8
    "full": dict(vocab=32000, hidden=2048, layers=16, inter=8192, heads=32, kv_heads=8),
    "quick": dict(vocab=8000, hidden=512, layers=4, inter=2048, heads=8, kv_heads=4),
}


def hf_tensor_shapes(s):
    V, E, L, M, H, K = s["vocab"], s["hidden"], s["layers"], s["inter"], s["heads"], s["kv_heads"]
    D = E // H
    out = {"model.embed_tokens.weight": (V, E)}
    for i in range(L):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (E,), p + "self_attn.q_proj.weight": (H * D, E),
                    p + "self_attn.k_proj.weight": (K * D, E), p + "self_attn.v_proj.weight": (K * D, E),
                    p + "self_attn.o_proj.weight": (E, H * D), p + "post_attention_layernorm.weight": (E,),
                    p + "mlp.gate_proj.weight": (M, E), p + "mlp.up_proj.weight": (M, E),
                    p + "mlp.down_proj.weight": (E, M)})
    out["model.norm.weight"] = (E,)
    out["lm_head.weight"] = (V, E)
    return out


def write_checkpoint(d, s, shard_bytes):
    """Random bf16 weights in HF's sharded safetensors layout; returns (n_params, bytes)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(48 * 2**20, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    shapes = hf_tensor_shapes(s)
    shards, cur, size = [], [], 0
    for k, shp in shapes.items():
        n = int(np.prod(shp)) * 2
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    shards.append(cur)
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for k in keys:
            n = int(np.prod(shapes[k]))
            if k.endswith("norm.weight"):
                tensors[k] = np.ones(shapes[k], ml_dtypes.bfloat16)
            else:  # a random window of the pool (pool is larger than any tensor here but the embeddings)
                reps = -(-n // pool.size)
                src = pool if reps == 1 else np.tile(pool, reps)
                off = int(rng.integers(0, src.size - n + 1))
                tensors[k] = src[off:off + n].reshape(shapes[k])
            weight_map[k] = name
            total += n
        save_file(tensors, os.path.join(d, name), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, f)
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": s["vocab"],
          "hidden_size": s["hidden"], "intermediate_size": s["inter"], "num_hidden_layers": s["layers"],
          "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "hidden_act": "silu",
          "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
          "rope_theta": 500000.0, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(hf, f)
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        f.write("{}")
    return total, total * 2


def _measure(argv):
    """(in a fresh helper process) runs `python -m a3jax ARGV` as its only child and prints one JSON line
    with the wall time and the child's peak RSS from getrusage(RUSAGE_CHILDREN)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "a3jax"] + argv, env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"rc": p.returncode, "seconds": secs, "peak": peak, "stdout": p.stdout, "stderr": p.stderr}))


def run_child(argv):
    """Runs `python -m a3jax ...` under a fresh helper process, so RUSAGE_CHILDREN there sees this
    command alone; returns (seconds, peak RSS bytes, stdout)."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_measure", "--"] + argv,
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if r["rc"]:
        raise SystemExit(f"{' '.join(argv)} failed ({r['rc']}):\n{r['stdout']}\n{r['stderr']}")
    return r["seconds"], r["peak"], r["stdout"].strip()


def _weight_map(d):
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return json.load(f)["weight_map"]
    from safetensors import safe_open

    with safe_open(os.path.join(d, "model.safetensors"), "numpy") as f:
        return {k: "model.safetensors" for k in f.keys()}


def baseline_rss():
    """Peak RSS of a child that only imports what the converter imports (JAX, Orbax, safetensors)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    code = ("import resource, jax, orbax.checkpoint, safetensors, numpy, tqdm; import a3jax.convert.cli, "
            "a3jax.checkpoint, a3jax.convert; jax.numpy.zeros(1).block_until_ready(); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a ~30M-param model (smoke test of the script)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "convert.json"))
    ap.add_argument("--shard-size-mb", type=int, default=1000, help="HF safetensors shard size (MB)")
    ap.add_argument("--tmp", default=None, help="directory for the temporary files (default: system temp)")
    ap.add_argument("--_measure", action="store_true", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args._measure:
        return _measure([a for a in rest if a != "--"])
    shape = SHAPES["quick" if args.quick else "full"]
    base = baseline_rss()  # the first child: imports only
    tmp = tempfile.mkdtemp(prefix="a3jax-bench-convert-", dir=args.tmp)
    rows = []
    try:
        hf, ck, back = (os.path.join(tmp, n) for n in ("hf", "ckpt", "hf_back"))
        os.makedirs(hf)
        t0 = time.perf_counter()
        n_params, ckpt_bytes = write_checkpoint(hf, shape, args.shard_size_mb * 10**6)
        gen_s = time.perf_counter() - t0
        print(f"generated {n_params / 1e9:.3f} B params, {ckpt_bytes / 2**30:.2f} GiB bf16 in "
              f"{len(os.listdir(hf)) - 3} shards ({gen_s:.1f} s)")
        for name, cmd, out_dir in (
                ("hf-to-a3", ["convert", "hf-to-a3", "--hf", hf, "--out", ck, "--no-progress"], ck),
                ("a3-to-hf", ["convert", "a3-to-hf", "--ckpt", ck, "--out", back], back)):
            secs, peak, text = run_child(cmd)
            out_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out_dir) for f in fs)
            rows.append({"direction": name, "seconds": round(secs, 2), "peak_rss_bytes": peak,
                         "peak_rss_over_checkpoint": round(peak / ckpt_bytes, 3),
                         "peak_rss_minus_baseline_over_checkpoint": round((peak - base) / ckpt_bytes, 3),
                         "output_bytes": out_bytes, "gb_per_s": round(ckpt_bytes / secs / 1e9, 3), "summary": text})
        # The exported HF weights are the original ones, bit for bit (spot check of every tensor's bytes).
        from safetensors import safe_open

        idx, idx2 = _weight_map(hf), _weight_map(back)
        assert set(idx) == set(idx2)
        for k in list(idx)[:: max(1, len(idx) // 20)]:
            with safe_open(os.path.join(hf, idx[k]), "numpy") as f, safe_open(os.path.join(back, idx2[k]), "numpy") as g:
                assert f.get_tensor(k).tobytes() == g.get_tensor(k).tobytes(), k
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "date": datetime.date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "shape": shape, "params": n_params, "checkpoint_bytes": ckpt_bytes,
        "dtype": "bfloat16", "hf_shards": -(-ckpt_bytes // (args.shard_size_mb * 10**6)),
        "import_baseline_rss_bytes": base, "generate_seconds": round(gen_s, 1), "rows": rows,
        "command": "python bench/convert.py" + (" --quick" if args.quick else ""),
    }
    gib = 2**30
    print(f"\n{n_params / 1e9:.3f} B params, checkpoint {ckpt_bytes / gib:.2f} GiB (bf16); "
          f"baseline RSS (imports only) {base / gib:.2f} GiB")
    print(f"{'direction':<10} {'time s':>7} {'GB/s':>6} {'peak RSS GiB':>13} {'peak/ckpt':>10} {'(peak-base)/ckpt':>17}")
    for r in rows:
        print(f"{r['direction']:<10} {r['seconds']:>7.1f} {r['gb_per_s']:>6.2f} {r['peak_rss_bytes'] / gib:>13.2f} "
              f"{r['peak_rss_over_checkpoint']:>10.2f} {r['peak_rss_minus_baseline_over_checkpoint']:>17.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
