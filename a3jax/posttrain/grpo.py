"""GRPO: group-normalised advantages, the clipped importance ratio and a KL penalty to a frozen
reference, on per-token log-probs from a3jax.posttrain.policy (exact for A3 under the realised grouping).

    adv = group_advantages(rewards, G)                       # (r - mean_group) / (std_group + eps)
    loss, aux = grpo_loss(cfg, est, params, batch, adv, old_lp, ref_lp, key, sampled, hp)
    update = make_update(cfg, est, optimizer, hp, placement)  # jitted; state donated
    state, metrics = update(state, batch, adv, old_lp, ref_lp, key, sampled)

The objective (DeepSeekMath's GRPO, per-sequence token mean):

    J = 1/N sum_i 1/|o_i| sum_t [ min(r_it A_i, clip(r_it, 1-eps, 1+eps) A_i) - beta KL_it ]
    r_it = p(o_it | ...) / p_old(o_it | ...),  KL_it = exp(ref - lp) - (ref - lp) - 1 (k3, >= 0)

At r = 1 (old = current params), without clipping and beta = 0, grad J = 1/N sum_i A_i/|o_i| grad log P(o_i):
REINFORCE with the group baseline, on the exact log P of each completion.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from a3jax.posttrain.policy import Estimator, Sampled
from a3jax.sharding import batch_sharding


@dataclasses.dataclass(frozen=True)
class Hyper:
    """clip_eps: the ratio's clip range (0 = no clipping); kl_beta: weight of the KL to the reference;
    mask_prob: the one-step estimator's prompt masking probability."""
    clip_eps: float = 0.2
    kl_beta: float = 0.04
    mask_prob: float = 0.15


def group_advantages(rewards, group: int, scale: bool = True, eps: float = 1e-4) -> np.ndarray:
    """Per-sample advantage [N] of rewards [N] (rows r*G .. r*G+G-1 are one prompt's group): the reward
    minus its group's mean, divided by the group's standard deviation (+ eps) when scale."""
    r = np.asarray(rewards, np.float64).reshape(-1, group)
    a = r - r.mean(axis=1, keepdims=True)
    if scale:
        a = a / (r.std(axis=1, keepdims=True) + eps)
    return a.reshape(-1).astype(np.float32)


def grpo_loss(cfg, est: Estimator, params, batch, adv, old_lp, ref_lp, key, samp: Sampled, hp: Hyper):
    """(-J, aux dict: kl, clip_frac, entropy, ratio_mean) over the target (completion) tokens."""
    lp, ent = est.fn(cfg, params, batch, key, samp, hp.mask_prob)
    m = batch["target"].astype(jnp.float32)
    n_tok = jnp.maximum(m.sum(-1), 1.0)
    ratio = jnp.exp(lp - old_lp)
    a = adv[:, None]
    surr = ratio * a
    if hp.clip_eps > 0:
        clipped = jnp.clip(ratio, 1.0 - hp.clip_eps, 1.0 + hp.clip_eps) * a
        was_clipped = (clipped < surr).astype(jnp.float32)
        surr = jnp.minimum(surr, clipped)
    else:
        was_clipped = jnp.zeros_like(surr)
    d = ref_lp - lp
    kl = jnp.exp(d) - d - 1.0
    per_tok = surr - hp.kl_beta * kl if hp.kl_beta else surr
    per_seq = jnp.sum(per_tok * m, -1) / n_tok
    total = jnp.maximum(m.sum(), 1.0)
    aux = dict(kl=jnp.sum(kl * m) / total, clip_frac=jnp.sum(was_clipped * m) / total,
               entropy=jnp.sum(ent * m) / total, ratio_mean=jnp.sum(ratio * m) / total)
    return -jnp.mean(per_seq), aux


class Placement(NamedTuple):
    """Where the jitted functions put their arguments, like the trainer's step: the TrainState's
    shardings (a3jax.train.state.state_shardings: params by the model's logical axes, e.g. FSDP), the
    rows of a batch [N, T] and of per-row vectors [N] over the batch axes (data, fsdp), scalars and
    keys replicated. Call the functions inside `a3jax.sharding.activate(mesh, rules)`."""
    state: Any
    rows: NamedSharding
    vector: NamedSharding
    replicated: NamedSharding


def placement(mesh, rules, state_shardings) -> Placement:
    return Placement(state_shardings, batch_sharding(mesh, rules, 2), batch_sharding(mesh, rules, 1),
                     NamedSharding(mesh, P()))


def make_logprobs(cfg, est: Estimator, hp: Hyper, place: Optional[Placement] = None):
    """jit: (params, batch, key, sampled) -> per-token log-probs [N, T] (0 off the target): what the
    ratio's old log-probs and the reference's are computed with. place: pinned shardings (None: the
    default device)."""
    def fn(params, batch, key, samp):
        lp, _ = est.fn(cfg, params, batch, key, samp, hp.mask_prob)
        return jnp.where(batch["target"], lp, 0.0)

    if place is None:
        return jax.jit(fn)
    rep = place.replicated
    return jax.jit(fn, in_shardings=(place.state.params, place.rows, rep, rep), out_shardings=place.rows)


def make_update(cfg, est: Estimator, optimizer, hp: Hyper, place: Optional[Placement] = None):
    """jit: (TrainState, batch, adv, old_lp, ref_lp, key, sampled) -> (TrainState, metrics). A
    non-finite loss or gradient keeps params and optimizer state (metrics['nonfinite'] = 1). place:
    pinned shardings in and out (None: the default device)."""
    def update(state, batch, adv, old_lp, ref_lp, key, samp):
        (loss, aux), grads = jax.value_and_grad(
            lambda p: grpo_loss(cfg, est, p, batch, adv, old_lp, ref_lp, key, samp, hp), has_aux=True)(state.params)
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda x, y: jnp.where(finite, x, y), new, old)  # noqa: E731
        new_state = state.replace(params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state),
                                  step=state.step + 1)
        return new_state, dict(loss=loss, grad_norm=gnorm, nonfinite=(~finite).astype(jnp.int32), **aux)

    if place is None:
        return jax.jit(update, donate_argnums=(0,))
    rows, rep = place.rows, place.replicated
    return jax.jit(update, in_shardings=(place.state, rows, place.vector, rows, rows, rep, rep),
                   out_shardings=(place.state, rep), donate_argnums=(0,))
