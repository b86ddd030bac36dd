"""`a3jax serve`: an OpenAI-compatible HTTP server over a checkpoint (docs/serve.md).

    a3jax serve --ckpt runs/x/final --host 127.0.0.1 --port 8000 --slots 8 --max-len 512

uvicorn runs the app; SIGTERM / Ctrl-C stops taking requests, lets the running ones finish for up to
--shutdown-timeout seconds, then cancels the rest and exits 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys


def _widths(text: str) -> tuple:
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--group-sizes takes comma-separated positive ints, got {text!r}")
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"--group-sizes takes comma-separated positive ints, got {text!r}")
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="a3jax serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="params checkpoint or run directory (a3jax convert / train)")
    ap.add_argument("--tokenizer", default="auto", help="auto (the checkpoint's, else byte) | byte | path")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model-name", default=None, help="the model id clients ask for (default: the checkpoint "
                                                       "directory's name)")
    ap.add_argument("--slots", type=int, default=8, help="rows decoding at once per lane (continuous batching)")
    ap.add_argument("--max-len", type=int, default=None,
                    help="positions per slot: prompt + max_tokens (default: the model's max_position_embeddings)")
    ap.add_argument("--group-sizes", type=_widths, default=(1,),
                    help="an A3 model's left-to-right group sizes compiled as lanes, e.g. 1,4 (others run "
                         "through the Engine as batches of their own)")
    ap.add_argument("--max-queue", type=int, default=256, help="sequences that may wait; more get 429")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    ap.add_argument("--shutdown-timeout", type=float, default=10.0,
                    help="seconds running requests get to finish after SIGTERM")
    ap.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return ap


def cli_main(argv) -> int:
    args = parser().parse_args(argv)
    for name in ("slots", "max_queue"):
        if getattr(args, name) < 1:
            print(f"a3jax serve: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    import uvicorn

    from a3jax.checkpoint import load_params
    from a3jax.decode import Engine
    from a3jax.decode.text import load_tok
    from a3jax.serve.app import ServeOptions, create_app

    try:
        cfg, params = load_params(args.ckpt)
        engine = Engine(cfg, params, load_tok(args.tokenizer, args.ckpt), slots=args.slots)
        name = args.model_name or os.path.basename(os.path.normpath(args.ckpt))
        opts = ServeOptions(model_name=name, slots=args.slots, max_len=args.max_len, widths=args.group_sizes,
                            max_queue=args.max_queue, timeout=args.timeout, shutdown_timeout=args.shutdown_timeout)
        print(f"a3jax serve: compiling the lanes of {name} ({args.slots} slots) ...", file=sys.stderr, flush=True)
        app = create_app(engine, opts)
    except (OSError, ValueError) as e:
        print(f"a3jax serve: {e}", file=sys.stderr)
        return 1
    # uvicorn handles SIGTERM/SIGINT (graceful shutdown), then re-raises the signal to the handler it
    # found: an ignoring one, so a graceful stop exits 0 instead of dying by the signal
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=args.shutdown_timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
