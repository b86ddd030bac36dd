"""Params-only checkpoints (what `a3jax convert` and `a3jax export` write, `model.init_from` and
`--ckpt` read).

Layout of a params checkpoint directory CKPT:

    CKPT/params/        Orbax (StandardCheckpointHandler) pytree of the a3jax params
    CKPT/model.yaml     the a3jax ModelConfig (a3jax.config.save_yaml / load_model_config)
    CKPT/tokenizer.json ...  the model's tokenizer files (a3jax.checkpoint.tokenizer), when it has one

Wherever a params checkpoint is read, a training run's directory works too: `load_params(RUN_DIR)`
and `load_model_config(RUN_DIR)` read its latest complete checkpoint (the params alone, with the model
config it was saved with).

`load_params` restores straight onto a mesh: the targets are jax.ShapeDtypeStruct leaves carrying the
NamedShardings of a3jax.model.param_shardings, so every host reads only its own shards and no full
host copy is made. Run checkpoints (train state + data iterator) are a3jax.checkpoint.run.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from a3jax import config as config_lib
from a3jax import fs
from a3jax.checkpoint.run import is_run_dir, resolve_step, restore_run_params, run_config_dict
from a3jax.config import Config, ConfigError, ModelConfig
from a3jax.model import dtype_of, numpy_dtype, param_shapes, param_shardings
from a3jax.sharding import rules_of

PARAMS_ITEM = "params"
MODEL_YAML = "model.yaml"


class CheckpointError(ValueError):
    """A params checkpoint that cannot be read or written; the message names the path."""


def _abs(path: str) -> str:
    return fs.normalize(path)


def _is_shape(x) -> bool:
    return isinstance(x, tuple)


def is_params_checkpoint(ckpt_dir: str) -> bool:
    d = _abs(ckpt_dir)
    return fs.isdir(fs.join(d, PARAMS_ITEM)) and fs.isfile(fs.join(d, MODEL_YAML))


def _not_a_checkpoint(ckpt_dir: str) -> CheckpointError:
    d = _abs(ckpt_dir)
    if not fs.exists(d):
        return CheckpointError(f"{ckpt_dir}: not found")
    if not fs.isdir(d):
        return CheckpointError(f"{ckpt_dir}: a file, not a checkpoint directory")
    names = sorted(fs.basename(p) for p in fs.listdir(d))
    found = ", ".join(names[:12]) + (f", ... ({len(names)} entries)" if len(names) > 12 else "") if names else "nothing"
    return CheckpointError(
        f"{ckpt_dir}: neither a params checkpoint ({PARAMS_ITEM}/ + {MODEL_YAML}: `a3jax convert`, "
        f"`a3jax export`) nor a training run (checkpoints/: `a3jax train`); it holds {found}")


def _run_config(run_dir: str, step) -> tuple[ModelConfig, int]:
    try:
        step = resolve_step(run_dir, step)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from e
    where = fs.join(_abs(run_dir), "checkpoints", str(step), "config")
    try:
        return config_lib.build(Config, run_config_dict(run_dir, step), where).model, step
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


def load_model_config(ckpt_dir: str) -> ModelConfig:
    """The ModelConfig saved beside the params (CKPT/model.yaml), or the one a run directory's latest
    complete checkpoint was written with."""
    path = fs.join(_abs(ckpt_dir), MODEL_YAML)
    if not fs.isfile(path):
        if is_run_dir(ckpt_dir):
            return _run_config(ckpt_dir, None)[0]
        raise _not_a_checkpoint(ckpt_dir)
    try:
        return config_lib.parse_model_config(fs.read_text(path), path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


def _save_registry():
    """Orbax's default type handlers (public API: supported_types / get_type_handler), except that host
    numpy arrays are written without a defensive deep copy."""
    th = ocp.type_handlers
    return th.create_type_handler_registry(*[
        (t, th.NumpyHandler(deepcopy_host_arrays=False) if t is np.ndarray else th.get_type_handler(t))
        for t in th.supported_types()])


def save_params(ckpt_dir: str, cfg: ModelConfig, params, force: bool = False) -> str:
    """Writes params (numpy or jax arrays, sharded or not) with Orbax and the config YAML beside them.
    Every process must call it with the same (global) params. Returns the absolute checkpoint path."""
    d = _abs(ckpt_dir)
    want = param_shapes(cfg)
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    if jax.tree.structure(want, is_leaf=_is_shape) != jax.tree.structure(got, is_leaf=_is_shape) or want != got:
        raise CheckpointError(f"{d}: params do not match the config (expected shapes {want}, got {got})")
    item = fs.join(d, PARAMS_ITEM)
    if fs.exists(item) and not force:
        raise CheckpointError(f"{item}: already exists (pass force=True / --force to overwrite)")
    fs.makedirs(d)
    # Readable by StandardCheckpointHandler (what load_params uses), but written (1) without Orbax's
    # defensive deep copy of host numpy arrays (the save below is synchronous, so nothing can modify them
    # meanwhile) and (2) without zstd: compressing holds every encoded chunk in memory at once. Either one
    # adds most of a second copy of the weights to peak host memory (bench/convert.py); bf16 weights
    # hardly compress anyway.
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
        use_ocdbt=True, use_compression=False, type_handler_registry=_save_registry()))
    ckptr.save(item, args=ocp.args.PyTreeSave(params), force=force)
    if jax.process_index() == 0:
        fs.write_text(fs.join(d, MODEL_YAML), config_lib.yaml_text(cfg))
    return d


def param_targets(cfg: ModelConfig, mesh=None, rules=None, dtype: Optional[str] = None):
    """jax.ShapeDtypeStruct tree with the target shardings (mesh + logical rules, or one device)."""
    dt = dtype_of(dtype or cfg.param_dtype)
    shapes = param_shapes(cfg)
    if mesh is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dt, sharding=sharding), shapes, is_leaf=_is_shape)
    if rules is None:
        rules = rules_of(config_lib.MeshConfig())
    shardings = param_shardings(cfg, mesh, rules)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, dt, sharding=sh), shapes, shardings, is_leaf=_is_shape)


def _flat_shapes(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat_shapes(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = tuple(v if isinstance(v, tuple) else v.shape)
    return out


def check_against_config(ckptr, item: str, cfg: ModelConfig) -> None:
    """Compares the stored array shapes with the config's; every mismatch is named in one error."""
    try:
        meta = ckptr.metadata(item)
        meta = getattr(meta, "item_metadata", meta)
        meta = getattr(meta, "tree", meta)
        stored = _flat_shapes(dict(meta))
    except Exception as e:  # unreadable metadata: a truncated or foreign directory
        raise CheckpointError(f"{item}: cannot read the checkpoint metadata ({e})") from e
    want = _flat_shapes(param_shapes(cfg))
    problems = [f"missing {k} (expected shape {s})" for k, s in want.items() if k not in stored]
    problems += [f"{k}: shape {stored[k]} in the checkpoint, expected {s}" for k, s in want.items()
                 if k in stored and stored[k] != s]
    problems += [f"unexpected {k} with shape {s}" for k, s in stored.items() if k not in want]
    if problems:
        raise CheckpointError(f"{item}: does not match {MODEL_YAML}; {len(problems)} problem(s):\n  "
                              + "\n  ".join(problems))


def _host_targets(cfg: ModelConfig):
    dt = numpy_dtype(cfg.param_dtype)
    # np.zeros of a large array is lazily mapped: untouched targets cost no resident memory.
    return jax.tree.map(lambda s: np.zeros(s, dt), param_shapes(cfg), is_leaf=_is_shape)


def load_params(ckpt_dir: str, mesh=None, rules=None, dtype: Optional[str] = None, host: bool = False,
                step: Optional[int] = None):
    """(cfg, params) from a params checkpoint or a run directory, restored onto `mesh` with the logical
    `rules` (default: MeshConfig's) or onto one device when mesh is None; host=True gives numpy arrays
    instead (one host copy, e.g. for exporting). dtype casts while restoring (the returned cfg's
    param_dtype follows). step: a run directory's checkpoint to read (default: its latest complete one)."""
    d = _abs(ckpt_dir)
    if not is_params_checkpoint(d) and is_run_dir(d):
        return _load_run_params(d, mesh, rules, dtype, host, step)
    if step is not None:
        raise CheckpointError(f"{ckpt_dir}: step={step} applies to a run directory; this is a params checkpoint")
    cfg = load_model_config(d)
    item = fs.join(d, PARAMS_ITEM)
    if not fs.isdir(item):
        raise CheckpointError(f"{item}: not found ({ckpt_dir} has {MODEL_YAML} but no {PARAMS_ITEM}/: "
                              f"an incomplete params checkpoint)")
    if dtype is not None:
        cfg = dataclasses.replace(cfg, param_dtype=dtype)
    targets = param_targets(cfg, mesh, rules) if not host else _host_targets(cfg)
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    check_against_config(ckptr, item, cfg)
    try:
        params = ckptr.restore(item, args=ocp.args.StandardRestore(targets))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{item}: cannot restore params for the config in {MODEL_YAML} ({e})") from e
    return cfg, params


def _load_run_params(run_dir: str, mesh, rules, dtype, host: bool, step):
    cfg, step = _run_config(run_dir, step)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, param_dtype=dtype)
    # the run holds fp32 master weights; the targets' dtype (the model's param_dtype) casts on restore
    targets = param_targets(cfg, mesh, rules) if not host else _host_targets(cfg)
    try:
        params = restore_run_params(run_dir, step, targets)
    except (ValueError, KeyError, FileNotFoundError) as e:
        where = fs.join(run_dir, "checkpoints", str(step), "state")
        raise CheckpointError(f"{where}: cannot restore the params of the run's model config ({e})") from e
    return cfg, params
