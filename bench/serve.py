"""`a3jax serve` under load: continuous batching against one request at a time.

    python bench/serve.py [--ckpt runs/demo/final] [--concurrency 1 4 16 64] [--max-tokens 32]
                          [--slots 16] [--max-len 256] [--out bench/results/serve.json]

A real uvicorn server on loopback (in this process, a thread) and real HTTP clients (httpx, one
thread per concurrent client, each sending requests back to back). The model: --ckpt, else a random
model of the configs' tiny shape (4 layers, hidden 256, byte vocab), which is the demo model's size.
Every request is greedy, left to right (group size 1: the query-stream lane), prompts of 4-40 bytes.

Per concurrency C, two servers: continuous batching (--slots rows decoding together, requests joining
and leaving between steps) and one at a time (--slots 1: each request decodes alone). Columns:
generated tokens/s over the wall time of the run, and request latency p50/p99 (s). Then the
short-beside-long test: a short request (8 tokens) alone, then while --slots - 1 long requests (8x
longer) run beside it; its latency p50/p99 over --short-repeats tries.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import socket
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from a3jax.config import ModelConfig  # noqa: E402
from a3jax.data.tokenizers import load_tokenizer  # noqa: E402
from a3jax.decode import Engine  # noqa: E402
from a3jax.model import numpy_init  # noqa: E402
from a3jax.serve import ServeOptions, create_app  # noqa: E402

WORDS = ["def f(x):", "The quick brown fox", "import os", "Hello", "class A:", "return x + 1", "for i in range(10):"]


class Running:
    def __init__(self, engine, opts):
        self.app = create_app(engine, opts)  # compiles the lanes (warm-up) before serving
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(60)


def request(client, url, prompt, max_tokens):
    t0 = time.perf_counter()
    r = client.post(url + "/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": max_tokens,
                                                   "temperature": 0})
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]


def load(url, concurrency: int, per_client: int, max_tokens: int):
    """concurrency clients, each sending per_client requests back to back: (tokens/s, latencies)."""
    def client_loop(c):
        out = []
        with httpx.Client(timeout=600) as client:
            for i in range(per_client):
                prompt = WORDS[(c + i) % len(WORDS)] + " " * ((c * 7 + i) % 24)
                out.append(request(client, url, prompt, max_tokens))
        return out

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = [r for rs in pool.map(client_loop, range(concurrency)) for r in rs]
    wall = time.perf_counter() - t0
    lat = np.array([r[0] for r in results])
    return sum(r[1] for r in results) / wall, lat


def short_beside_long(url, slots: int, short: int, repeats: int):
    """Latencies of a short request alone, and while slots - 1 requests 8x longer keep running beside it."""
    with httpx.Client(timeout=600) as client:
        alone = [request(client, url, "Hello", short)[0] for _ in range(repeats)]
    stop = threading.Event()

    def long_loop(c):
        with httpx.Client(timeout=600) as client:
            while not stop.is_set():
                request(client, url, WORDS[c % len(WORDS)], 8 * short)

    pool = concurrent.futures.ThreadPoolExecutor(slots - 1)
    futs = [pool.submit(long_loop, c) for c in range(slots - 1)]
    time.sleep(0.5)
    with httpx.Client(timeout=600) as client:
        beside = [request(client, url, "Hello", short)[0] for _ in range(repeats)]
    stop.set()
    for f in futs:
        f.result()
    pool.shutdown()
    return np.array(alone), np.array(beside)


def pct(a, q):
    return float(np.percentile(a, q))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level (at least C)")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--short-repeats", type=int, default=20)
    ap.add_argument("--out", default="bench/results/serve.json")
    args = ap.parse_args(argv)
    if args.ckpt:
        engine = Engine.load(args.ckpt, slots=args.slots)
        model = args.ckpt
    else:
        cfg = ModelConfig(max_position_embeddings=args.max_len)  # the configs' tiny shape, byte vocab
        engine = Engine(cfg, numpy_init(cfg), load_tokenizer("byte"), slots=args.slots)
        model = "random, tiny shape (4 layers, hidden 256, byte vocab)"
    rows = []
    servers = {"continuous": args.slots, "one at a time": 1}
    for mode, slots in servers.items():
        srv = Running(engine, ServeOptions(model_name="m", slots=slots, max_len=args.max_len, max_queue=4096))
        try:
            load(srv.url, 1, 2, args.max_tokens)  # the first HTTP requests pay for imports
            for c in args.concurrency:
                per = max(1, args.requests // c)
                tps, lat = load(srv.url, c, per, args.max_tokens)
                rows.append(dict(mode=mode, slots=slots, concurrency=c, requests=c * per, tokens_per_s=tps,
                                 p50_s=pct(lat, 50), p99_s=pct(lat, 99)))
                r = rows[-1]
                print(f"{mode:>14} C={c:<3} {r['tokens_per_s']:8.1f} tok/s  p50 {r['p50_s']:.3f}s  "
                      f"p99 {r['p99_s']:.3f}s", flush=True)
            if mode == "continuous":
                alone, beside = short_beside_long(srv.url, slots, args.short, args.short_repeats)
        finally:
            srv.close()
    sbl = dict(short_tokens=args.short, long_tokens=8 * args.short, long_requests=args.slots - 1,
               alone_p50_s=pct(alone, 50), alone_p99_s=pct(alone, 99), beside_p50_s=pct(beside, 50),
               beside_p99_s=pct(beside, 99))
    print()
    print("| mode | slots | concurrency | requests | generated tok/s | p50 latency s | p99 latency s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['slots']} | {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
              f"{r['p50_s']:.3f} | {r['p99_s']:.3f} |")
    by = {(r["mode"], r["concurrency"]): r["tokens_per_s"] for r in rows}
    ratios = {c: by[("continuous", c)] / by[("one at a time", c)] for c in args.concurrency}
    print()
    print("continuous / one at a time, tokens/s: " + ", ".join(f"C={c}: {v:.2f}x" for c, v in ratios.items()))
    print(f"short request ({args.short} tokens): alone p50 {sbl['alone_p50_s']:.3f}s p99 {sbl['alone_p99_s']:.3f}s; "
          f"beside {args.slots - 1} requests of {8 * args.short} tokens p50 {sbl['beside_p50_s']:.3f}s "
          f"p99 {sbl['beside_p99_s']:.3f}s ({sbl['beside_p99_s'] / sbl['alone_p99_s']:.2f}x)")
    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()} {os.cpu_count()}-core CPU",
                command="python " + " ".join([sys.argv[0]] + list(argv if argv is not None else sys.argv[1:])),
                model=model, max_tokens=args.max_tokens, max_len=args.max_len)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows, speedup=ratios, short_beside_long=sbl), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
