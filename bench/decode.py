"""Exact KV-cached any-order decoding vs recomputing every step (the reference code's way), and
self-speculative sampling vs token-by-token and plain group-wise decoding.

    python bench/decode.py [--blanks 256 512 1024] [--group-sizes 1 4 8] [--uncached-steps 6]
                           [--orders left_to_right] [--prompt 16] [--windows 0 32] [--one-phase]
                           [--repeat 2] [--out bench/results/decode.json]
    # dynamic orders: 1024-token rows, 960 blanks, group size 4; cost that follows the remaining blanks
    python bench/decode.py --blanks 960 --prompt 64 --group-sizes 4 --orders confidence left_to_right \
        --windows 0 32 --one-phase --uncached-steps 4 --repeat 1 --out bench/results/decode_dynamic.json
    python bench/decode.py --speculative [--ks 2 4 8] [--demo-ckpt runs/demo/final] [--rows 16]
                           [--prompt-tokens 32] [--new-tokens 64] [--temperatures 1.0 0.0]
                           [--out bench/results/decode_speculative.json]
    # a named model config with random weights (bench/device_check.sh: cached and speculative tokens/s)
    python bench/decode.py --speculative --model llama3.2-1b --param-dtype bfloat16 --ks 4 \
        --methods token-by-token speculative --temperatures 0.0 --no-nll

Fills N blanks after a 16-token (--prompt) prompt (one row, greedy) with a random model of the `tiny`
shape (4 layers, hidden 256, 8 heads / 4 KV heads, MLP 688, byte vocab 260). Cached: the whole decode
(prefill + all steps) is timed after a compile run. Dynamic orders run in phases whose query rows
shrink with the remaining blanks; --one-phase also times phases=1 (every blank's query row at every
step, a single static shape) and checks it gives the same tokens; --windows adds
semi-autoregressive windows (window=W: W query rows per step). Uncached: every step is a full forward over all
T = 16 + N rows, so its cost per step is flat; on a 2-core CPU running all of them (up to 1024 steps)
takes too long, so the first `--uncached-steps` steps are timed after a compile run and the total is
extrapolated as per-step time x number of steps (said in the table and the JSON).

--speculative: `generate` continues `--rows` prompts by `--new-tokens` tokens (left to right, no EOS
stop, independent rows) on a random model of the tiny shape and, with --demo-ckpt, on the trained
demo model (prompts: the starts of held-out stdlib functions). Per setting: token-by-token (k=1),
speculative=k and plain group-wise group_size=k. Columns: wall-clock tokens/s (best of 2 after a
compile run), model passes per generated token (per row: its passes / its tokens), tokens committed
per verify pass (the accepted drafts plus the corrected token), drafts accepted per verify pass
(DecodeResult.accepted; the first draft of a block always is), and the NLL per token of the output under the
model's token-by-token factorisation (a3jax.score.log_likelihood; mean +- standard error over rows).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from a3jax.config import ModelConfig  # noqa: E402
from a3jax.decode import DYNAMIC_ORDERS, DecodeSpec, SamplingParams, generate, infill  # noqa: E402
from a3jax.model import numpy_init  # noqa: E402
from a3jax.score import log_likelihood  # noqa: E402

CFG = ModelConfig(max_position_embeddings=2048)  # defaults = configs' tiny shape
PROMPT = 16


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _nll(cfg, params, info, prompt_len, n_new):
    """Per-row NLL per generated token under the token-by-token (left-to-right) factorisation."""
    t = info.tokens.shape[1]
    groups = np.where(np.arange(t) < prompt_len, 0, np.arange(t))[None].repeat(len(info.tokens), 0)
    target = np.broadcast_to(np.arange(t) >= prompt_len, info.tokens.shape)
    return -log_likelihood(cfg, params, info.tokens, groups, target_mask=target) / n_new


METHODS = ("token-by-token", "speculative", "group-wise")


def speculative_rows(name, cfg, params, prompts, n_new, ks, temperatures, seed=0, methods=METHODS, nll=True,
                     on_row=None):
    """The speculative table's rows for one model (`nll=False`: no NLL column, one program fewer);
    `on_row(row)` is called as each row is done."""
    prompt_len = len(prompts[0])
    out = []
    for temp in temperatures:
        settings = [("token-by-token", 1, dict(group_size=1))]
        for k in ks:
            settings += [("speculative", k, dict(speculative=k)), ("group-wise", k, dict(group_size=k))]
        for method, k, kw in (s for s in settings if s[0] in methods):
            run = lambda: generate(cfg, params, prompts, n_new, DecodeSpec(stop_at_eos=False, **kw),
                                   SamplingParams(temperature=temp, seed=seed, independent_rows=True))
            timed(run)  # compile
            sec, info = timed(run, repeat=2)
            new_steps = info.step[:, prompt_len:prompt_len + n_new]
            passes = new_steps.max(axis=1) + 1  # per row: the pass that committed its last token, + 1
            verify = np.array([len(np.unique(r)) for r in new_steps])  # passes that committed anything
            spec = method == "speculative"
            nlls = _nll(cfg, params, info, prompt_len, n_new) if nll else None
            row = dict(model=name, temperature=temp, method=method, k=k, rows=len(prompts), new_tokens=n_new,
                       seconds=sec, tokens_per_s=len(prompts) * n_new / sec, loop_passes=info.num_steps,
                       passes_per_token=float(np.mean(passes / n_new)),
                       tokens_per_verify_pass=float(np.mean(n_new / verify)) if spec else None,
                       accepted_per_verify_pass=float(np.mean(info.accepted / verify)) if spec else None,
                       nll=float(nlls.mean()) if nll else None,
                       nll_se=float(nlls.std(ddof=1) / np.sqrt(len(nlls))) if nll else None)
            out.append(row)
            if on_row:
                on_row(row)
            tpv = f"{row['tokens_per_verify_pass']:.2f}" if spec else "-"
            apv = f"{row['accepted_per_verify_pass']:.2f}" if spec else "-"
            nll_text = f"{row['nll']:>7.3f} +- {row['nll_se']:.3f}" if nll else f"{'-':>7}"
            print(f"{name:<7} {temp:>4} {method:<15} {k:>2} {row['tokens_per_s']:>9.1f} "
                  f"{row['passes_per_token']:>10.3f} {tpv:>10} {apv:>10} {nll_text}",
                  flush=True)
    return out


def random_model(name: str, param_dtype: str = ""):
    """(cfg, params): the tiny shape, or the named model config, with random params in its param dtype.
    Small models are drawn on the host (compiling the linen init costs seconds), large ones by one
    jitted init on the device (a host draw of a 1B model takes tens of seconds)."""
    from a3jax.config import load_config
    from a3jax.model import init_params, param_count

    cfg = load_config(None, [f"model={name}"]).model if name else CFG
    cfg = dataclasses.replace(cfg, param_dtype=param_dtype) if param_dtype else cfg
    if param_count(cfg) > 100e6:
        return cfg, jax.jit(lambda key: init_params(cfg, key))(jax.random.PRNGKey(0))
    return cfg, jax.tree.map(lambda x: x.astype(cfg.param_dtype), numpy_init(cfg))


def speculative_main(args) -> int:
    print(f"{'model':<7} {'temp':>4} {'method':<15} {'k':>2} {'tok/s':>9} {'passes/tok':>10} {'tok/verify':>10} "
          f"{'acc/verify':>10} {'nll/tok':>7}")
    rng = np.random.default_rng(0)
    n_p = args.prompt_tokens
    cfg, params = random_model(args.model, args.param_dtype)
    model_meta = dict(random=dict(model=args.model or "tiny shape", layers=cfg.num_layers, hidden=cfg.hidden_size,
                                  vocab=cfg.vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype))
    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()} {os.cpu_count()}-core CPU",
                jax=jax.__version__, backend=jax.default_backend(), device=jax.devices()[0].device_kind,
                models=model_meta, prompt_tokens=n_p)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", "decode_speculative.json")
    rows = []

    def save(row=None):
        """Rewrites the JSON as each row is done, so a run cut short keeps the rows it finished."""
        rows.extend([row] if row else [])
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(dict(meta=dict(meta, load_average=os.getloadavg()), rows=rows), f, indent=2)

    rand_prompts = [[cfg.bos_token_id] + list(rng.integers(0, 256, n_p - 1)) for _ in range(args.rows)]
    speculative_rows("random", cfg, params, rand_prompts, args.new_tokens, args.ks, args.temperatures,
                     methods=args.methods, nll=not args.no_nll, on_row=save)
    if args.demo_ckpt:
        from a3jax.checkpoint import load_params
        from a3jax.data.tokenizers import load_tokenizer
        from a3jax.demo import heldout_functions

        cfg, params = load_params(args.demo_ckpt)
        tok = load_tokenizer("byte")
        texts = [f["text"] for f in heldout_functions(512, 4 * args.rows) if len(f["text"]) >= n_p][:args.rows]
        if len(texts) < args.rows:
            raise SystemExit(f"only {len(texts)} held-out functions have {n_p} bytes")
        prompts = [[tok.bos_id] + list(tok.encode(t))[:n_p - 1] for t in texts]
        speculative_rows("demo", cfg, params, prompts, args.new_tokens, args.ks, args.temperatures,
                         methods=args.methods, nll=not args.no_nll, on_row=save)
        model_meta["demo"] = dict(ckpt=args.demo_ckpt, layers=cfg.num_layers, hidden=cfg.hidden_size)
    save()
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speculative", action="store_true", help="the speculative-sampling table instead")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8], help="--speculative: draft block sizes")
    ap.add_argument("--demo-ckpt", default=None, help="--speculative: also the trained demo model (params ckpt)")
    ap.add_argument("--model", default="", help="--speculative: a named model config (configs/model/, random "
                                                "weights, e.g. llama3.2-1b) instead of the tiny shape")
    ap.add_argument("--param-dtype", default="", help="--speculative: storage dtype of that model's params")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="--speculative: which")
    ap.add_argument("--no-nll", action="store_true", help="--speculative: skip the NLL column (one program fewer)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.0])
    ap.add_argument("--blanks", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--orders", nargs="+", default=["left_to_right"])
    ap.add_argument("--uncached-steps", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=PROMPT, help="known tokens before the blanks")
    ap.add_argument("--windows", type=int, nargs="+", default=[0],
                    help="dynamic orders: window sizes to run (0 = no window)")
    ap.add_argument("--one-phase", action="store_true",
                    help="dynamic orders: also time phases=1 (one static shape: every blank's query row every step)")
    ap.add_argument("--repeat", type=int, default=2, help="cached runs timed (best of)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/decode[_speculative].json)")
    args = ap.parse_args(argv)
    if args.speculative:
        return speculative_main(args)
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", "decode.json")
    params = numpy_init(CFG)
    rows = []
    hdr = (f"{'order':<14} {'window':>6} {'blanks':>6} {'k':>2} {'steps':>5} {'cached s':>9} {'1-phase s':>9} "
           f"{'cached tok/s':>12} {'uncached s/step':>15} {'uncached s (extrap.)':>20} {'speedup':>8}")
    print(hdr)
    for order in args.orders:
        dynamic = order in DYNAMIC_ORDERS
        for window in (args.windows if dynamic else [0]):
            for n in args.blanks:
                t = args.prompt + n
                tokens = np.random.default_rng(n).integers(0, 256, (1, t)).astype(np.int32)
                known = (np.arange(t) < args.prompt)[None]
                for k in args.group_sizes:
                    run = lambda **kw: infill(CFG, params, tokens, known, DecodeSpec(
                        order=order, group_size=k, window=window or None, **kw))
                    run(max_steps=1)  # compile (max_steps is a traced value: same program)
                    cached_s, res = timed(lambda: run(), repeat=args.repeat)
                    one_s, same_one = None, None
                    if dynamic and args.one_phase:  # the single static shape, to compare with the phases
                        run(phases=1, max_steps=1)
                        one_s, one = timed(lambda: run(phases=1))
                        same_one = bool((one.tokens == res.tokens).all() and (one.step == res.step).all())
                    steps = res.num_steps
                    m = min(args.uncached_steps, steps)
                    run(use_cache=False, max_steps=1)  # compile
                    unc_m, partial = timed(lambda: run(use_cache=False, max_steps=m))
                    # the partial uncached run decided the same tokens as the cached one so far
                    filled = partial.step >= 0
                    same = bool((partial.tokens[filled] == res.tokens[filled]).all()
                                and (partial.step[filled] == res.step[filled]).all())
                    per_step = unc_m / m
                    unc_total = per_step * steps
                    row = dict(order=order, window=window, blanks=n, group_size=k, length=t, steps=steps,
                               cached_s=cached_s, one_phase_cached_s=one_s, one_phase_same_tokens=same_one,
                               cached_tokens_per_s=n / cached_s, uncached_steps_timed=m,
                               uncached_s_per_step=per_step, uncached_s_extrapolated=unc_total,
                               uncached_tokens_per_s=n / unc_total, speedup=unc_total / cached_s,
                               one_phase_speedup=(unc_total / one_s) if one_s else None,
                               uncached_prefix_matches_cached=same)
                    rows.append(row)
                    one_txt = f"{one_s:>9.2f}" if one_s else f"{'-':>9}"
                    print(f"{order:<14} {window or '-':>6} {n:>6} {k:>2} {steps:>5} {cached_s:>9.2f} {one_txt} "
                          f"{n / cached_s:>12.1f} {per_step:>15.4f} {unc_total:>20.2f} {unc_total / cached_s:>7.1f}x",
                          flush=True)
    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()} {os.cpu_count()}-core CPU",
                jax=jax.__version__, backend=jax.default_backend(), model=dict(
                    layers=CFG.num_layers, hidden=CFG.hidden_size, heads=CFG.num_heads, kv_heads=CFG.num_kv_heads,
                    mlp=CFG.intermediate_size, vocab=CFG.vocab_size), prompt_tokens=args.prompt,
                load_average=os.getloadavg(),
                note=f"uncached totals extrapolated from the first {args.uncached_steps} steps (flat per-step cost)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
