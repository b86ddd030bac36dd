"""`infill` and `generate`: group-wise A3 decoding with an exact KV cache, one compiled loop.

Layout. A row is tokens[T] with `known` (prompt/context) positions, blanks (to fill) and padding
(`valid` False: neither). Known tokens get group ids 0 (one group, default) or AR chunks
0, 1, ... of `prompt_group_size`; the tokens committed at decoding step s get group id T + s, later
than every known group. With the cache (default) the known tokens are encoded once and every step
runs only the new content rows and the query rows asked about (a3jax.decode.cache); with
`use_cache=False` every step re-runs the full forward over all T rows with the same group ids (the
baseline; same results up to float rounding). `mode="reference"` reproduces the reference code's
dynamic resampling (generate_dynamic_resampling): every committed token (known or generated) is in
one group 0 and the remaining blanks in group 1, re-run from scratch each step; `mode="a3"` with a
user grouping as the order reproduces its generate_two_stream.

Dynamic orders run in phases (static shapes each): a step runs the query rows of the first w
remaining blanks of each row, and w shrinks (a few compiled phases) as blanks are filled, so the cost
follows the remaining blanks; a window (semi-autoregressive decoding) caps w at W.

Everything after host-side preparation is one jitted function with `lax.while_loop`s over steps (one
per phase): static shapes, no Python loop over positions, steps or rows.

Other objectives (model.objective, recorded in the checkpoint): an mdlm model is decoded by
iterative unmasking (a3jax.decode.mdlm; `steps` denoiser calls, default one per `group_size` blanks,
so it makes as many model calls as A3 committing group_size per step); an ar model only generates,
left to right (a3jax.decode.causal). A call that does not apply to the objective raises ObjectiveError.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from a3jax.config import ModelConfig
from a3jax.data import rows as rows_lib
from a3jax.decode import cache as cache_lib
from a3jax.decode import content as content_lib
from a3jax.decode import orders as orders_lib
from a3jax.decode import sampling
from a3jax.decode import mdlm
from a3jax.decode import speculative as speculative_lib
from a3jax.decode.orders import OrderError
from a3jax import objectives

MODES = ("a3", "reference")
STREAMS = ("query", "content")


class DecodeError(ValueError):
    """Bad decoding input (shapes, blanks, lengths, options)."""


class DecodeResult(NamedTuple):
    """tokens [B, T] (known tokens unchanged, blanks filled); logprobs [B, T]: log p of each filled
    token under the model (temperature 1, unfiltered; 0 at known/padding); step [B, T]: the step
    that committed each position (-1 for known/padding/unfilled); num_steps: steps run.
    Speculative decoding: steps are model passes, and accepted [B] counts each row's accepted drafts
    (the corrected tokens not included); None otherwise. With stop_at_eos (generate): eos_at [B] is
    the position of the EOS that ended each row (-1 = none); the row's blanks after it are padding
    (pad token, step -1, log-prob 0). None otherwise."""
    tokens: np.ndarray
    logprobs: np.ndarray
    step: np.ndarray
    num_steps: int
    accepted: Optional[np.ndarray] = None
    eos_at: Optional[np.ndarray] = None


@dataclasses.dataclass(frozen=True)
class _Static:
    kind: str  # fixed | dynamic
    commit: int  # dynamic: blanks committed per step (0 = threshold mode)
    use_cache: bool
    reference: bool
    widths: tuple = ()  # dynamic: query rows of each phase, descending
    window: int = 0  # dynamic: candidates are the first `window` remaining blanks (0 = all)


def _as_2d(name, x, dtype):
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise DecodeError(f"{name} must be [batch, length] (or [length]), got shape {a.shape}")
    return a.astype(dtype)


def _prepare(cfg: ModelConfig, tokens, known, valid, order, group_size, threshold, prompt_group_size,
             seed, num_samples=1):
    """Host-side checks and layout. num_samples > 1 repeats every row that many times (rows
    r*n .. r*n+n-1 are the samples of row r); seed is then one int per output row."""
    tokens = _as_2d("tokens", tokens, np.int64)
    known = np.asarray(known)
    if known.ndim == 1:
        known = known[None]
    if known.shape != tokens.shape:
        raise DecodeError(f"known has shape {known.shape} but tokens has shape {tokens.shape}; they must match")
    if known.dtype != bool:
        if not np.isin(known, (0, 1)).all():
            raise DecodeError("known must be boolean (True = keep the token, False = fill it)")
        known = known.astype(bool)
    b, t = tokens.shape
    if valid is None:
        valid = np.ones((b, t), bool)
    else:
        valid = np.asarray(valid, bool)
        if valid.ndim == 1:
            valid = valid[None]
        if valid.shape != tokens.shape:
            raise DecodeError(f"valid has shape {valid.shape} but tokens has shape {tokens.shape}")
    if t > cfg.max_position_embeddings:
        raise DecodeError(f"sequence length {t} exceeds the model's max_position_embeddings="
                          f"{cfg.max_position_embeddings}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        bad = int(tokens.max()) if tokens.max() >= cfg.vocab_size else int(tokens.min())
        raise DecodeError(f"token id {bad} is outside [0, vocab_size={cfg.vocab_size})")
    known = known & valid
    blank = valid & ~known
    for r in range(b):
        if not blank[r].any():
            raise DecodeError(f"row {r} has no blanks: known is True at every valid position, nothing to fill")
        if not known[r].any():
            raise DecodeError(f"row {r} has no known token: every position is blank; give at least one "
                              f"context token (e.g. BOS) to condition on")
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise DecodeError(f"group_size must be a positive int, got {group_size!r}")
    kind, name, user = orders_lib.resolve_order(order)
    if num_samples > 1:
        tokens, known, valid, blank = (np.repeat(a, num_samples, axis=0) for a in (tokens, known, valid, blank))
        if user is not None and user.ndim == 2 and user.shape[0] == b and b > 1:
            user = np.repeat(user, num_samples, axis=0)
        b = b * num_samples
    if threshold is not None:
        if kind != "dynamic":
            raise DecodeError(f"threshold applies to the dynamic orders {orders_lib.DYNAMIC_ORDERS}, "
                              f"not to {name!r}")
        if not 0.0 < float(threshold) <= 1.0:
            raise DecodeError(f"threshold must be a probability in (0, 1], got {threshold}")
    if prompt_group_size is not None and int(prompt_group_size) < 1:
        raise DecodeError(f"prompt_group_size must be a positive int or None, got {prompt_group_size}")
    kgroups = rows_lib.prompt_groups(known, prompt_group_size)
    known_pos = orders_lib.compact(known)
    known_groups = np.take_along_axis(kgroups, np.maximum(known_pos, 0), axis=1)
    # query shapes depend on the blank count rounded up to a multiple of 16 (fewer distinct compiles)
    nq = -(-int(blank.sum(axis=1).max()) // 16) * 16
    if kind == "dynamic":
        queries = np.zeros((b, 1, 1), np.int32)  # unused: a dynamic step picks its query rows itself
        num_steps = None
    else:
        steps = orders_lib.fixed_steps(kind, name, user, blank, group_size, seed)
        # steps padded to the blank count: every fixed order of one input shares one compiled loop
        queries = orders_lib.schedule(steps, min_steps=nq)
        num_steps = int(steps.max()) + 1
    return dict(tokens=tokens.astype(np.int32), known=known, valid=valid, blank=blank,
                kgroups=kgroups.astype(np.int32), known_pos=known_pos,
                known_groups=known_groups.astype(np.int32), queries=queries, num_steps=num_steps, nq=nq,
                kind="dynamic" if kind == "dynamic" else "fixed", criterion=name)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode(cfg: ModelConfig, st: _Static, params, tokens, known, valid, kgroups, known_pos, known_groups,
            queries, keys, opts):
    """keys [B, 2]: each row's base key (sampling.base_keys). opts (all traced): criterion index,
    max_steps, temperature, top_k, top_p, threshold, teacher_forcing, stop_at_eos, eos_id.

    Fixed orders: one loop over the schedule `queries` [B, S, K]. Dynamic orders: one loop per phase
    of st.widths; a step of a phase of width w runs the query rows of the first w remaining blanks of
    each row (orders.first_remaining), and the phase ends when every row's remaining blanks (or its
    window, st.window) fit in the next, narrower phase. Every blank still remaining is a query row
    until the window (if any) excludes it, so the tokens do not depend on the widths."""
    b, t = tokens.shape
    g0 = t  # group id of step 0; later than every known group (< t)
    big = jnp.int32(2 ** 30)
    rows = jnp.arange(b)[:, None]
    blank = valid & ~known
    cached = st.use_cache and not st.reference

    def pending_width(w):
        if st.kind == "fixed":
            return queries.shape[2]
        return st.commit if st.commit > 0 else w

    w0 = st.widths[0] if st.kind == "dynamic" else 0
    state = dict(
        s=jnp.int32(0),
        tokens=tokens,
        filled=known,
        group=jnp.where(known, kgroups, big),
        logp=jnp.zeros((b, t), jnp.float32),
        step=jnp.full((b, t), -1, jnp.int32),
        done=jnp.zeros((b,), bool),
        pending=jnp.full((b, pending_width(w0)), -1, jnp.int32),
    )
    if cached:
        state["cache"] = cache_lib.prefill(cfg, params, tokens, known_pos, known_groups)

    def remaining(state):
        return blank & ~state["filled"] & ~state["done"][:, None]

    def make_body(width):
        def body(state):
            s = state["s"]
            k_sample, k_order = jnp.moveaxis(jax.vmap(jax.random.split)(sampling.step_keys(keys, s)), 1, 0)
            toks, filled = state["tokens"], state["filled"]
            if st.kind == "dynamic":
                q_pos = orders_lib.first_remaining(remaining(state), width)
                q_ok = q_pos >= 0
                if st.window:  # only the first `window` remaining blanks are candidates
                    q_ok &= jnp.arange(width)[None] < st.window
            else:
                q_pos = jax.lax.dynamic_index_in_dim(queries, s, axis=1, keepdims=False)  # [B, K]
                q_ok = (q_pos >= 0) & ~state["done"][:, None]
                q_ok &= ~jnp.take_along_axis(filled, jnp.maximum(q_pos, 0), axis=1)
            new = dict(state)
            if cached:
                logits, new["cache"] = cache_lib.cached_step_logits(
                    cfg, params, state["cache"], toks, state["pending"], g0 + s - 1, q_pos, q_ok, g0 + s)
            else:
                groups = jnp.where(filled, 0, 1) if st.reference else jnp.where(filled, state["group"], big)
                logits = cache_lib.full_step_logits(cfg, params, toks, groups, valid.astype(jnp.int32), q_pos)

            # the distribution tokens are drawn from (greedy: the model's own) gives the scores too
            dist = sampling.sampling_logits(logits, opts["temperature"], opts["top_k"], opts["top_p"])
            forced = jnp.take_along_axis(toks, jnp.maximum(q_pos, 0), axis=1)
            drawn = jax.lax.cond(opts["teacher_forcing"], lambda: forced, lambda: sampling.draw_at(
                sampling.position_keys(k_sample, q_pos), dist, opts["temperature"]))
            lp = sampling.token_logprobs(logits, drawn)
            if st.kind == "dynamic":
                probs = jax.nn.softmax(dist, axis=-1)
                u = jax.vmap(jax.vmap(lambda k: jax.random.uniform(k)))(sampling.position_keys(k_order, q_pos))
                scores = orders_lib.scores_by_index(opts["criterion"], probs, u)
                if st.commit > 0:
                    idx, ok = orders_lib.select_top_k(scores, q_ok, st.commit)
                    c_pos = jnp.take_along_axis(q_pos, idx, axis=1)
                    c_tok = jnp.take_along_axis(drawn, idx, axis=1)
                    c_lp = jnp.take_along_axis(lp, idx, axis=1)
                else:
                    ok = orders_lib.select_threshold(scores, probs.max(-1), q_ok, opts["threshold"])
                    c_pos, c_tok, c_lp = q_pos, drawn, lp
            else:
                ok, c_pos, c_tok, c_lp = q_ok, q_pos, drawn, lp
            c_pos = jnp.where(ok, c_pos, -1)
            slot = jnp.where(ok, c_pos, t)  # out of range -> dropped
            new["tokens"] = toks.at[rows, slot].set(c_tok, mode="drop")
            new["filled"] = filled.at[rows, slot].set(True, mode="drop")
            new["group"] = state["group"].at[rows, slot].set(g0 + s, mode="drop")
            new["logp"] = state["logp"].at[rows, slot].set(c_lp, mode="drop")
            new["step"] = state["step"].at[rows, slot].set(s, mode="drop")
            new["pending"] = c_pos
            fin = orders_lib.eos_finished(new["tokens"], new["filled"], blank, opts["eos_id"])
            new["done"] = state["done"] | (opts["stop_at_eos"] & fin)
            new["s"] = s + 1
            return new
        return body

    def going(state):
        return (state["s"] < opts["max_steps"]) & remaining(state).any()

    if st.kind == "fixed":
        state = jax.lax.while_loop(going, make_body(0), state)
    else:
        for i, width in enumerate(st.widths):
            nxt = st.widths[i + 1] if i + 1 < len(st.widths) else None
            if i > 0 and st.commit == 0:
                # threshold commits: the pending rows are as wide as the phase, so the last step's
                # commits enter the cache before the narrower phase starts
                pend = state["pending"]
                if cached:
                    state["cache"] = jax.lax.cond(
                        (pend >= 0).any(),
                        lambda c: cache_lib.commit_rows(cfg, params, c, state["tokens"], pend, g0 + state["s"] - 1),
                        lambda c: c, state["cache"])
                state["pending"] = jnp.full((b, width), -1, jnp.int32)

            def cond(state, nxt=nxt):
                go = going(state)
                if nxt is not None:  # hand over once every row's remaining blanks fit the next phase
                    go &= remaining(state).sum(axis=1).max() > nxt
                return go

            state = jax.lax.while_loop(cond, make_body(width), state)
    return state["tokens"], state["logp"], state["step"], state["s"]


def _run_mdlm(cfg, params, tokens, known, valid, order, group_size, temperature, top_k, top_p, seed, mode,
              threshold, prompt_group_size, teacher_forcing, steps, max_steps):
    """Iterative unmasking (a3jax.decode.mdlm) of an mdlm model; the A3-only options are refused."""
    if not isinstance(order, str) or orders_lib.ALIASES.get(order, order) not in mdlm.MDLM_ORDERS:
        raise DecodeError(f"an mdlm model unmasks in order {mdlm.MDLM_ORDERS}, got {order!r}")
    for name, val, off in (("mode", mode, "a3"), ("threshold", threshold, None),
                           ("prompt_group_size", prompt_group_size, None), ("teacher_forcing", teacher_forcing, False)):
        if val != off:
            raise DecodeError(f"{name}={val!r} applies to A3 decoding, not to an mdlm model (model.objective=mdlm)")
    order = orders_lib.ALIASES.get(order, order)
    p = _prepare(cfg, tokens, known, valid, "random" if order == "random" else "confidence", group_size, None,
                 None, seed)
    n = int(p["blank"].sum(axis=1).max())
    if steps is None:
        steps = -(-n // int(group_size))  # the model calls of A3 committing group_size blanks per step
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise DecodeError(f"steps must be a positive int, got {steps!r}")
    total = int(steps) if max_steps is None else min(int(steps), int(max_steps))  # benchmarks: a prefix
    toks, lp, step = mdlm.sample(cfg, params, p["tokens"], p["known"], p["valid"], int(steps), order,
                                 temperature, top_k, top_p, seed, stop=total)
    return DecodeResult(toks, lp, step, total), p


def _check_sampling(temperature, top_k, top_p) -> None:
    if temperature is None or float(temperature) < 0:
        raise DecodeError(f"temperature must be >= 0, got {temperature}")
    if int(top_k) < 0:
        raise DecodeError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < float(top_p) <= 1.0:
        raise DecodeError(f"top_p must be in (0, 1], got {top_p}")


DEFAULT_PHASES = 8


def _mode(mode) -> str:
    if mode == "official":
        warnings.warn("mode='official' is now mode='reference' (the reference code's dynamic resampling); "
                      "'official' will be removed", FutureWarning, stacklevel=4)
        return "reference"
    if mode not in MODES:
        raise DecodeError(f"mode must be one of {MODES} (or the alias 'official'), got {mode!r}")
    return mode


def _row_seeds(seed, b: int, num_samples: int, independent_rows: bool):
    """(seeds [b * n], sample index [b * n] or None) for sampling.base_keys: the one place that
    decides every row's randomness."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise DecodeError(f"num_samples must be a positive int, got {num_samples!r}")
    arr = np.asarray(seed)
    if arr.dtype.kind not in "iu" or arr.ndim > 1 or isinstance(seed, bool):
        raise DecodeError(f"seed must be an int or an int array [batch] (one per row), got {seed!r}")
    if arr.ndim == 1:
        if len(arr) != b:
            raise DecodeError(f"seed has {len(arr)} entries but the batch has {b} rows; give one seed per row")
        if independent_rows:
            raise DecodeError("independent_rows gives row r the key of sample r of one seed; with one seed per "
                              "row the rows are already independent: pass one of the two")
        seeds = arr.astype(np.int64)
    else:
        seeds = np.full(b, int(arr), np.int64)
    if num_samples > 1:
        if independent_rows:
            raise DecodeError("num_samples already draws each sample of a prompt with its own key; "
                              "independent_rows does not apply")
        return np.repeat(seeds, num_samples), np.tile(np.arange(num_samples), b)
    return seeds, (np.arange(b) if independent_rows else None)


def _check_window(window, kind, name, threshold, group_size):
    if window is None:
        return 0
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise DecodeError(f"window must be a positive int (blanks a dynamic order may choose from), got {window!r}")
    if kind != "dynamic":
        raise DecodeError(f"window applies to the dynamic orders {orders_lib.DYNAMIC_ORDERS}, not to {name!r} "
                          f"(a fixed order already says which blanks come next)")
    if threshold is None and group_size > window:
        raise DecodeError(f"group_size={group_size} commits more blanks per step than window={window} offers")
    return int(window)


def _run(cfg, params, tokens, known, *, valid=None, order="left_to_right", group_size=4, temperature=0.0,
         top_k=0, top_p=1.0, seed=0, use_cache=True, mode="a3", threshold=None, prompt_group_size=None,
         teacher_forcing=False, stop_at_eos=False, eos_id=None, max_steps=None, steps=None, speculative=0,
         independent_rows=False, window=None, phases=None, num_samples=1):
    objectives.require(cfg, "infilling (a3jax.decode.infill)", can_infill=True)
    per_row = np.ndim(seed) > 0
    if objectives.of(cfg).decoder == "mdlm":
        if speculative or independent_rows or window is not None or per_row or num_samples != 1:
            raise DecodeError("speculative=, independent_rows=, window=, num_samples= and per-row seeds apply to "
                              "A3 decoding, not to an mdlm model (model.objective=mdlm)")
        if temperature is None or float(temperature) < 0:
            raise DecodeError(f"temperature must be >= 0, got {temperature}")
        return _run_mdlm(cfg, params, tokens, known, valid, order, group_size, temperature, top_k, top_p, seed,
                         mode, threshold, prompt_group_size, teacher_forcing, steps, max_steps)
    if steps is not None:
        raise DecodeError("steps= sets an mdlm model's denoiser calls; A3 decoding takes group_size / order")
    mode = _mode(mode)
    _check_sampling(temperature, top_k, top_p)
    spec = _check_speculative(speculative, order, mode, threshold, teacher_forcing)
    if phases is not None and (isinstance(phases, bool) or not isinstance(phases, (int, np.integer)) or phases < 1):
        raise DecodeError(f"phases must be a positive int (1 = one static shape), got {phases!r}")
    b = np.asarray(tokens).shape[0] if np.ndim(tokens) == 2 else 1
    seeds, sample_index = _row_seeds(seed, b, num_samples, independent_rows)
    try:  # speculative: the target is token-by-token in the order, so its groups are singletons
        kind = orders_lib.resolve_order(order)[0]
        if mode == "reference" and kind != "dynamic":
            raise DecodeError("mode='reference' reproduces the reference's generate_dynamic_resampling, which "
                              "chooses the blanks dynamically; give a dynamic order (" +
                              ", ".join(orders_lib.DYNAMIC_ORDERS) + "), or use mode='a3' for a fixed order or "
                              "grouping (it reproduces the reference's generate_two_stream)")
        p = _prepare(cfg, tokens, known, valid, order, 1 if spec else group_size, threshold, prompt_group_size,
                     seeds, num_samples)
        win = _check_window(window, p["kind"], p["criterion"], threshold, group_size)
    except OrderError as e:
        raise DecodeError(str(e)) from None
    keys = sampling.base_keys(seeds, sample_index)
    eos = cfg.eos_token_id if eos_id is None else int(eos_id)
    stop = bool(stop_at_eos) and eos >= 0
    if spec:
        res = _run_speculative(cfg, params, p, spec, use_cache, temperature, top_k, top_p, keys, stop, eos,
                               max_steps)
        return _ended(res, p, stop, eos, cfg), p
    widths = ()
    if p["kind"] == "dynamic":
        n = int(p["blank"].sum(axis=1).max())
        commit = 0 if threshold is not None else min(int(group_size), n)
        total = n if commit == 0 else -(-n // commit)
        top = min(win, p["nq"]) if win else p["nq"]
        widths = orders_lib.phase_widths(n, top, DEFAULT_PHASES if phases is None else int(phases), max(commit, 1))
    else:
        commit, total = 0, p["num_steps"]
    if max_steps is not None:  # benchmarks: run only the first max_steps steps
        total = min(total, int(max_steps))
    crit = orders_lib.DYNAMIC_ORDERS.index(p["criterion"]) if p["kind"] == "dynamic" else 0
    st = _Static(kind=p["kind"], commit=commit, use_cache=bool(use_cache), reference=(mode == "reference"),
                 widths=widths, window=win)
    opts = dict(criterion=jnp.int32(crit), max_steps=jnp.int32(total), temperature=jnp.float32(temperature),
                top_k=jnp.int32(top_k), top_p=jnp.float32(top_p),
                threshold=jnp.float32(threshold if threshold is not None else 1.0),
                teacher_forcing=jnp.bool_(teacher_forcing), stop_at_eos=jnp.bool_(stop), eos_id=jnp.int32(eos))
    toks, logp, step, n_steps = _decode(
        cfg, st, params, jnp.asarray(p["tokens"]), jnp.asarray(p["known"]), jnp.asarray(p["valid"]),
        jnp.asarray(p["kgroups"]), jnp.asarray(p["known_pos"]), jnp.asarray(p["known_groups"]),
        jnp.asarray(p["queries"]), keys, opts)
    res = DecodeResult(np.asarray(toks), np.asarray(logp), np.asarray(step), int(n_steps))
    return _ended(res, p, stop, eos, cfg), p


def _ended(res: DecodeResult, p, stop: bool, eos: int, cfg) -> DecodeResult:
    """With stop_at_eos: each row's blanks after its first committed EOS are padding (pad token,
    step -1, log-prob 0) and `eos_at` holds that EOS's position (-1 = none)."""
    if not stop:
        return res
    t = res.tokens.shape[1]
    pos = np.arange(t)[None]
    is_eos = p["blank"] & (res.step >= 0) & (res.tokens == eos)
    first = np.where(is_eos.any(axis=1), np.argmax(is_eos, axis=1), -1)
    after = p["blank"] & (first[:, None] >= 0) & (pos > first[:, None])
    pad = cfg.pad_token_id if cfg.pad_token_id >= 0 else 0
    return res._replace(tokens=np.where(after, pad, res.tokens).astype(res.tokens.dtype),
                        step=np.where(after, -1, res.step), logprobs=np.where(after, 0.0, res.logprobs),
                        eos_at=first)


def _check_speculative(speculative, order, mode, threshold, teacher_forcing) -> int:
    """The draft block size k (0 = off), or a DecodeError for options speculation cannot honour."""
    if speculative is None or speculative is False or speculative == 0:
        return 0
    if isinstance(speculative, bool) or not isinstance(speculative, (int, np.integer)) or speculative < 1:
        raise DecodeError(f"speculative must be a positive int (the draft block size k) or 0, got {speculative!r}")
    if isinstance(order, str) and orders_lib.ALIASES.get(order, order) in orders_lib.DYNAMIC_ORDERS:
        raise DecodeError(f"speculative decoding needs a fixed order (left_to_right, random or a user grouping), "
                          f"not the dynamic order {order!r}")
    if mode != "a3":
        raise DecodeError(f"speculative decoding runs in mode 'a3', not {mode!r}")
    if threshold is not None:
        raise DecodeError("threshold applies to dynamic orders, not to speculative decoding")
    if teacher_forcing:
        raise DecodeError("teacher_forcing commits given tokens; it has no speculative form")
    return int(speculative)


def _run_speculative(cfg, params, p, k, use_cache, temperature, top_k, top_p, keys, stop, eos, max_steps):
    n = int(p["blank"].sum(axis=1).max())
    order = speculative_lib.token_order(p["queries"], -(-n // 16) * 16)  # bucketed like the query shapes
    total = 2 * n + 1 if max_steps is None else min(2 * n + 1, int(max_steps))  # passes: at most 2 per token
    opts = dict(max_steps=jnp.int32(total), temperature=jnp.float32(temperature), top_k=jnp.int32(top_k),
                top_p=jnp.float32(top_p), stop_at_eos=jnp.bool_(stop), eos_id=jnp.int32(eos))
    toks, logp, step, passes, accepted = speculative_lib.run(
        cfg, k, bool(use_cache), params, jnp.asarray(p["tokens"]), jnp.asarray(p["known"]),
        jnp.asarray(p["valid"]), jnp.asarray(p["kgroups"]), jnp.asarray(p["known_pos"]),
        jnp.asarray(p["known_groups"]), jnp.asarray(order), keys, opts)
    return DecodeResult(np.asarray(toks), np.asarray(logp), np.asarray(step), int(passes), np.asarray(accepted))


def infill(cfg: ModelConfig, params, tokens, known, order="left_to_right", group_size: int = 4,
           temperature: float = 0.0, seed: int = 0, use_cache: bool = True, *, top_k: int = 0,
           top_p: float = 1.0, threshold: Optional[float] = None, prompt_group_size: Optional[int] = None,
           mode: str = "a3", valid=None, teacher_forcing: bool = False, return_info: bool = False,
           max_steps: Optional[int] = None, steps: Optional[int] = None, speculative: int = 0,
           independent_rows: bool = False, window: Optional[int] = None, phases: Optional[int] = None,
           num_samples: int = 1):
    """Fills the positions where `known` is False. Returns tokens [B, T] (np.int32), or a
    `DecodeResult` with per-position log-probs and commit steps when return_info=True.

    tokens [B, T] or [T]: the values at blank positions are ignored (unless teacher_forcing, which
        commits them instead of sampling: used to collect the model's conditional log-probs).
    known [B, T] bool: True = context, never changed. valid [B, T] bool (default all True): False marks
        padding, which is neither context nor filled.
    order: 'left_to_right' | 'random' | 'confidence' | 'entropy' | 'margin' | 'random_dynamic', or an
        int array [T] / [B, T] of group ids for the blanks (a user-given grouping).
    group_size: blanks per step for left_to_right / random / the dynamic orders.
    threshold: dynamic orders only; commit every blank with max prob >= threshold (at least one).
    prompt_group_size: None = all known tokens form one group; n = AR chunks of n known tokens.
    temperature 0 = greedy; top_k / top_p filter sampling; deterministic given seed.
    use_cache False recomputes the full forward each step.
    mode: 'a3' (default; with a user grouping as `order` it reproduces the reference's
        generate_two_stream) or 'reference' (dynamic orders only: the reference's
        generate_dynamic_resampling, every committed token in one group 0, the blanks in group 1,
        recomputed each step). 'official' is a deprecated alias of 'reference'.
    window=W (dynamic orders): semi-autoregressive decoding; each step chooses only among the first W
        remaining blanks in position order (and runs only their W query rows).
    phases: dynamic orders run in up to this many compiled phases whose query rows shrink with the
        remaining blanks (default 8; 1 = one static shape, cheaper to compile). Same tokens.
    speculative=k (fixed orders): self-speculative sampling with draft blocks of k, exactly the
        token-by-token distribution of the order (a user grouping is read as a token order: by
        value, ties by position); group_size is not used. `step` then counts model passes.
    seed: an int (every row draws with the key of that seed: a row's output does not depend on its
        batch) or an int array [B], one seed per row (row r equals that row decoded alone with seed[r]).
    num_samples=n: n independent samples of every row in one batch; returns B * n rows (rows
        r*n .. r*n+n-1 are row r's samples; sample i draws with fold_in(PRNGKey(seed of row r), i)).
    independent_rows: row r draws with the key of sample r of `seed` (fold_in(PRNGKey(seed), r)), so
        equal rows give independent samples.
    An mdlm model (cfg.objective) unmasks in `steps` denoiser calls (default ceil(blanks / group_size))
    in order random | confidence | entropy | margin | left_to_right (a3jax.decode.mdlm; no KV cache).
    """
    res, _ = _run(cfg, params, tokens, known, valid=valid, order=order, group_size=group_size,
                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, use_cache=use_cache,
                  mode=mode, threshold=threshold, prompt_group_size=prompt_group_size,
                  teacher_forcing=teacher_forcing, max_steps=max_steps, steps=steps, speculative=speculative,
                  independent_rows=independent_rows, window=window, phases=phases, num_samples=num_samples)
    return res if return_info else res.tokens


def _prompts(prompt_tokens) -> list:
    if isinstance(prompt_tokens, np.ndarray) or hasattr(prompt_tokens, "shape"):
        a = np.asarray(prompt_tokens)
        if a.ndim == 1:
            return [a.astype(np.int64)]
        if a.ndim != 2:
            raise DecodeError(f"prompt_tokens must be [batch, length] or a list of sequences, got shape {a.shape}")
        return [row.astype(np.int64) for row in a]
    seqs = list(prompt_tokens)
    if seqs and np.ndim(seqs[0]) == 0:  # one flat list of ids
        seqs = [seqs]
    return [np.asarray(s, np.int64).reshape(-1) for s in seqs]


def generate(cfg: ModelConfig, params, prompt_tokens, max_new_tokens: int, order="left_to_right",
             group_size: int = 1, temperature: float = 0.0, seed: int = 0, use_cache: bool = True, *,
             top_k: int = 0, top_p: float = 1.0, threshold: Optional[float] = None,
             prompt_group_size: Optional[int] = None, mode: str = "a3", prompt_lengths=None,
             stop_at_eos: bool = True, eos_token_id: Optional[int] = None, return_info: bool = False,
             buffer_length: Optional[int] = None, max_steps: Optional[int] = None, steps: Optional[int] = None,
             speculative: int = 0, independent_rows: bool = False, stream: str = "query",
             window: Optional[int] = None, phases: Optional[int] = None, num_samples: int = 1):
    """Continues each prompt by max_new_tokens positions. prompt_tokens: a list of id sequences
    (ragged is fine) or an array [B, P] (with prompt_lengths [B] when rows are right-padded).

    Returns new tokens [B, max_new_tokens] (np.int32): with stop_at_eos a row ends once an EOS is
    committed and every position before it is filled (any order, fixed or dynamic: never a hole
    before the EOS); the EOS is kept and the positions after it hold pad_token_id. eos_token_id overrides cfg's (any
    token can serve as the stop token, e.g. a newline). With return_info=True returns
    (new_tokens, DecodeResult over the whole [prompt + new] buffer). buffer_length pads that buffer
    to a fixed length (>= longest prompt + max_new_tokens), so calls with different prompt lengths
    share one compiled program. speculative=k, independent_rows, window, phases, per-row seeds and
    num_samples (B * n rows returned): as for `infill`.

    stream="content" decodes the content stream left to right with a KV cache (a3jax.decode.content):
    the converted base LLaMA as it was before adaptation; order, group_size, threshold, mode,
    prompt_group_size, speculative and independent_rows do not apply and must keep their defaults.
    An ar model (model.objective=ar) is its content stream: it always decodes this way. An mdlm model
    fills all max_new_tokens positions by iterative unmasking (`steps`, see infill)."""
    objectives.require(cfg, "generate")
    if stream not in STREAMS:
        raise DecodeError(f"stream must be one of {STREAMS}, got {stream!r}")
    decoder = objectives.of(cfg).decoder
    if decoder == "content":
        stream = "content"  # a causal LM has no trained query stream
    if stream == "content":
        if decoder == "mdlm":
            raise DecodeError("an mdlm model's content stream is a bidirectional denoiser, not a causal LM: "
                              "stream='content' does not apply (model.objective=mdlm)")
        if steps is not None:
            raise DecodeError("steps= sets an mdlm model's denoiser calls; left-to-right decoding takes none")
        _check_content_options(order, group_size, threshold, prompt_group_size, mode, speculative, independent_rows)
        if window is not None or np.ndim(seed) > 0 or num_samples != 1:
            raise DecodeError("stream='content' draws every row with one key; window=, num_samples= and per-row "
                              "seeds apply to the query stream (A3 decoding)")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    seqs = _prompts(prompt_tokens)
    if prompt_lengths is not None:
        lens = [int(x) for x in np.asarray(prompt_lengths).reshape(-1)]
        if len(lens) != len(seqs):
            raise DecodeError(f"prompt_lengths has {len(lens)} entries for {len(seqs)} prompts")
        seqs = [s[:n] for s, n in zip(seqs, lens)]
    if not seqs:
        raise DecodeError("no prompts given")
    lens = np.array([len(s) for s in seqs])
    if (lens == 0).any():
        raise DecodeError(f"prompt {int(np.argmin(lens))} is empty; start it with BOS "
                          f"(id {cfg.bos_token_id}) at least")
    eos = cfg.eos_token_id if eos_token_id is None else int(eos_token_id)
    stop = bool(stop_at_eos) and eos >= 0
    t = int(lens.max()) + int(max_new_tokens)
    if buffer_length is not None:
        if int(buffer_length) < t:
            raise DecodeError(f"buffer_length {buffer_length} is shorter than the longest prompt + max_new_tokens = {t}")
        t = int(buffer_length)
    if t > cfg.max_position_embeddings:
        raise DecodeError(f"prompt length {int(lens.max())} + max_new_tokens {max_new_tokens} = {t} exceeds "
                          f"max_position_embeddings={cfg.max_position_embeddings}")
    b = len(seqs)
    pad = cfg.pad_token_id if cfg.pad_token_id >= 0 else 0
    tokens = np.full((b, t), pad, np.int64)
    known = np.zeros((b, t), bool)
    idx = np.arange(t)[None]
    valid = idx < (lens[:, None] + max_new_tokens)
    for r, s in enumerate(seqs):  # host-side buffer assembly
        tokens[r, :len(s)] = s
        known[r, :len(s)] = True
    if stream == "content":
        return _generate_content(cfg, params, tokens, lens, max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed, use_cache=use_cache, stop=stop, eos=eos, pad=pad,
                                 max_steps=max_steps, return_info=return_info)
    res, _ = _run(cfg, params, tokens, known, valid=valid, order=order, group_size=group_size,
                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, use_cache=use_cache,
                  mode=mode, threshold=threshold, prompt_group_size=prompt_group_size,
                  stop_at_eos=stop, eos_id=eos, max_steps=max_steps, steps=steps, speculative=speculative,
                  independent_rows=independent_rows, window=window, phases=phases, num_samples=num_samples)
    lens = np.repeat(lens, num_samples)
    new_idx = lens[:, None] + np.arange(max_new_tokens)[None]
    new = np.take_along_axis(res.tokens, new_idx, axis=1).astype(np.int32)
    filled = np.take_along_axis(res.step, new_idx, axis=1) >= 0
    new = np.where(filled, new, pad)
    if stop:
        is_eos = new == eos
        after = np.cumsum(is_eos, axis=1) - is_eos > 0  # strictly after the first EOS
        new = np.where(after, pad, new).astype(np.int32)
    return (new, res) if return_info else new


def _check_content_options(order, group_size, threshold, prompt_group_size, mode, speculative, independent_rows):
    given = {"order": (order, "left_to_right"), "group_size": (group_size, 1), "threshold": (threshold, None),
             "prompt_group_size": (prompt_group_size, None), "mode": (mode, "a3"), "speculative": (speculative, 0),
             "independent_rows": (independent_rows, False)}
    bad = [f"{k}={v!r}" for k, (v, default) in given.items()
           if not (isinstance(v, str) or v is None or np.isscalar(v)) or v != default]
    if bad:
        raise DecodeError(f"stream='content' decodes left to right one token per step; {', '.join(bad)} does not "
                          f"apply (leave order, group_size, threshold, prompt_group_size, mode, speculative and "
                          f"independent_rows at their defaults)")


def _generate_content(cfg, params, tokens, lens, max_new_tokens, *, temperature, top_k, top_p, seed, use_cache,
                      stop, eos, pad, max_steps, return_info):
    _check_sampling(temperature, top_k, top_p)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        bad = int(tokens.max()) if tokens.max() >= cfg.vocab_size else int(tokens.min())
        raise DecodeError(f"token id {bad} is outside [0, vocab_size={cfg.vocab_size})")
    toks, logp, step, n = content_lib.decode_content(
        cfg, params, tokens, lens, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        use_cache=use_cache, stop_at_eos=stop, eos_id=eos, max_steps=max_steps)
    new_idx = lens[:, None] + np.arange(max_new_tokens)[None]
    new = np.take_along_axis(toks, new_idx, axis=1).astype(np.int32)
    new = np.where(np.take_along_axis(step, new_idx, axis=1) >= 0, new, pad).astype(np.int32)
    res = DecodeResult(toks.astype(np.int32), logp, step, n)
    return (new, res) if return_info else new
