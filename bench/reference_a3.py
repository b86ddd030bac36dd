"""Runs the reference A3 code (github.com/PKU-ML/Any-order-Any-subset-AR) from a local copy, for timing.

The reference has no license, so nothing of it is copied here: `load(path)` imports `llama_xlnet.py`
from the directory the user gives (e.g. `git clone` it, or `git archive` a mirror into /tmp). Its
imports target transformers 4.4x; on transformers 5 two names it imports are gone, so `load` fills
them in before importing (only what its training forward needs: a placeholder for the mask converter
it never calls on this path, and the standard RoPE frequencies under the name 'default').

`make_step(...)` builds its `LlamaTwoStreamForCausalLM` (SDPA attention, the model the reference's
example_usage.py trains) and returns a function that runs one forward+backward of its query-stream
loss on random groups of k, as its trainer does. bench/ may import torch; a3jax never does.
"""
from __future__ import annotations

import importlib
import os
import sys
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


def make_step(path, vocab, hidden, layers, heads, kv_heads, mlp, batch, seq, k=4, threads=2, seed=0):
    """A zero-arg function running one fwd+bwd of the reference's loss; returns the loss."""
    import torch
    from transformers.models.llama.configuration_llama import LlamaConfig

    ref = load(path)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                      rope_theta=10000.0)
    cfg._attn_implementation = "sdpa"
    # transformers 5 keeps these under rope_parameters; the reference reads the 4.x attributes.
    for key, value in (("rope_theta", 10000.0), ("rope_scaling", None), ("pretraining_tp", 1)):
        if not hasattr(cfg, key):
            setattr(cfg, key, value)
    model = ref.LlamaTwoStreamForCausalLM(cfg).float().train()
    rng = np.random.default_rng(seed)
    tokens = torch.as_tensor(rng.integers(0, vocab, (batch, seq)))
    # Random groups of k in the reference's layout: rows in position order, a group id per position.
    groups = torch.as_tensor(np.stack([rng.permutation(seq) // k for _ in range(batch)]))

    def step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=tokens, labels=tokens, group_ids=groups, use_cache=False)
        out.loss.backward()
        return out.loss.item()

    return step
