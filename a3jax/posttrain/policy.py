"""Per-token log-probs of sampled completions under a policy: the one function GRPO's ratio, KL and
gradient all read (docs/post-training.md).

Two estimators, chosen by the params' objective entry (its `scorer`, a3jax.objectives), never by name:

    exact     (scorer 'query', A3) log p(x_i | x_{G<k}) of every completion token under the grouping the
              sampler realised, from ONE two-stream forward pass (the query stream at i sees exactly the
              earlier groups); the sum over a completion is its exact log-probability.
    one_step  (scorer 'nelbo', mdlm) diffu-GRPO's mean-field estimate: the completion fully masked, each
              prompt token masked with probability `mask_prob`, one denoiser pass; log p(x_i | x_masked)
              at every completion position. An estimate, not the sampler's probability.

Both apply the sampling transform (temperature, top-k, top-p) so the log-probs are those of the
distribution actually sampled; at temperature 1 without filters they are the model's own.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from a3jax import objectives
from a3jax.decode import sampling
from a3jax.model import apply_model, diffusion


class PolicyError(ValueError):
    """Params whose objective has no GRPO log-prob estimator."""


class Sampled(NamedTuple):
    """temperature, top_k, top_p of the rollouts (jnp scalars: changing them never recompiles)."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


def sampled(temperature: float, top_k: int = 0, top_p: float = 1.0) -> Sampled:
    return Sampled(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


def _logp_entropy(logits, tokens, samp: Sampled):
    """(log p of tokens [B, T], entropy [B, T]) under the sampled distribution of logits [B, T, V]."""
    dist = sampling.sampling_logits(logits, samp.temperature, samp.top_k, samp.top_p)
    logp = jax.nn.log_softmax(dist, axis=-1)
    tok = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    p = jnp.exp(logp)
    ent = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
    return tok, ent


def exact_token_logprobs(cfg, params, batch, key, samp: Sampled, mask_prob: float):
    """The exact per-token log-probs (and entropies) of batch['tokens'] under batch['groups']."""
    del key, mask_prob  # exact: no randomness
    logits = apply_model(cfg, params, batch["tokens"], batch["positions"], batch["groups"], batch["segment_ids"],
                         "query")
    return _logp_entropy(logits, batch["tokens"], samp)


def one_step_token_logprobs(cfg, params, batch, key, samp: Sampled, mask_prob: float):
    """diffu-GRPO's one-step estimate: completion (target) all MASK, prompt tokens masked with
    probability mask_prob (drawn from key), one bidirectional denoiser pass."""
    tokens, target = batch["tokens"], batch["target"]
    prompt = (batch["segment_ids"] != 0) & ~target
    drop = prompt & (jax.random.uniform(key, tokens.shape) < mask_prob)
    xt = jnp.where(target | drop, jnp.int32(cfg.mask_token_id), tokens)
    logits = diffusion.denoiser_logits(cfg, params, xt, batch["positions"], batch["segment_ids"])
    return _logp_entropy(logits, tokens, samp)


@dataclasses.dataclass(frozen=True)
class Estimator:
    """name; exact: the log-probs are the sampler's own (no key); fn: (cfg, params, batch, key, sampled,
    mask_prob) -> (token log-probs [B, T], entropy [B, T])."""
    name: str
    exact: bool
    fn: Callable


ESTIMATORS = {"query": Estimator("exact", True, exact_token_logprobs),
              "nelbo": Estimator("one_step", False, one_step_token_logprobs)}


def estimator_for(cfg) -> Estimator:
    """The estimator of a ModelConfig's objective (its scorer)."""
    obj = objectives.of(cfg)
    if obj.scorer not in ESTIMATORS:
        raise PolicyError(f"GRPO needs an any-order model (train.objective a3: exact log-probs) or an mdlm model "
                          f"(the one-step estimate); these params were trained with objective {obj.name!r} "
                          f"(model.objective): adapt them first (docs/train.md)")
    return ESTIMATORS[obj.scorer]
