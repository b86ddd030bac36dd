"""`a3jax serve` under load: continuous batching against one request at a time, on the demo-size model
and on SmolLM2-135M, and infill requests.

    python bench/serve.py [--only demo smollm2 infill] [--out bench/results/serve.json]
                          [--ckpt DIR] [--concurrency 1 4 16 64] [--max-tokens 32] [--slots 16] ...
                          [--gguf FILE | --smollm2-ckpt DIR] [--smollm2-max-tokens 16] ...
                          [--infill-group-sizes 1 4] [--infill-concurrency 1 4] ...

A real uvicorn server on loopback (in this process, a thread) and real HTTP clients (httpx, one
thread per concurrent client, each sending requests back to back). Every completion is greedy and
left to right; prompts are 4-40 bytes of code and English.

demo: --ckpt, else a random model of the configs' tiny shape (4 layers, hidden 256, byte vocab), which
is the demo model's size; an A3 model, so the query-stream lane (group size 1). Per concurrency C, two
servers: continuous batching (--slots rows decoding together, requests joining and leaving between
steps) and one at a time (--slots 1: each request decodes alone). Columns: generated tokens/s over
the wall time of the run, and request latency p50/p99 (s). Then the short-beside-long test: a short
request (8 tokens) alone, then while --slots - 1 long requests (8x longer) run beside it.

smollm2: SmolLM2-135M-Instruct converted from its GGUF (`a3jax convert gguf-to-a3` into a temporary
directory, or --smollm2-ckpt), an `ar` model, so the content-stream lane; the same two servers at
each concurrency, sized to run in a few minutes on 2 cores (--smollm2-max-tokens tokens per request,
max(C, --smollm2-requests) requests).

infill: /v1/infill on the demo-size model, one blank of --infill-blank tokens between a prefix and a
suffix, left to right in groups of each --infill-group-sizes entry, at each --infill-concurrency.
Infilling is a job on the Engine (a batch of its own, one text), so concurrent infills queue.

--only runs some parts and keeps the other parts already in --out.
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


def modes(engine, slots: int, max_len: int, concurrency, requests_of, max_tokens: int, label: str):
    """Continuous (slots rows) against one at a time (1 row) at each concurrency: (rows, speed-ups,
    the continuous server's url kept open for more tests or None). requests_of(C): requests at C."""
    rows = []
    for mode, s in (("continuous", slots), ("one at a time", 1)):
        srv = Running(engine, ServeOptions(model_name="m", slots=s, max_len=max_len, max_queue=4096))
        try:
            load(srv.url, 1, 2, max_tokens)  # the first HTTP requests pay for imports
            for c in concurrency:
                per = max(1, requests_of(c) // c)
                tps, lat = load(srv.url, c, per, max_tokens)
                rows.append(dict(mode=mode, slots=s, concurrency=c, requests=c * per, max_tokens=max_tokens,
                                 tokens_per_s=tps, p50_s=pct(lat, 50), p99_s=pct(lat, 99)))
                r = rows[-1]
                print(f"{label} {mode:>14} C={c:<3} n={c * per:<3} {r['tokens_per_s']:8.1f} tok/s  "
                      f"p50 {r['p50_s']:.3f}s  p99 {r['p99_s']:.3f}s", flush=True)
        finally:
            srv.close()
    by = {(r["mode"], r["concurrency"]): r["tokens_per_s"] for r in rows}
    return rows, {c: by[("continuous", c)] / by[("one at a time", c)] for c in concurrency}


def lane_costs(engine, slots: int, max_len: int, repeats: int = 10) -> dict:
    """What bounds batching: the ms of one lane step with 1 row and with `slots` rows (every row
    active), and of one admission (a row's prefill), timed on lanes built here (the server's kind)."""
    from a3jax.decode import api
    from a3jax.serve.slots import Lane, base_key
    kind = "query" if api.model_decoder(engine.cfg) == "a3" else "content"
    prompt = [max(engine.cfg.bos_token_id, 0)] + [5] * 7
    out = {}
    for s in (1, slots):
        lane = Lane(engine.cfg, engine.params, kind, 1, s, max_len)
        for i in range(s):
            lane.admit(i, prompt, max_len - len(prompt), base_key(0), 0.0, 0, 1.0)
        lane.step()  # compiles
        t0 = time.perf_counter()
        for _ in range(repeats):
            lane.step()
        out[f"step_{s}_rows_ms"] = (time.perf_counter() - t0) / repeats * 1e3
        if s == slots:
            t0 = time.perf_counter()
            for _ in range(repeats):
                lane.release(0)
                lane.admit(0, prompt, max_len - len(prompt), base_key(0), 0.0, 0, 1.0)
            np.asarray(lane.tokens)  # admissions are asynchronous until their result is read
            out["admit_ms"] = (time.perf_counter() - t0) / repeats * 1e3
    out["batching_bound"] = slots * out["step_1_rows_ms"] / out[f"step_{slots}_rows_ms"]
    print(f"lane: one step {out['step_1_rows_ms']:.1f} ms with 1 row, {out[f'step_{slots}_rows_ms']:.1f} ms with "
          f"{slots} rows (at most {out['batching_bound']:.2f}x from batching); one admission "
          f"{out['admit_ms']:.1f} ms", flush=True)
    return out


def table(rows) -> None:
    print("| mode | slots | concurrency | requests | generated tok/s | p50 latency s | p99 latency s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['slots']} | {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
              f"{r['p50_s']:.3f} | {r['p99_s']:.3f} |")


def demo_engine(args, slots: int):
    if args.ckpt:
        return Engine.load(args.ckpt, slots=slots), os.path.basename(os.path.normpath(args.ckpt))
    cfg = ModelConfig(max_position_embeddings=args.max_len)  # the configs' tiny shape, byte vocab
    return (Engine(cfg, numpy_init(cfg), load_tokenizer("byte"), slots=slots),
            "random, tiny shape (4 layers, hidden 256, byte vocab)")


def part_demo(args) -> dict:
    engine, model = demo_engine(args, args.slots)
    rows, ratios = modes(engine, args.slots, args.max_len, args.concurrency, lambda c: args.requests,
                         args.max_tokens, "demo")
    srv = Running(engine, ServeOptions(model_name="m", slots=args.slots, max_len=args.max_len, max_queue=4096))
    try:
        load(srv.url, 1, 2, args.short)
        alone, beside = short_beside_long(srv.url, args.slots, args.short, args.short_repeats)
    finally:
        srv.close()
    sbl = dict(short_tokens=args.short, long_tokens=8 * args.short, long_requests=args.slots - 1,
               alone_p50_s=pct(alone, 50), alone_p99_s=pct(alone, 99), beside_p50_s=pct(beside, 50),
               beside_p99_s=pct(beside, 99))
    print()
    table(rows)
    print("\ncontinuous / one at a time, tokens/s: " + ", ".join(f"C={c}: {v:.2f}x" for c, v in ratios.items()))
    print(f"short request ({args.short} tokens): alone p50 {sbl['alone_p50_s']:.3f}s p99 {sbl['alone_p99_s']:.3f}s; "
          f"beside {args.slots - 1} requests of {8 * args.short} tokens p50 {sbl['beside_p50_s']:.3f}s "
          f"p99 {sbl['beside_p99_s']:.3f}s ({sbl['beside_p99_s'] / sbl['alone_p99_s']:.2f}x)\n")
    return dict(model=model, max_len=args.max_len, rows=rows, speedup=ratios, short_beside_long=sbl,
                lane=lane_costs(engine, args.slots, args.max_len))


def part_smollm2(args) -> dict:
    import dataclasses
    import tempfile

    from a3jax.convert.cli import cli_main as convert_main
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.smollm2_ckpt
        if not ckpt:
            if not os.path.isfile(args.gguf):
                raise SystemExit(f"{args.gguf}: missing; run `make install`")
            ckpt = os.path.join(tmp, "smollm2")
            t0 = time.perf_counter()
            if convert_main(["gguf-to-a3", "--gguf", args.gguf, "--out", ckpt, "--no-progress"]) != 0:
                raise SystemExit("converting the GGUF failed")
            print(f"smollm2: converted in {time.perf_counter() - t0:.0f} s", flush=True)
        base = Engine.load(ckpt, slots=args.slots)
    # the layers as one scanned block: 30 layers compile once, not 30 times (the same weights)
    engine = Engine(dataclasses.replace(base.cfg, scan_layers=True), base.params, base.tokenizer, slots=args.slots)
    rows, ratios = modes(engine, args.slots, args.smollm2_max_len, args.smollm2_concurrency,
                         lambda c: max(c, args.smollm2_requests), args.smollm2_max_tokens, "smollm2")
    print()
    table(rows)
    print("\ncontinuous / one at a time, tokens/s: " + ", ".join(f"C={c}: {v:.2f}x" for c, v in ratios.items()))
    print()
    return dict(model="SmolLM2-135M-Instruct (Q4_1 GGUF, converted; objective ar: the content-stream lane)",
                max_len=args.smollm2_max_len, rows=rows, speedup=ratios,
                lane=lane_costs(engine, args.slots, args.smollm2_max_len))


def part_infill(args) -> dict:
    engine, model = demo_engine(args, args.infill_slots)
    texts = [f"{WORDS[i % len(WORDS)]}\n[MASK:{args.infill_blank}]\n{WORDS[(i + 3) % len(WORDS)]}"
             for i in range(len(WORDS))]
    srv = Running(engine, ServeOptions(model_name="m", slots=args.infill_slots, max_len=args.max_len,
                                       max_queue=4096))
    rows = []
    try:
        for g in args.infill_group_sizes:
            def one(client, text):
                t0 = time.perf_counter()
                r = client.post(srv.url + "/v1/infill", json={"text": text, "group_size": g, "temperature": 0})
                r.raise_for_status()
                return time.perf_counter() - t0, r.json()["choices"][0]["steps"]

            with httpx.Client(timeout=600) as client:
                steps = {one(client, t)[1] for t in texts}  # compiles each buffer shape of this group size
            for c in args.infill_concurrency:
                per = max(1, args.infill_requests // c)

                def client_loop(k):
                    with httpx.Client(timeout=600) as client:
                        return [one(client, texts[(k + i) % len(texts)])[0] for i in range(per)]

                t0 = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(c) as pool:
                    lat = np.array([x for xs in pool.map(client_loop, range(c)) for x in xs])
                wall = time.perf_counter() - t0
                rows.append(dict(group_size=g, steps=sorted(steps), concurrency=c, requests=c * per,
                                 blank_tokens=args.infill_blank, tokens_per_s=c * per * args.infill_blank / wall,
                                 requests_per_s=c * per / wall, p50_s=pct(lat, 50), p99_s=pct(lat, 99)))
                r = rows[-1]
                print(f"infill g={g} C={c:<3} n={c * per:<3} {r['tokens_per_s']:8.1f} filled tok/s  "
                      f"{r['requests_per_s']:.2f} req/s  p50 {r['p50_s']:.3f}s  p99 {r['p99_s']:.3f}s", flush=True)
    finally:
        srv.close()
    print("\n| group size | steps | concurrency | requests | filled tok/s | requests/s | p50 latency s | p99 latency s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['group_size']} | {'/'.join(map(str, r['steps']))} | {r['concurrency']} | {r['requests']} | "
              f"{r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} |")
    print()
    return dict(model=model, engine_slots=args.infill_slots, blank_tokens=args.infill_blank, rows=rows)


PARTS = {"demo": part_demo, "smollm2": part_smollm2, "infill": part_infill}


def main(argv=None):
    from a3jax.fs import cache_dir
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS), help="the parts to run")
    ap.add_argument("--ckpt", default=None, help="the demo-size model (default: random, the tiny shape)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level (at least C)")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--short-repeats", type=int, default=20)
    ap.add_argument("--gguf", default=os.path.join(cache_dir(), "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--smollm2-ckpt", default=None, help="an already converted SmolLM2 checkpoint")
    ap.add_argument("--smollm2-concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--smollm2-max-tokens", type=int, default=16)
    ap.add_argument("--smollm2-requests", type=int, default=8, help="requests per level: max(C, this)")
    ap.add_argument("--smollm2-max-len", type=int, default=64)
    ap.add_argument("--infill-group-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--infill-concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--infill-requests", type=int, default=32)
    ap.add_argument("--infill-blank", type=int, default=32, help="tokens in the one blank")
    ap.add_argument("--infill-slots", type=int, default=4, help="the server's --slots (the Engine's rows per call)")
    ap.add_argument("--out", default="bench/results/serve.json")
    args = ap.parse_args(argv)
    out = {}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            out = json.load(f)
        out = {k: v for k, v in out.items() if k in PARTS}  # an older layout is replaced whole
    command = "python " + " ".join(["bench/serve.py"] + list(argv if argv is not None else sys.argv[1:]))
    for name in args.only:
        before = os.getloadavg()[0]
        t0 = time.perf_counter()
        res = PARTS[name](args)
        meta = dict(date=datetime.date.today().isoformat(),
                    machine=f"{platform.machine()} {os.cpu_count()}-core CPU", command=command,
                    seconds=round(time.perf_counter() - t0, 1),
                    load_average_1min=[round(before, 2), round(os.getloadavg()[0], 2)])
        out[name] = dict(meta=meta, **res)
        print(f"{name}: {meta['seconds']:.0f} s, load average {before:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
