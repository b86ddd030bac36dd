"""Runs the reference A3 code (github.com/PKU-ML/Any-order-Any-subset-AR) from a local copy, for timing.

The reference has no license, so nothing of it is copied here: `load(path)` imports `llama_xlnet.py`
from the directory the user gives (e.g. `git clone` it, or `git archive` a mirror into /tmp). Its
imports target transformers 4.4x; on transformers 5 two names it imports are gone, so `load` fills
them in before importing (only what its training forward needs: a placeholder for the mask converter
it never calls on this path, and the standard RoPE frequencies under the name 'default').

`make_step(...)` builds its `LlamaTwoStreamForCausalLM` (SDPA attention, the model the reference's
example_usage.py trains) and returns a function that runs one forward+backward of its query-stream
loss on random groups of k, as its trainer does; with `optimizer=True` also gradient clipping and an
AdamW update (the full step HF's Trainer runs), and with `autocast="bfloat16"` in bf16 autocast over
fp32 weights (the Trainer's --bf16). bench/ may import torch; a3jax never does.

Run as a script it times that step for a named a3jax model config (random weights):

    python bench/reference_a3.py --reference DIR --model llama3.2-1b --seq 2048 --batch 4 \
        --device cuda --autocast bfloat16 --optimizer --steps 3 --out ref.json

A batch that runs out of device memory is halved (down to 1) and the batch that ran is recorded.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time
import types

import numpy as np


def _shim_transformers():
    import torch
    import transformers.modeling_rope_utils as rope_utils

    name = "transformers.modeling_attn_mask_utils"
    try:
        importlib.import_module(name)
    except ImportError:
        mod = types.ModuleType(name)

        class AttentionMaskConverter:  # imported by the reference, unused by its two-stream path
            pass

        mod.AttentionMaskConverter = AttentionMaskConverter
        sys.modules[name] = mod
    if "default" not in rope_utils.ROPE_INIT_FUNCTIONS:
        def default_rope(config, device=None, **_):
            dim = config.hidden_size // config.num_attention_heads
            base = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
            inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim))
            return inv, 1.0

        rope_utils.ROPE_INIT_FUNCTIONS["default"] = default_rope


def load(path: str):
    """The reference's `llama_xlnet` module, imported from the directory `path`."""
    if not os.path.isfile(os.path.join(path, "llama_xlnet.py")):
        raise FileNotFoundError(f"--reference {path!r}: no llama_xlnet.py there (a local copy of "
                                "github.com/PKU-ML/Any-order-Any-subset-AR is expected)")
    _shim_transformers()
    sys.path.insert(0, os.path.abspath(path))
    try:
        return importlib.import_module("llama_xlnet")
    finally:
        sys.path.pop(0)


def make_step(path, vocab, hidden, layers, heads, kv_heads, mlp, batch, seq, k=4, threads=2, seed=0,
              device="cpu", autocast=None, optimizer=False, tie_embeddings=False, rope_theta=10000.0):
    """A zero-arg function running one step of the reference's loss (fwd+bwd; with `optimizer`, also
    clipping at 1.0 and AdamW); returns the loss. `autocast`: None (fp32) or a torch dtype name."""
    import torch
    from transformers.models.llama.configuration_llama import LlamaConfig

    ref = load(path)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max(4096, seq),
                      rope_theta=rope_theta, tie_word_embeddings=tie_embeddings)
    cfg._attn_implementation = "sdpa"
    # transformers 5 keeps these under rope_parameters; the reference reads the 4.x attributes.
    for key, value in (("rope_theta", rope_theta), ("rope_scaling", None), ("pretraining_tp", 1)):
        if not hasattr(cfg, key):
            setattr(cfg, key, value)
    model = ref.LlamaTwoStreamForCausalLM(cfg).float().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.startswith("cuda")) if optimizer else None
    rng = np.random.default_rng(seed)
    tokens = torch.as_tensor(rng.integers(0, vocab, (batch, seq))).to(device)
    # Random groups of k in the reference's layout: rows in position order, a group id per position.
    groups = torch.as_tensor(np.stack([rng.permutation(seq) // k for _ in range(batch)])).to(device)
    cast = getattr(torch, autocast) if autocast else None
    device_type = torch.device(device).type

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=cast, enabled=cast is not None):
            out = model(input_ids=tokens, labels=tokens, group_ids=groups, use_cache=False)
        out.loss.backward()
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return out.loss.item()  # waits for the device

    return step


def time_reference(path, mcfg, batch, seq, steps, device, autocast, optimizer, threads) -> dict:
    """Times the reference's step for a3jax ModelConfig `mcfg`'s shape: the median of `steps` steps after
    two warm ones. Out of device memory: the batch is halved (recorded in `oom_batches`)."""
    import torch

    oom = []
    while True:
        try:
            step = make_step(path, mcfg.vocab_size, mcfg.hidden_size, mcfg.num_layers, mcfg.num_heads,
                             mcfg.num_kv_heads, mcfg.intermediate_size, batch, seq, threads=threads, device=device,
                             autocast=autocast, optimizer=optimizer, tie_embeddings=mcfg.tie_word_embeddings,
                             rope_theta=mcfg.rope_theta)
            t0 = time.perf_counter()
            loss = step()
            step()
            warm_s = time.perf_counter() - t0
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            break
        except torch.cuda.OutOfMemoryError:
            step = None
            oom.append(batch)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            if batch == 1:
                raise
            batch //= 2
    step_s = float(np.median(times))
    return {"batch": batch, "seq": seq, "step_s": step_s, "tokens_per_s": batch * seq / step_s,
            "warm_s": warm_s, "first_loss": loss, "oom_batches": oom}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Times the reference A3 code's training step (random weights).")
    ap.add_argument("--reference", required=True, metavar="DIR", help="local copy of the reference repository")
    ap.add_argument("--model", default="tiny", help="a3jax model config name for the shape (configs/model/)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    ap.add_argument("--autocast", default="", help="autocast dtype (bfloat16); default fp32")
    ap.add_argument("--optimizer", action="store_true", help="also clip and AdamW (the full training step)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", default="", help="JSON path (default: print only)")
    a = ap.parse_args(argv)
    import torch
    import transformers

    from a3jax.config import load_config

    mcfg = load_config(None, [f"model={a.model}"]).model
    res = time_reference(a.reference, mcfg, a.batch, a.seq, a.steps, a.device, a.autocast or None, a.optimizer,
                         a.threads)
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU, {a.threads} threads"
    out = {"implementation": "reference A3 code (torch, SDPA)", "model": a.model, "device": name,
           "date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "transformers": transformers.__version__, "autocast": a.autocast or "float32",
           "step": "fwd+bwd+clip+AdamW" if a.optimizer else "fwd+bwd",
           "command": "python bench/reference_a3.py " + " ".join(sys.argv[1:] if argv is None else argv), **res}
    print(f"reference A3 code, {a.model} shape, {name}: B={res['batch']} T={a.seq} {out['step']} "
          f"{res['step_s'] * 1e3:.1f} ms/step, {res['tokens_per_s']:,.0f} tok/s")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
