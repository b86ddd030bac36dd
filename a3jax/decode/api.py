"""`infill` and `generate`: the decode functions (docs/decode.md). Each takes the model, the inputs, a
`DecodeSpec` and `SamplingParams` (a3jax.decode.spec) and picks one decoder:

    a3       the query stream, group by group with an exact KV cache: a fixed order
             (a3jax.decode.fixed), a dynamic order (a3jax.decode.dynamic) or self-speculative
             sampling (a3jax.decode.speculative)
    content  the content stream left to right, a plain causal LM (a3jax.decode.content)
    mdlm     iterative unmasking of a masked-diffusion model (a3jax.decode.mdlm)

The model's objective (model.objective, recorded in the checkpoint) decides the default
(`model_decoder`, the one place decode/ looks at it); DecodeSpec.stream='content' asks an A3 model for
its content stream. Everything after the host-side layout (a3jax.decode.layout) is one jitted function.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import numpy as np

from a3jax.config import ModelConfig
from a3jax.decode import dynamic, fixed, layout, mdlm, orders as orders_lib, sampling
from a3jax.decode import content as content_lib
from a3jax.decode import speculative as speculative_lib
from a3jax.decode.spec import DecodeError, DecodeResult, DecodeSpec, SamplingParams, check_for, check_tokens, pad_token, stop_token
from a3jax.decode.step import LoopOpts
from a3jax import objectives
from a3jax.objectives import ObjectiveError

DEFAULT_PHASES = 8
ADAPT = ("it has not been A3-adapted (model.objective=ar: a plain causal LM whose query stream was never "
         "trained), so {what} does not apply; it decodes and scores with its content stream, left to right. "
         "Adapt it first: `a3jax train CONFIG.yaml model.init_from=CKPT` with an A3 curriculum in data.stages "
         "(docs/train.md; configs/demo/adapt.yaml)")


def model_decoder(cfg: ModelConfig) -> str:
    """The decoder a model's objective runs by default: 'a3' | 'content' | 'mdlm'."""
    return objectives.of(cfg).decoder


def not_adapted(what: str) -> ObjectiveError:
    """The error for an A3-only operation on a model that has not been A3-adapted."""
    return ObjectiveError(ADAPT.format(what=what))


def resolve_decoder(cfg: ModelConfig, spec: DecodeSpec, sampling_params: SamplingParams, what: str) -> str:
    own = model_decoder(cfg)
    if spec.stream == "query" and own == "content":
        raise not_adapted(f"{what} with the query stream")
    if spec.stream == "content":
        if own == "mdlm":
            raise DecodeError("an mdlm model's content stream is a bidirectional denoiser, not a causal LM: "
                              "DecodeSpec.stream='content' does not apply (model.objective=mdlm)")
        own = "content"
    objectives.require(cfg, what)  # an objective that decodes with a MASK token must have one
    check_for(own, spec, sampling_params)
    return own


def _prompt_group_size(cfg: ModelConfig, spec: DecodeSpec) -> int:
    return cfg.prompt_group_size if spec.prompt_group_size is None else spec.prompt_group_size


def infill(cfg: ModelConfig, params, tokens, known, spec: Optional[DecodeSpec] = None,
           sampling_params: Optional[SamplingParams] = None, valid=None, fixed_shapes: bool = False) -> DecodeResult:
    """Fills the positions where `known` is False; returns a DecodeResult (tokens, per-position
    log-probs and commit steps).

    tokens [B, T] or [T]: the values at blank positions are ignored (unless spec.teacher_forcing).
    known [B, T] bool: True = context, never changed. valid [B, T] bool (default all True): False marks
    padding, which is neither context nor filled. spec.group_size defaults to 4 here; an A3 model only
    (the query stream: an ar model has none to infill with). fixed_shapes: the compiled shapes follow
    [B, T] and the spec only, not where or how many the blanks are (a3jax.decode.layout.prepare), so
    calls of one buffer shape share one compiled program; the tokens are the same either way."""
    spec = spec or DecodeSpec()
    sp = sampling_params or SamplingParams()
    decoder = resolve_decoder(cfg, spec, sp, "infilling")
    if decoder == "content":
        raise (not_adapted("infilling") if model_decoder(cfg) == "content" else
               DecodeError("the content stream decodes left to right after a prompt (generate); infilling "
                           "runs the query stream: leave DecodeSpec.stream unset"))
    return _run(cfg, params, tokens, known, valid, spec, sp, decoder, group_size=spec.group_size or 4,
                stop=bool(spec.stop_at_eos), fixed_shapes=fixed_shapes)


def generate(cfg: ModelConfig, params, prompts, max_new_tokens: int, spec: Optional[DecodeSpec] = None,
             sampling_params: Optional[SamplingParams] = None, prompt_lengths=None,
             buffer_length: Optional[int] = None) -> DecodeResult:
    """Continues each prompt by max_new_tokens positions; returns a DecodeResult over the whole
    [prompt + new] buffer whose `new` [B, max_new_tokens] holds the continuations.

    prompts: a list of id sequences (ragged is fine) or an array [B, P] (with prompt_lengths [B] when
    rows are right-padded). With spec.stop_at_eos (the default here) a row ends once an EOS is
    committed and every position before it is filled (never a hole before the EOS); the EOS is kept
    and the positions after it hold pad_token_id. buffer_length pads the buffer to a fixed length (>=
    longest prompt + max_new_tokens), so calls with different prompt lengths share one compiled
    program. spec.group_size defaults to 1 here. num_samples=n returns B * n rows."""
    spec = spec or DecodeSpec()
    sp = sampling_params or SamplingParams()
    decoder = resolve_decoder(cfg, spec, sp, "generation")
    buf = layout.prompt_buffer(cfg, prompts, max_new_tokens, prompt_lengths, buffer_length)
    eos = stop_token(cfg, spec)
    stop = (spec.stop_at_eos is not False) and eos >= 0
    if decoder == "content":
        check_tokens(cfg, buf.tokens)
        # a fixed buffer also fixes the prefill width, so prompt lengths in one bucket share a program
        width = int(buf.lens.max()) if buffer_length is None else buf.tokens.shape[1]
        toks, logp, step, n = content_lib.decode_content(
            cfg, params, buf.tokens, buf.lens, max_new_tokens, dataclasses.replace(spec, stop_at_eos=stop), sp, eos,
            width)
        res = DecodeResult(toks.astype(np.int32), logp, step, n)
        lens = buf.lens
    else:
        res = _run(cfg, params, buf.tokens, buf.known, buf.valid, spec, sp, decoder,
                   group_size=spec.group_size or 1, stop=stop, eos=eos, fixed_shapes=buffer_length is not None)
        lens = np.repeat(buf.lens, sp.num_samples)
    return res._replace(new=layout.continuation(res, lens, max_new_tokens, buf.pad, stop, eos))


def _run(cfg, params, tokens, known, valid, spec: DecodeSpec, sp: SamplingParams, decoder: str, *,
         group_size: int, stop: bool, eos: Optional[int] = None, fixed_shapes: bool = False) -> DecodeResult:
    if decoder == "mdlm":
        return _run_mdlm(cfg, params, tokens, known, valid, spec, sp, group_size)
    b = np.asarray(tokens).shape[0] if np.ndim(tokens) == 2 else 1
    seeds, sample_index = layout.row_seeds(sp.seed, b, sp.num_samples, sp.independent_rows)
    # speculative: the target is token-by-token in the order, so its groups are singletons
    p = layout.prepare(cfg, tokens, known, valid, spec.order, 1 if spec.speculative else group_size,
                       _prompt_group_size(cfg, spec), seeds, sp.num_samples, fixed_shapes)
    keys = sampling.base_keys(seeds, sample_index)
    eos = stop_token(cfg, spec) if eos is None else eos
    stop = stop and eos >= 0
    arrays = [jnp.asarray(a) for a in (p.tokens, p.known, p.valid, p.kgroups, p.known_pos, p.known_groups)]
    n = int(p.blank.sum(axis=1).max())
    if spec.speculative:
        order = speculative_lib.token_order(p.queries, p.nq)  # bucketed like the query shapes
        total = 2 * n + 1 if spec.max_steps is None else min(2 * n + 1, spec.max_steps)  # passes: <= 2 per token
        opts = speculative_lib.SpecOpts(jnp.int32(total), jnp.float32(sp.temperature), jnp.int32(sp.top_k),
                                        jnp.float32(sp.top_p), jnp.bool_(stop), jnp.int32(eos))
        out = speculative_lib.run(cfg, spec.speculative, bool(spec.use_cache), params, *arrays,
                                  jnp.asarray(order), keys, opts)
        res = DecodeResult(np.asarray(out.tokens), np.asarray(out.logp), np.asarray(out.step), int(out.s),
                           np.asarray(out.accepted))
    else:
        if p.kind == "dynamic":
            # fixed shapes: a step's width does not follow the blank count (the tokens do not change)
            commit = 0 if spec.threshold is not None else min(group_size, p.nq if fixed_shapes else n)
            total = n if commit == 0 else -(-n // commit)
            top = min(spec.window, p.nq) if spec.window else p.nq
            phases = DEFAULT_PHASES if spec.phases is None else spec.phases
            widths = orders_lib.phase_widths(n, top, phases, max(commit, 1))
        else:
            total = p.num_steps
        if spec.max_steps is not None:  # benchmarks: run only the first max_steps steps
            total = min(total, spec.max_steps)
        crit = orders_lib.DYNAMIC_ORDERS.index(p.criterion) if p.kind == "dynamic" else 0
        opts = LoopOpts(criterion=jnp.int32(crit), max_steps=jnp.int32(total),
                        temperature=jnp.float32(sp.temperature), top_k=jnp.int32(sp.top_k),
                        top_p=jnp.float32(sp.top_p),
                        threshold=jnp.float32(spec.threshold if spec.threshold is not None else 1.0),
                        teacher_forcing=jnp.bool_(spec.teacher_forcing), stop_at_eos=jnp.bool_(stop),
                        eos_id=jnp.int32(eos))
        if p.kind == "dynamic":
            plan = dynamic.Plan(commit=commit, use_cache=bool(spec.use_cache), reference=spec.mode == "reference",
                                widths=widths, window=spec.window or 0)
            out = dynamic.run(cfg, plan, params, *arrays, keys, opts)
        else:
            out = fixed.run(cfg, bool(spec.use_cache), params, *arrays, jnp.asarray(p.queries), keys, opts)
        res = DecodeResult(np.asarray(out.tokens), np.asarray(out.logp), np.asarray(out.step), int(out.s))
    if not stop:
        return res
    return layout.end_at_eos(res, p.blank, eos, pad_token(cfg))


def _run_mdlm(cfg, params, tokens, known, valid, spec: DecodeSpec, sp: SamplingParams, group_size: int):
    """Iterative unmasking (a3jax.decode.mdlm) in spec.steps denoiser calls (default: as many model
    calls as A3 committing group_size blanks per step)."""
    order = orders_lib.ALIASES.get(spec.order, spec.order)
    p = layout.prepare(cfg, tokens, known, valid, "random" if order == "random" else "confidence", group_size,
                       0, sp.seed)
    n = int(p.blank.sum(axis=1).max())
    steps = spec.steps if spec.steps is not None else -(-n // group_size)
    total = steps if spec.max_steps is None else min(steps, spec.max_steps)  # benchmarks: a prefix
    toks, lp, step = mdlm.sample(cfg, params, p.tokens, p.known, p.valid, steps, order, sp.temperature,
                                 sp.top_k, sp.top_p, sp.seed, stop=total)
    return DecodeResult(toks, lp, step, total)
