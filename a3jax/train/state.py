"""Train state and optimizer.

`TrainState` is a plain pytree (flax.struct dataclass): params (fp32 master weights), opt_state (AdamW
moments, fp32), step (int32 scalar) and rng (uint32[2] raw key, so Orbax stores it as an ordinary
array). Everything that changes during training lives here and nowhere else, so a checkpoint of this
tree plus the data iterator state is the whole run.

Optimizer: global-norm clipping, then AdamW with a warmup + decay schedule. Which params get weight
decay is the param table's `decay` column (a3jax/model/params.py): the matrices (the projections, the
MLP, the embedding and the lm_head), not the RMSNorm scales or the learned `query_embed` vector.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from a3jax.config import ConfigError, OptimizerConfig
from a3jax.model import decay_mask


@flax.struct.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array  # int32 [], number of optimizer steps taken (skipped non-finite steps included)
    rng: jax.Array  # uint32 [2], raw PRNG key; per-step keys are fold_in(rng, step)


def make_schedule(opt: OptimizerConfig, total_steps: int):
    """Linear warmup from 0 to learning_rate over warmup_steps, then cosine / linear decay to
    learning_rate * end_learning_rate_fraction at total_steps (or constant)."""
    peak = opt.learning_rate
    end = peak * opt.end_learning_rate_fraction
    warm = max(0, int(opt.warmup_steps))
    decay = max(1, int(total_steps) - warm)
    if opt.schedule == "cosine":
        tail = optax.cosine_decay_schedule(peak, decay, alpha=opt.end_learning_rate_fraction)
    elif opt.schedule == "linear":
        tail = optax.linear_schedule(peak, end, decay)
    elif opt.schedule == "constant":
        tail = optax.constant_schedule(peak)
    else:
        raise ConfigError(f"train.optimizer.schedule: {opt.schedule!r} is not one of cosine, linear, constant")
    if warm == 0:
        return tail
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), tail], [warm])


def make_optimizer(opt: OptimizerConfig, total_steps: int):
    """(optax optimizer, schedule)."""
    schedule = make_schedule(opt, total_steps)
    parts = []
    if opt.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(opt.grad_clip))
    # decay_mask (from the param table) maps the param tree to True where AdamW decays.
    parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule


def init_state(params, optimizer, seed: int) -> TrainState:
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)  # fp32 master weights
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
                      rng=jax.random.PRNGKey(seed))


def state_shardings(optimizer, param_shardings, param_shapes, mesh) -> TrainState:
    """Shardings of a TrainState: params as given, optimizer moments like their params, scalars
    (counts, step, rng) replicated."""
    replicated = NamedSharding(mesh, P())
    params_abs = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), param_shapes,
                              is_leaf=lambda x: isinstance(x, tuple))
    opt_abs = jax.eval_shape(optimizer.init, params_abs)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, opt_abs, param_shardings,
                                   transform_non_params=lambda _: replicated)
    return TrainState(params=param_shardings, opt_state=opt_sh, step=replicated, rng=replicated)


def abstract_state(optimizer, param_shapes, shardings: TrainState) -> TrainState:
    """The TrainState as jax.ShapeDtypeStructs carrying `shardings` (restore targets)."""
    params_abs = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), param_shapes,
                              is_leaf=lambda x: isinstance(x, tuple))
    abs_state = jax.eval_shape(lambda p: init_state(p, optimizer, 0), params_abs)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings)


def create_state(params, optimizer, seed: int, shardings: TrainState) -> TrainState:
    """Builds the state on the mesh (params already placed or host arrays) with pinned shardings."""
    return jax.jit(lambda p: init_state(p, optimizer, seed), out_shardings=shardings)(params)
