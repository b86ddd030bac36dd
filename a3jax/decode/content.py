"""Base-model decoding: the content stream, left to right, one token per step, with a KV cache.

The content stream under AR groups (group id = position) is the plain causal LLaMA the weights came
from, before any A3 adaptation: this is how a converted checkpoint is checked against its source,
and the AR baseline of evaluations. No query rows run.

Layout: one buffer [B, T] per call, prompts left-aligned (row r's prompt fills slots 0..len_r-1, its
new tokens go to len_r, len_r+1, ...), so every token keeps its true RoPE position and ragged
prompts need no left padding. The cache is the slot-indexed `a3jax.model.KVCache` of
a3jax.decode.cache: a slot is visible once written (segment 1), and group id = position gives the
causal rule. Prefill runs every prompt position as content rows once (padding slots get segment 0:
invisible until the row's own new token overwrites them); each step runs one content row per row
of the batch against the cache. `use_cache=False` is the baseline: every step re-runs the full
causal forward over the buffer (same tokens up to float rounding).

Everything after host-side preparation is one jitted `lax.while_loop` over steps.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from a3jax.config import ModelConfig
from a3jax.decode import cache as cache_lib
from a3jax.decode import sampling
from a3jax.model import KVCache, Rows, apply_model, choose_kernel, lm_logits, run_rows
from a3jax.model import token_logprobs


def _prefill(cfg, params, tokens, prompt_len, width):
    """KV cache [.., T] holding the prompt slots (< prompt_len [B]) and the logits at each row's last
    prompt position [B, V]. Only the first `width` (the longest prompt) slots run."""
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (b, width))
    seg = (pos < prompt_len[:, None]).astype(jnp.int32)
    hc, _, kv = run_rows(cfg, params, tokens[:, :width], Rows(pos, pos, seg), None, return_kv=True)
    last = jnp.take_along_axis(hc, (prompt_len - 1)[:, None, None], axis=1)  # [B, 1, E]
    cache = cache_lib.write(cache_lib.empty_cache(cfg, b, t), kv, jnp.where(seg > 0, pos, -1), pos)
    return cache, lm_logits(cfg, params, last)[:, 0]


def _cached_step(cfg, params, cache, tok, pos):
    """One content row per batch row (token tok [B] at slot pos [B]) against the cache: (logits [B, V],
    cache with the row's keys/values written)."""
    kind = choose_kernel(cfg, cache.groups.shape[1] + 1, step_rows=1)
    cfg = dataclasses.replace(cfg, attention=kind)
    p = pos[:, None].astype(jnp.int32)
    hc, _, kv = run_rows(cfg, params, tok[:, None], Rows(p, p, jnp.ones_like(p)), None, cache=cache,
                         return_kv=True)
    return lm_logits(cfg, params, hc)[:, 0], cache_lib.write(cache, kv, p, p)


def _full_logits(cfg, params, tokens, filled, pos):
    """The uncached baseline: the causal forward over the buffer (filled slots only), logits at pos [B]."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits = apply_model(cfg, params, tokens, positions, positions, filled.astype(jnp.int32), "content")
    return jnp.take_along_axis(logits, pos[:, None, None], axis=1)[:, 0]


class ContentState(flax.struct.PyTreeNode):
    s: jax.Array  # steps run
    tokens: jax.Array  # [B, T]
    filled: jax.Array  # [B, T]
    logp: jax.Array  # [B, T]
    step: jax.Array  # [B, T] the step that wrote each slot (-1 = none)
    done: jax.Array  # [B]
    cache: Optional[KVCache] = None
    logits: Optional[jax.Array] = None  # cached path: [B, V] the next token's logits


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode(cfg: ModelConfig, use_cache: bool, width: int, params, tokens, prompt_len, limit, opts):
    """tokens [B, T] (prompts in place); prompt_len [B]; limit [B] = prompt_len + max_new_tokens.
    Returns the final ContentState."""
    b, t = tokens.shape
    base_key = jax.random.PRNGKey(opts["seed"])
    rows = jnp.arange(b)
    filled = jnp.arange(t)[None] < prompt_len[:, None]
    cache, logits = _prefill(cfg, params, tokens, prompt_len, width) if use_cache else (None, None)
    state = ContentState(s=jnp.int32(0), tokens=tokens, filled=filled, logp=jnp.zeros((b, t), jnp.float32),
                         step=jnp.full((b, t), -1, jnp.int32), done=prompt_len >= limit, cache=cache, logits=logits)

    def cond(st):
        return (st.s < opts["max_steps"]) & ~st.done.all()

    def body(st):
        s = st.s
        pos = prompt_len + s  # the slot this step fills, per row
        logits = st.logits if use_cache else _full_logits(cfg, params, st.tokens, st.filled, pos - 1)
        drawn = sampling.sample(jax.random.fold_in(base_key, s), logits[:, None], opts["temperature"],
                                opts["top_k"], opts["top_p"])[:, 0]
        lp = token_logprobs(logits[:, None], drawn[:, None])[:, 0]
        live = ~st.done
        slot = jnp.where(live, pos, t)  # out of range -> dropped
        new = st.replace(
            tokens=st.tokens.at[rows, slot].set(drawn, mode="drop"),
            filled=st.filled.at[rows, slot].set(True, mode="drop"),
            logp=st.logp.at[rows, slot].set(lp, mode="drop"),
            step=st.step.at[rows, slot].set(s, mode="drop"),
            done=st.done | (pos + 1 >= limit) | (opts["stop_at_eos"] & (drawn == opts["eos_id"])), s=s + 1)
        if use_cache:
            # the next step's logits come from this token's row (dead rows write a clamped slot; their
            # logits are never used)
            nxt, cache = _cached_step(cfg, params, st.cache, drawn, jnp.minimum(pos, t - 1))
            new = new.replace(logits=nxt, cache=cache)
        return new

    return jax.lax.while_loop(cond, body, state)


def decode_content(cfg: ModelConfig, params, tokens: np.ndarray, prompt_len: np.ndarray, max_new_tokens: int,
                   spec, sampling_params, eos_id: int, width: int):
    """Runs the content-stream decoder on a prepared buffer (a3jax.decode.generate with the content
    stream; spec/sampling_params checked there). width: prompt slots the prefill runs (>= the longest
    prompt; a fixed bucket keeps one compiled program across prompt lengths). Returns (tokens [B, T],
    logprobs [B, T], step [B, T], num_steps) as numpy."""
    temperature, top_k, top_p, seed = (sampling_params.temperature, sampling_params.top_k, sampling_params.top_p,
                                       sampling_params.seed)
    use_cache, stop_at_eos, max_steps = spec.use_cache, bool(spec.stop_at_eos), spec.max_steps
    limit = np.minimum(prompt_len + int(max_new_tokens), tokens.shape[1])
    total = int(max_new_tokens) if max_steps is None else min(int(max_new_tokens), int(max_steps))
    opts = dict(max_steps=jnp.int32(total), temperature=jnp.float32(temperature), top_k=jnp.int32(top_k),
                top_p=jnp.float32(top_p), seed=jnp.uint32(int(seed) & 0xFFFFFFFF),
                stop_at_eos=jnp.bool_(stop_at_eos and eos_id >= 0), eos_id=jnp.int32(eos_id))
    out = _decode(cfg, bool(use_cache), int(width), params, jnp.asarray(tokens, jnp.int32),
                  jnp.asarray(prompt_len, jnp.int32), jnp.asarray(limit, jnp.int32), opts)
    return np.asarray(out.tokens), np.asarray(out.logp), np.asarray(out.step), int(out.s)
