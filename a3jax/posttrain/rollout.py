"""Rollouts: G completions per prompt sampled by the decoder (a3jax.decode.api.generate, one fixed
buffer length so every rollout batch reuses one compiled loop), laid out as rows with the grouping the
sampler REALISED, so that one two-stream pass scores each completion exactly (a3jax.posttrain.policy).

Realised grouping of a row: the prompt keeps the decoder's prompt layout (a3jax.data.rows.prompt_groups:
one group, or left-to-right chunks of prompt_group_size); the token committed at decode step s gets
group T + s (a3jax.decode.step does the same), so tokens committed together form one group.
Self-speculative decoding samples exactly the token-by-token distribution of its order, so its
realised grouping is that order, one token per group; only left_to_right is accepted with it (the
order is then the positions). Positions after a stopping EOS are padding.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import numpy as np

from a3jax.data import rows as rows_lib
from a3jax.decode import api
from a3jax.decode.spec import DecodeSpec, SamplingParams


class RolloutError(ValueError):
    """A decoding setting GRPO cannot score exactly, or prompts that do not fit."""


class Rollout(NamedTuple):
    """Rows [N, T] (N = prompts * G; rows r*G .. r*G+G-1 are prompt r's samples): tokens, positions,
    groups (the realised grouping), segment_ids (1 = prompt or completion, 0 = padding), target (bool:
    the completion tokens); decoder_logprobs [N, T] (the decoder's own, temperature 1, unfiltered);
    completions: N lists of the new ids up to and including a stopping EOS; steps: decode steps run."""
    tokens: np.ndarray
    positions: np.ndarray
    groups: np.ndarray
    segment_ids: np.ndarray
    target: np.ndarray
    decoder_logprobs: np.ndarray
    completions: list
    steps: int

    def batch(self) -> dict:
        """The arrays the policy's log-prob function reads (int32 / bool)."""
        return dict(tokens=self.tokens.astype(np.int32), positions=self.positions.astype(np.int32),
                    groups=self.groups.astype(np.int32), segment_ids=self.segment_ids.astype(np.int32),
                    target=self.target.astype(bool))


def realised_groups(known: np.ndarray, step: np.ndarray, prompt_group_size: int, speculative: bool) -> np.ndarray:
    """Group ids [N, T] of decoded rows: prompt groups for known positions, T + step for committed ones
    (speculative: T + position, the token-by-token left-to-right order)."""
    t = known.shape[1]
    kg = rows_lib.prompt_groups(known, prompt_group_size or None)
    done = t + (np.broadcast_to(np.arange(t), known.shape) if speculative else step)
    return np.where(known, kg, np.where(step >= 0, done, 0)).astype(np.int32)


def check_spec(spec: DecodeSpec) -> None:
    if spec.speculative and spec.order != "left_to_right":
        raise RolloutError(f"speculative rollouts are scored with their order as the grouping; GRPO accepts "
                           f"speculative={spec.speculative} with order 'left_to_right' only, got {spec.order!r}")
    if spec.teacher_forcing:
        raise RolloutError("teacher_forcing commits given tokens: it samples nothing to reinforce")


def generate_group(cfg, params, prompts: list, group: int, max_new_tokens: int, spec: DecodeSpec,
                   temperature: float, top_k: int, top_p: float, seed: int, buffer_length: int,
                   stop_at_eos: bool = True) -> Rollout:
    """`group` samples of each prompt (lists of ids, BOS first) in one decode call per sample index
    where the decoder cannot draw several samples at once (mdlm), else one call with num_samples."""
    check_spec(spec)
    spec = dataclasses.replace(spec, stop_at_eos=stop_at_eos)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > buffer_length:
        raise RolloutError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the rollout "
                           f"buffer of {buffer_length} positions (rl.buffer_length)")
    per_call = api.model_decoder(cfg) == "a3"
    if per_call:
        sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=int(seed), num_samples=group)
        res = api.generate(cfg, params, prompts, max_new_tokens, spec, sp, buffer_length=buffer_length)
        tokens, lp, step, new, steps = res.tokens, res.logprobs, res.step, res.new, res.num_steps
    else:  # one call per sample index, each with its own seed; rows reordered prompt-major
        outs = [api.generate(cfg, params, prompts, max_new_tokens, spec,
                             SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=int(seed) + g),
                             buffer_length=buffer_length) for g in range(group)]
        order = lambda x: np.stack(x, 1).reshape((-1,) + x[0].shape[1:])  # noqa: E731
        tokens, lp, step, new = (order([getattr(o, f) for o in outs]) for f in ("tokens", "logprobs", "step", "new"))
        steps = max(o.num_steps for o in outs)
    lens = np.repeat([len(p) for p in prompts], group)
    t = tokens.shape[1]
    known = np.arange(t)[None] < lens[:, None]
    psize = cfg.prompt_group_size if spec.prompt_group_size is None else spec.prompt_group_size
    groups = realised_groups(known, step, psize, bool(spec.speculative))
    target = (step >= 0) & ~known
    # a decoder that fills past an EOS (mdlm): the completion ends at its first EOS
    is_eos = target & (tokens == cfg.eos_token_id) if stop_at_eos else np.zeros_like(target)
    target &= ~((np.cumsum(is_eos, axis=1) - is_eos) > 0)
    seg = (known | target).astype(np.int32)
    comps = [[int(x) for x in new[r][:int(target[r].sum())]] for r in range(len(new))]
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape)
    return Rollout(np.where(seg > 0, tokens, max(cfg.pad_token_id, 0)), positions, groups, seg, target, lp, comps,
                   int(steps))


def default_buffer(longest_prompt: int, max_new_tokens: int, limit: Optional[int] = None) -> int:
    """A buffer holding every prompt + max_new_tokens, rounded up to a multiple of 16."""
    n = -(-(longest_prompt + max_new_tokens) // 16) * 16
    return min(n, limit) if limit else n
