"""The jitted train step and eval step.

    step_fn = make_train_step(cfg, optimizer, schedule, state_shardings, batch_sharding, mesh)
    state, metrics = step_fn(state, batch)      # state donated; shardings pinned in and out

* The batch: a dict with the layout keys (a3jax.layout.LAYOUT_KEYS, each [B, T] int32, sharded by
  `batch_sharding`) or a `Layout`; the step turns it into a `Layout` once and the loss reads its
  fields by name.
* Gradient accumulation: the global batch [B, T] is split into `train.microbatches` microbatches
  inside the step and the gradients are summed with `lax.scan` (one compiled body, constant memory).
  Microbatch j takes rows j, j+k, j+2k, ... (reshape [B/k, k, T] then swap), so with the batch dim
  sharded over the data axes every device keeps its own rows: no communication for the split.
  The loss of every microbatch is normalised by the target count of the WHOLE batch, so k
  microbatches of b rows give the same gradient as one batch of k*b rows.
* Mixed precision: params and optimizer state stay fp32 (master weights); the model casts weights and
  activations to `model.dtype` (bf16) for compute; logits and the loss are fp32; grads come back fp32.
* Remat / scanned layers: `model.remat`, `model.scan_layers` (the model applies them).
* Non-finite loss or gradients: the update is never applied (params and optimizer state are kept,
  the step counter advances) and metrics["nonfinite"] is 1; the trainer then stops or skips per
  `train.skip_nonfinite`. The state in memory is therefore always a good one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from a3jax import objectives
from a3jax.layout import Layout


def _split_micro(x, k: int):
    """[B, ...] -> [k, B/k, ...] with microbatch j = rows j, j+k, ... (keeps rows on their device)."""
    b = x.shape[0]
    x = x.reshape((b // k, k) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)


def train_step(cfg, optimizer, schedule, state, batch):
    """Unjitted step (see make_train_step) of train.objective (its entry in a3jax.objectives)."""
    mcfg, tcfg = cfg.model, cfg.train
    obj = objectives.of(cfg)
    k = int(tcfg.microbatches)
    batch = Layout.from_batch(batch)
    denom = jnp.maximum(obj.target_count(batch), 1.0)
    # the input transform (mdlm: the masking) of the whole global batch, from the state's rng and the
    # step (resumable)
    noise = obj.draw_noise(jax.random.fold_in(state.rng, state.step), batch, mcfg.mask_token_id)

    def loss_fn(p, mb):
        lay, nz = mb
        sums = obj.sums(mcfg, p, lay, nz, tcfg.z_loss)
        return (sums["nll"] + sums["z"]) / denom, sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    if k == 1:
        (_, sums), grads = grad_fn(state.params, (batch, noise))
    else:
        micro = jax.tree.map(lambda v: _split_micro(v, k), (batch, noise))
        zeros_g = jax.tree.map(jnp.zeros_like, state.params)
        zeros_s = {n: jnp.zeros((), jnp.float32) for n in ("nll", "z", "correct", "tokens")}

        def body(carry, mb):
            g_acc, s_acc = carry
            (_, sums), g = grad_fn(state.params, mb)
            return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, sums)), None

        (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), micro)

    loss = sums["nll"] / denom
    z = sums["z"] / denom
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(z) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state),
                              step=state.step + 1)
    metrics = {
        "loss": loss,
        "z_loss": z,
        "accuracy": sums["correct"] / denom,
        "target_tokens": sums["tokens"],
        "grad_norm": grad_norm,
        "param_norm": optax.global_norm(new_state.params),
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
        "nonfinite": (~finite).astype(jnp.int32),
    }
    return new_state, metrics


def make_train_step(cfg, optimizer, schedule, shardings, batch_sharding, mesh):
    """jit(train_step) with state shardings pinned in and out, the state donated, metrics replicated.
    Every batch array gets `batch_sharding` (a pytree prefix: a layout dict or a Layout).
    Call it inside `a3jax.sharding.activate(mesh, rules)` (activation constraints use the rules)."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(lambda s, b: train_step(cfg, optimizer, schedule, s, b),
                   in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated),
                   donate_argnums=(0,))


def make_eval_step(cfg, param_shardings, batch_sharding, mesh):
    """jit: (params, batch) -> dict(nll, tokens, correct) sums (divide on the host) of train.objective:
    its loss with a fixed input transform (mdlm: the same masking at every evaluation)."""
    replicated = NamedSharding(mesh, P())
    obj = objectives.of(cfg)

    def fn(params, batch):
        lay = Layout.from_batch(batch)
        noise = obj.draw_noise(jax.random.PRNGKey(cfg.train.seed + 1), lay, cfg.model.mask_token_id)
        s = obj.sums(cfg.model, params, lay, noise, 0.0)
        return {"nll": s["nll"], "tokens": s["tokens"], "correct": s["correct"]}

    return jax.jit(fn, in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)
