"""Train state and optimizer.

`TrainState` is a plain pytree (flax.struct dataclass): params (fp32 master weights), opt_state (AdamW
moments, fp32), step (int32 scalar) and rng (uint32[2] raw key, so Orbax stores it as an ordinary
array). Everything that changes during training lives here and nowhere else, so a checkpoint of this
tree plus the data iterator state is the whole run.

Optimizer: global-norm clipping, then AdamW with a warmup + decay schedule. Which params get weight
decay is the param table's `decay` column (a3jax/model/params.py): the matrices (the projections, the
MLP, the embedding and the lm_head), not the RMSNorm scales, nor the learned `query_embed` vector
unless `decay_query_embed` (HF Trainer, hence the reference code, decays it). The schedule may restart
at every curriculum stage (`schedule_per_stage`), and the Adam moments too (`reset_moments_per_stage`):
the reference code runs one Trainer, so one fresh AdamW, per stage.
"""
from __future__ import annotations

from typing import Any, NamedTuple

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


def _one_schedule(opt: OptimizerConfig, total_steps: int):
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


def make_schedule(opt: OptimizerConfig, total_steps: int, stage_steps=()):
    """Linear warmup from 0 to learning_rate over warmup_steps, then cosine / linear decay to
    learning_rate * end_learning_rate_fraction at total_steps (or constant).

    With opt.schedule_per_stage the whole shape restarts at every curriculum stage boundary and runs
    over that stage's steps (`stage_steps`, the steps of data.stages in order), as the reference code
    does by running one HF Trainer (warmup, linear decay to 0) per stage."""
    if not opt.schedule_per_stage:
        return _one_schedule(opt, total_steps)
    steps = [int(n) for n in stage_steps]
    if not steps or min(steps) <= 0:
        raise ConfigError(f"train.optimizer.schedule_per_stage needs the curriculum's stage steps "
                          f"(positive), got {stage_steps!r}")
    boundaries = [sum(steps[:i + 1]) for i in range(len(steps) - 1)]
    return optax.join_schedules([_one_schedule(opt, n) for n in steps], boundaries)


def weight_decay_mask(opt: OptimizerConfig):
    """The AdamW mask: the param table's `decay` column, plus query_embed when opt.decay_query_embed."""
    if not opt.decay_query_embed:
        return decay_mask

    def mask(tree):
        return {**decay_mask(tree), "query_embed": True}

    return mask


class MomentResetState(NamedTuple):
    count: jax.Array  # int32 [], updates applied so far (the same count the schedule reads)
    inner: Any


def reset_moments_at(inner: optax.GradientTransformation, boundaries) -> optax.GradientTransformation:
    """`inner` whose Adam moments (mu, nu and their bias-correction count) start from zero again at the
    update counts in `boundaries`, as a fresh optimizer would; the rest of its state (the schedule's
    count) runs on."""
    bounds = jnp.asarray(sorted(int(b) for b in boundaries) or [-1], jnp.int32)
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731

    def init(params):
        return MomentResetState(jnp.zeros([], jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        reset = jnp.any(state.count == bounds)
        fresh = inner.init(params)

        def pick(old, new):
            return jax.tree.map(lambda a, b: jnp.where(reset, b, a), old, new) if is_adam(old) else old

        inner_state = jax.tree.map(pick, state.inner, fresh, is_leaf=is_adam)
        updates, new_inner = inner.update(updates, inner_state, params)
        return updates, MomentResetState(state.count + 1, new_inner)

    return optax.GradientTransformation(init, update)


def make_optimizer(opt: OptimizerConfig, total_steps: int, stage_steps=()):
    """(optax optimizer, schedule). `stage_steps` (the steps of data.stages) is needed with
    opt.schedule_per_stage or opt.reset_moments_per_stage."""
    schedule = make_schedule(opt, total_steps, stage_steps)
    parts = []
    if opt.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(opt.grad_clip))
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                        mask=weight_decay_mask(opt))
    if opt.reset_moments_per_stage:
        steps = [int(n) for n in stage_steps]
        if not steps:
            raise ConfigError("train.optimizer.reset_moments_per_stage needs the curriculum's stage steps")
        adamw = reset_moments_at(adamw, [sum(steps[:i + 1]) for i in range(len(steps) - 1)])
    parts.append(adamw)
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
