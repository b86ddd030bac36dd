"""Masked diffusion (MDLM) on the content stream: the denoiser, the forward (masking) process and the
NELBO terms, shared by the trainer (train.objective=mdlm), the scorer and the MDLM sampler.

Absorbing-state diffusion with the linear schedule alpha_t = 1 - t: at time t each target token is
replaced by MASK independently with probability t. The denoiser is the content stream with every
position of a segment in one group (groups = 0: full bidirectional attention inside each packed
document, nothing across documents) and the MASK logit at -inf (SUBS parameterisation: MASK is never
predicted; unmasked tokens are copied, so they carry no loss). The continuous-time NELBO is

    NELBO(x) = E_{t ~ U(0,1)} E_{x_t} [ sum_{i masked in x_t} -log p(x_i | x_t) / t ]

which equals the expected negative log-likelihood of the any-order AR model the denoiser implies,
over uniformly random token orders (the "any-order identity"; tests/test_objectives.py enumerates it).
t is drawn in [T_MIN, 1] (as MDLM's sampling_eps), so the 1/t weight stays bounded.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from a3jax.model.transformer import apply_model

T_MIN = 1e-3  # smallest diffusion time drawn (1/t <= 1000)


def denoiser_logits(cfg, params, tokens, positions, segment_ids):
    """fp32 logits [B, T, V] of p(x_i | x_t): the content stream with groups = 0 and MASK at -inf."""
    groups = jnp.zeros_like(tokens)
    logits = apply_model(cfg, params, tokens, positions, groups, segment_ids, "content")
    return logits.at[..., cfg.mask_token_id].set(-jnp.inf)


def sample_times(key, batch: int, low_discrepancy: bool = True):
    """t [batch] in [T_MIN, 1]. Low-discrepancy (MDLM): one uniform offset u and t_i = (u + i/B) mod 1,
    so a batch covers the unit interval evenly (lower-variance gradient, same expectation)."""
    if low_discrepancy:
        u = (jax.random.uniform(key, ()) + jnp.arange(batch, dtype=jnp.float32) / batch) % 1.0
    else:
        u = jax.random.uniform(key, (batch,))
    return T_MIN + (1.0 - T_MIN) * u


def corrupt(key, tokens, maskable, t, mask_id: int):
    """(x_t [B, T], masked bool [B, T]): each maskable position becomes mask_id with probability t[b]."""
    masked = maskable & (jax.random.uniform(key, tokens.shape) < t[:, None])
    return jnp.where(masked, jnp.int32(mask_id), tokens), masked


def forward_process(key, tokens, maskable, mask_id: int, t=None, low_discrepancy: bool = False):
    """(x_t [B, T], weight [B, T] fp32): one draw of the masking (t per row unless given) and each
    position's NELBO weight, masked / t (0 where unmasked)."""
    k_t, k_m = jax.random.split(key)
    if t is None:
        t = sample_times(k_t, tokens.shape[0], low_discrepancy=low_discrepancy)
    xt, masked = corrupt(k_m, tokens, maskable, t, mask_id)
    return xt, masked.astype(jnp.float32) / t[:, None]


def nelbo_terms(logits, tokens, weight):
    """(-log p(x_i | x_t) * weight at the masked positions (weight > 0), 0 elsewhere [B, T] fp32;
    logsumexp of the logits [B, T]). Summed over a row: its NELBO term; over a batch: the loss."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return jnp.where(weight > 0, (lse - tgt) * weight, 0.0), lse


def nelbo_sample(cfg, params, key, tokens, positions, segment_ids, target, t=None):
    """One Monte-Carlo NELBO term per row: sum over masked targets of -log p / t, [B] fp32 (and the
    masked count [B]). `target` bool [B, T]: the positions that may be masked (the rest is context)."""
    xt, weight = forward_process(key, tokens, target, cfg.mask_token_id, t)
    terms, _ = nelbo_terms(denoiser_logits(cfg, params, xt, positions, segment_ids), tokens, weight)
    return terms.sum(-1), (weight > 0).sum(-1)
