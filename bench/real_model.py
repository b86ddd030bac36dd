"""SmolLM2-135M from its GGUF (the file `make install` fetches): conversion time and peak host memory,
and content-stream greedy decoding speed, a3jax vs transformers, in one run on the same CPU.

    python bench/real_model.py [--gguf FILE] [--new-tokens 64] [--batches 1,8] [--out bench/results/real_model.json]

Conversion: `a3jax convert gguf-to-a3` in a fresh subprocess (peak RSS from getrusage(RUSAGE_CHILDREN)),
and `from_gguf` under tracemalloc in another (the numpy allocations' peak, against the fp32 weights and
the largest tensor). Decoding: the same prompt batch, greedy, no EOS stop, `generate` with `DecodeSpec(stream="content")`
(KV cache, layers scanned) vs transformers' `generate` on its own GGUF loading (KV cache, fp32), each
timed after one warm-up call; tokens/s = batch x new tokens / seconds. Both use every CPU thread.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
PROMPT = "The capital of France is Paris. The capital of Germany is"

TRACE = """
import json, sys, time, tracemalloc
from a3jax.convert import from_gguf
tracemalloc.start()
t = time.perf_counter()
cfg, params = from_gguf(sys.argv[1])
secs = time.perf_counter() - t
cur, peak = tracemalloc.get_traced_memory()
top = [v for k, v in params.items() if k != "layers"]
per_layer = [v.nbytes // cfg.num_layers for v in params["layers"].values()]  # one file tensor each
print(json.dumps(dict(seconds=secs, traced_peak=peak,
                      params_bytes=sum(v.nbytes for v in top) + sum(v.nbytes for v in params["layers"].values()),
                      largest_tensor_bytes=max([v.nbytes for v in top] + per_layer))))
"""


def convert(gguf: str, out: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "a3jax", "convert", "gguf-to-a3", "--gguf", gguf, "--out", out,
                        "--no-progress", "--force"], env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(r.stderr)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if rss <= before:
        print("warning: the child's peak RSS is not above an earlier child's; it is a lower bound", file=sys.stderr)
    traced = json.loads(subprocess.run([sys.executable, "-c", TRACE, gguf], env=env, capture_output=True,
                                       text=True, check=True).stdout.strip().splitlines()[-1])
    base = json.loads(subprocess.run([sys.executable, "-c", "import resource, json; import a3jax.convert; "
                                      "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))"],
                                     env=env, capture_output=True, text=True, check=True).stdout)
    return dict(cli_seconds=secs, cli_peak_rss_bytes=rss * 1024, import_rss_bytes=base * 1024,
                cli_summary=r.stdout.strip(), **{f"from_gguf_{k}": v for k, v in traced.items()})


def decode(gguf: str, ckpt: str, batches, new_tokens: int) -> list[dict]:
    import dataclasses

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from a3jax.checkpoint import load_params
    from a3jax.data.tokenizers import load_tokenizer
    from a3jax.decode import DecodeSpec, generate

    tok = load_tokenizer(ckpt)
    cfg, params = load_params(ckpt)
    cfg = dataclasses.replace(cfg, scan_layers=True)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                              dtype=torch.float32).eval()
    ids = tok.encode(PROMPT)
    rows = []
    for b in batches:
        seqs = [ids] * b

        def ours():
            return generate(cfg, params, seqs, new_tokens, DecodeSpec(stream="content", stop_at_eos=False)).new

        def theirs():
            with torch.no_grad():
                return hf.generate(torch.as_tensor(seqs), max_new_tokens=new_tokens, do_sample=False,
                                   eos_token_id=None, pad_token_id=cfg.pad_token_id)[:, len(ids):].numpy()

        for name, fn in (("a3jax", ours), ("transformers", theirs)):
            t = time.perf_counter()
            first = fn()
            warm = time.perf_counter() - t
            t = time.perf_counter()
            out = fn()
            secs = time.perf_counter() - t
            rows.append(dict(impl=name, batch=b, new_tokens=new_tokens, prompt_tokens=len(ids),
                             first_call_seconds=warm, seconds=secs, tokens_per_s=b * new_tokens / secs,
                             tokens=np.asarray(out)[0].tolist(), text=tok.decode(np.asarray(out)[0])))
            assert np.array_equal(np.asarray(first), np.asarray(out))
        same = rows[-2]["tokens"] == rows[-1]["tokens"]
        rows[-2]["same_tokens_as_transformers"] = rows[-1]["same_tokens_as_transformers"] = same
    return rows


def main(argv=None) -> int:
    from smollm2 import cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=os.path.join(cache_dir(), "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "real_model.json"))
    args = ap.parse_args(argv)
    if not os.path.isfile(args.gguf):
        raise SystemExit(f"{args.gguf}: missing; run `make install`")
    with tempfile.TemporaryDirectory() as d:
        ckpt = os.path.join(d, "ckpt")
        conv = convert(args.gguf, ckpt)
        rows = decode(args.gguf, ckpt, [int(x) for x in args.batches.split(",")], args.new_tokens)
    mib = lambda n: n / 2**20  # noqa: E731
    print(f"conversion (CLI, fresh process): {conv['cli_seconds']:.1f} s wall, peak RSS "
          f"{mib(conv['cli_peak_rss_bytes']):.0f} MiB (python + jax + a3jax imported: "
          f"{mib(conv['import_rss_bytes']):.0f} MiB)")
    print(f"from_gguf under tracemalloc: numpy peak {mib(conv['from_gguf_traced_peak']):.0f} MiB = fp32 weights "
          f"{mib(conv['from_gguf_params_bytes']):.0f} MiB + {mib(conv['from_gguf_traced_peak'] - conv['from_gguf_params_bytes']):.0f} "
          f"MiB (largest tensor {mib(conv['from_gguf_largest_tensor_bytes']):.0f} MiB)")
    print(f"\n{'impl':<13} {'batch':>5} {'new tok':>7} {'s':>7} {'tok/s':>8} {'first call s':>12}  same tokens")
    for r in rows:
        print(f"{r['impl']:<13} {r['batch']:>5} {r['new_tokens']:>7} {r['seconds']:>7.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['first_call_seconds']:>12.2f}  {r['same_tokens_as_transformers']}")
    print(f"\ncontinuation: {rows[0]['text']!r}")
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                machine=platform.platform(), cpus=os.cpu_count(), load_average=os.getloadavg(),
                python=platform.python_version(), command="python bench/real_model.py " + " ".join(argv or sys.argv[1:]))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, conversion=conv, decode=rows), f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
