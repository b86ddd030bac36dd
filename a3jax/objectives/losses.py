"""The losses the objectives (a3jax.objectives) are made of: cross-entropy of a stream's logits against its targets.

The batch is an a3jax.layout.Layout (fields by name). Targets are the positions with loss_mask == 1
and segment_ids != 0 (the pipeline already zeroes the mask on padding and on each segment's leading
BOS, which is conditioning, not a target). The loss is returned as a SUM plus a token count so
gradient accumulation can normalise by the token count of the whole global batch: k microbatches then
give exactly the gradient of one batch of k*b (up to float summation order), even when microbatches
hold different numbers of target tokens.

Optional z-loss (PaLM): z_loss * logsumexp(logits)^2 per target token, keeps the softmax normaliser
near 0 in bf16 training.

Which loss each objective uses (train.objective) is the objective table's business
(a3jax.objectives); this module holds the pieces: `loss_sums` of a stream, and the masked-diffusion
NELBO (`mdlm_noise` masks each target with probability t, one t per row, low-discrepancy over the
global batch; `mdlm_sums` is sum_masked CE / t, a3jax.model.diffusion). All normalise per target.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from a3jax.layout import Layout
from a3jax.model import apply_model, diffusion


def target_mask(layout: Layout) -> jax.Array:
    """float32 [B, T]: 1 where the token is a training target."""
    return ((layout.segment_ids != 0) & (layout.loss_mask != 0)).astype(jnp.float32)


def stream_targets(layout: Layout, stream: str = "query"):
    """(targets, mask float32) that a stream's logits are scored against. Query stream: the logits at
    i predict tokens[i] ([B, T]). Content stream (plain causal LM): the logits at i predict
    tokens[i+1] within the same segment ([B, T-1]; the last position predicts nothing)."""
    mask = target_mask(layout)
    if stream == "content":
        same = layout.segment_ids[:, 1:] == layout.segment_ids[:, :-1]
        return layout.tokens[:, 1:], mask[:, 1:] * same.astype(mask.dtype)
    return layout.tokens, mask


def target_count(layout: Layout, stream: str = "query") -> jax.Array:
    """Number of targets of a batch (the loss normaliser), matching loss_sums' targets."""
    return stream_targets(layout, stream)[1].sum()


def mdlm_noise(key, layout: Layout, mask_id: int) -> dict:
    """The forward process of one global batch: dict(tokens = x_t [B, T] int32, weight = masked / t
    [B, T] fp32). Only targets are maskable (BOS and padding stay). Drawn before the microbatch split
    with low-discrepancy times, so the times cover the whole batch evenly."""
    xt, weight = diffusion.forward_process(key, layout.tokens, target_mask(layout) > 0, mask_id, low_discrepancy=True)
    return {"tokens": xt, "weight": weight}


def mdlm_sums(cfg_model, params, layout: Layout, noise: dict, z_loss: float = 0.0):
    """NELBO sums of one (micro)batch: nll = sum over masked targets of CE / t; tokens = target count
    (so nll / tokens is the NELBO per token); correct = argmax hits at masked positions."""
    logits = diffusion.denoiser_logits(cfg_model, params, noise["tokens"], layout.positions, layout.segment_ids)
    terms, lse = diffusion.nelbo_terms(logits, layout.tokens, noise["weight"])
    masked = (noise["weight"] > 0).astype(jnp.float32)
    zl = (z_loss * jnp.square(lse) * masked).sum() if z_loss else jnp.zeros((), jnp.float32)
    correct = ((jnp.argmax(logits, axis=-1) == layout.tokens) * masked).sum()
    return {"nll": terms.sum(), "z": zl, "correct": correct, "tokens": target_mask(layout).sum()}


def cross_entropy_sums(logits, tokens, mask, z_loss: float = 0.0):
    """(sum of nll, sum of z-loss term, number of correct argmax predictions) over mask. logits fp32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    nll = (lse - tgt) * mask
    zl = (z_loss * jnp.square(lse) * mask) if z_loss else jnp.zeros_like(nll)
    correct = (jnp.argmax(logits, axis=-1) == tokens).astype(jnp.float32) * mask
    return nll.sum(), zl.sum(), correct.sum()


def loss_sums(cfg_model, params, layout: Layout, z_loss: float = 0.0, stream: str = "query"):
    """Forward + summed loss terms of one (micro)batch: dict(nll, z, correct, tokens).

    stream="query" is the A3 loss (logits at i predict tokens[i]). stream="content" is the plain
    causal LM baseline (the content stream with groups = positions is exactly LLaMA): logits at i
    predict tokens[i+1] within the same segment; it needs the AR layout (rows in position order)."""
    logits = apply_model(cfg_model, params, layout.tokens, layout.positions, layout.groups, layout.segment_ids,
                         stream=stream)
    targets, mask = stream_targets(layout, stream)
    if stream == "content":
        logits = logits[:, :-1]
    nll, zl, correct = cross_entropy_sums(logits, targets, mask, z_loss)
    return {"nll": nll, "z": zl, "correct": correct, "tokens": mask.sum()}
