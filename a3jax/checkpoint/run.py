"""Run checkpoints: Orbax CheckpointManager under RUN_DIR/checkpoints/<step>/ with items

    state     TrainState (params, opt_state, step, rng)         ocp.args.StandardSave / StandardRestore
    data      the Grain iterator state (one file per process)   grain.checkpoint.CheckpointSave / Restore
    config    the run's Config as JSON                          ocp.args.JsonSave / JsonRestore
    progress  trainer bookkeeping as JSON: the metrics window since the last log line (so the logged
              averages of a resumed run equal the uninterrupted run's), process_count, tokens seen

<step> is the number of optimizer steps taken: checkpoint 100 holds the state after 100 updates and
the iterator positioned at batch 100. Saves are async (`checkpoint.async_save`); Orbax writes into a
temporary directory and renames it when complete, so a kill during a save leaves no step directory
(only a tmp directory that is ignored and cleaned up) and the previous checkpoint stays the latest.

Restore (`restore_latest`): newest step first; the state is restored into `jax.ShapeDtypeStruct`
targets that carry the CURRENT mesh's shardings, so a run resumes on a different mesh shape with the
arrays resharded. A checkpoint that fails to restore (corrupt or partial files) is reported, the
previous one is tried, and once a good one is found the bad newer ones are moved to
RUN_DIR/checkpoints_bad/<step> (never deleted) so that later saves cannot collide with them. If none
restores, nothing is moved and the error is raised. A step that already exists is never overwritten.
"""
from __future__ import annotations

import json
import time

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from a3jax import fs
from a3jax.config import ConfigError

# Model fields that change the shapes or the meaning of params; everything else (dtype, remat,
# attention kernel, ...) may differ between the saved run and the resumed one.
ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "tie_word_embeddings", "block")


class _FrozenState:
    """An iterator state captured at save time, in the shape grain's checkpoint handler expects."""

    def __init__(self, state):
        # DatasetIterator states are dicts (grain writes them as JSON); DataLoader states are bytes.
        self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

    def get_state(self) -> bytes:
        return self._state


class _KeepLatestGood:
    """Orbax preservation policy: the newest `n` checkpoints that are not set aside as bad, and every
    bad one (kept for inspection on gs://; Orbax must not garbage-collect them)."""

    def __init__(self, n, bad: set):
        self.n, self.bad = n, bad

    def should_preserve(self, checkpoints, *, context=None):
        good = [c.step for c in checkpoints if c.step not in self.bad]
        keep = set(good if self.n is None else good[max(0, len(good) - self.n):])
        return [c.step in self.bad or c.step in keep for c in checkpoints]


class RunCheckpoints:
    """Thin wrapper over ocp.CheckpointManager with the trainer's items and fault handling."""

    def __init__(self, run_dir: str, ckpt_cfg, log=print):
        self.run_dir = fs.normalize(run_dir)
        self.directory = fs.join(self.run_dir, "checkpoints")
        self.bad_directory = fs.join(self.run_dir, "checkpoints_bad")
        self.bad_ledger = fs.join(self.run_dir, "checkpoints_bad.json")
        self.in_place = fs.is_gcs(self.run_dir)  # gs://: bad checkpoints stay where they are
        self.log = log
        fs.makedirs(self.run_dir)  # for gs://: credentials and bucket checked before tensorstore runs
        self.bad = self._read_ledger()
        keep = ckpt_cfg.max_to_keep if ckpt_cfg.max_to_keep > 0 else None
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_KeepLatestGood(keep, self.bad),
            enable_async_checkpointing=bool(ckpt_cfg.async_save),
            cleanup_tmp_directories=True,
            create=True,
        )
        self.mngr = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "config", "progress"))

    # ------------------------------------------------------------------ queries
    def steps(self) -> list[int]:
        """The restorable candidates: committed steps, less those set aside as bad."""
        return sorted(int(s) for s in self.mngr.all_steps() if int(s) not in self.bad)

    def _read_ledger(self) -> set:
        if not (self.in_place and fs.exists(self.bad_ledger)):
            return set()
        return {int(k) for k in json.loads(fs.read_text(self.bad_ledger)).get("steps", {})}

    def latest_step(self):
        s = self.steps()
        return s[-1] if s else None

    # ------------------------------------------------------------------ save
    def save(self, step: int, state, data_iter, config_dict: dict, progress: dict) -> bool:
        """Starts an (async) save of `step`; returns False (and saves nothing) if `step` exists."""
        if step in self.bad:
            self.log(f"not saving step {step}: {self.directory}/{step} holds a corrupt checkpoint kept for "
                     f"inspection (see {self.bad_ledger}); the next checkpoint is saved as usual")
            return False
        if step in self.steps():
            return False
        # Snapshot the mutable parts now: the save may finish in a background thread while the loop
        # already advances the iterator and the metrics window.
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_FrozenState(data_iter.get_state())),
            config=ocp.args.JsonSave(json.loads(json.dumps(config_dict))),
            progress=ocp.args.JsonSave(json.loads(json.dumps(progress))),
        )
        return bool(self.mngr.save(int(step), args=args, force=True))

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()

    # ------------------------------------------------------------------ restore
    def restore_state(self, step: int, state_target):
        """The TrainState of checkpoint `step` alone (no data iterator, no bookkeeping), restored into
        `state_target` (e.g. train.state.abstract_state(...): its shardings say where the arrays go)."""
        out = self.mngr.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(state_target)))
        return out["state"]

    def restore_latest(self, state_target, make_iterator, process_count: int, check_config=None):
        """Newest restorable checkpoint -> (step, state, iterator, progress) or None when there is none.

        make_iterator(start_step) builds a fresh iterator; the saved iterator state is restored into
        it when the process count matches, otherwise the iterator starts at the saved step (the
        pipeline's global batch j is the same whatever the process count).
        check_config(saved_config_dict, step) may raise ConfigError (incompatible run): that is not
        corruption, so it propagates and nothing is moved.
        """
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                progress = self.mngr.restore(step, args=ocp.args.Composite(
                    config=ocp.args.JsonRestore(), progress=ocp.args.JsonRestore()))
                saved_cfg, progress = progress["config"], progress["progress"]
            except Exception as e:  # noqa: BLE001 - any read failure means this checkpoint is bad
                failures.append((step, e))
                self.log(f"checkpoint {step}: cannot read its config/progress ({type(e).__name__}: {e}); "
                         f"trying the previous one")
                continue
            if check_config is not None:
                check_config(saved_cfg, step)
            same_procs = int(progress.get("process_count", 1)) == int(process_count)
            try:
                if same_procs:
                    it = make_iterator(0)
                    out = self.mngr.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(state_target), data=grain.checkpoint.CheckpointRestore(it)))
                else:
                    out = self.mngr.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(state_target)))
                    it = make_iterator(step)
                    self.log(f"checkpoint {step} was written by {progress.get('process_count')} processes, "
                             f"now {process_count}: the data iterator restarts at batch {step}")
                state = out["state"]
                jax.block_until_ready(state)
            except Exception as e:  # noqa: BLE001
                failures.append((step, e))
                self.log(f"checkpoint {step} is corrupt or incomplete ({type(e).__name__}: {str(e)[:500]}); "
                         f"trying the previous one")
                continue
            if failures:
                self._quarantine(failures)
            return step, state, it, progress
        if failures:
            msg = "; ".join(f"step {s}: {type(e).__name__}: {str(e)[:200]}" for s, e in failures)
            raise RuntimeError(f"no checkpoint under {self.directory} could be restored ({msg}). "
                               f"Move the directory away to start from scratch.")
        return None

    def _quarantine(self, failures) -> None:
        """Sets unreadable steps aside (process 0 writes, all wait): moved locally, listed on gs://."""
        if self.in_place:
            self.bad.update(s for s, _ in failures)
        if jax.process_index() == 0 and self.in_place:
            ledger = json.loads(fs.read_text(self.bad_ledger)) if fs.exists(self.bad_ledger) else {"steps": {}}
            for s, e in failures:
                ledger["steps"][str(s)] = {"error": f"{type(e).__name__}: {str(e)[:1000]}", "time": time.time(),
                                           "path": f"{self.directory}/{s}"}
                self.log(f"kept unreadable checkpoint {s} in place at {self.directory}/{s} for inspection "
                         f"(listed in {self.bad_ledger}; never restored or deleted)")
            fs.write_text(self.bad_ledger, json.dumps(ledger, indent=1))
        elif jax.process_index() == 0:
            fs.makedirs(self.bad_directory)
            for s, _ in failures:
                src = fs.join(self.directory, str(s))
                if fs.exists(src):
                    dst = fs.join(self.bad_directory, f"{s}-{int(time.time())}")
                    fs.move_local(src, dst)
                    self.log(f"moved unreadable checkpoint {s} to {dst}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("a3jax_checkpoint_quarantine")
        self.mngr.reload()


def check_compatible(saved: dict, cfg, step: int, where: str) -> None:
    """Raises ConfigError when the saved run's model architecture or train.objective differs from cfg's."""
    saved_model = saved.get("model", {})
    diffs = [f"model.{k}: checkpoint {saved_model.get(k)!r} vs config {getattr(cfg.model, k)!r}"
             for k in ARCH_FIELDS if k in saved_model and saved_model[k] != getattr(cfg.model, k)]
    # The objective changes what the params mean (checkpoints before train.objective existed are a3).
    saved_obj = saved.get("train", {}).get("objective", "a3")
    if saved_obj != cfg.train.objective:
        diffs.append(f"train.objective: checkpoint {saved_obj!r} vs config {cfg.train.objective!r}")
    if diffs:
        raise ConfigError(f"{where}/{step} was written by a run with a different model or objective ("
                          + "; ".join(diffs) + "). Use a new run_dir, or model.init_from for new runs.")


# ----------------------------------------------------------------------------- reading a run's params


def is_run_dir(path: str) -> bool:
    """A training run's directory: it has RUN_DIR/checkpoints/ (a3jax train writes it)."""
    return fs.isdir(fs.join(fs.normalize(path), "checkpoints"))


def run_steps(run_dir: str) -> list[int]:
    """The run's complete checkpoints (a save cut short has no committed step), less those set aside
    as bad. Reads only: nothing in the run is created, cleaned up or deleted."""
    d = fs.normalize(run_dir)
    ledger = fs.join(d, "checkpoints_bad.json")
    bad = {int(k) for k in json.loads(fs.read_text(ledger)).get("steps", {})} if fs.exists(ledger) else set()
    return sorted(int(s) for s in ocp.utils.checkpoint_steps(fs.join(d, "checkpoints")) if int(s) not in bad)


def resolve_step(run_dir: str, step=None) -> int:
    """`step` when the run has it complete, else (step None) its latest complete checkpoint."""
    steps = run_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"{run_dir}: a run directory without a complete checkpoint under "
                                f"{fs.join(run_dir, 'checkpoints')} (train it first, or wait for its first save)")
    if step is None:
        return steps[-1]
    if int(step) not in steps:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint at step {step} (complete: {steps})")
    return int(step)


def run_config_dict(run_dir: str, step: int) -> dict:
    """The Config (as a dict) that checkpoint `step` was written with."""
    item = fs.join(fs.normalize(run_dir), "checkpoints", str(int(step)), "config")
    return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item, args=ocp.args.JsonRestore()))


def restore_run_params(run_dir: str, step: int, targets):
    """The params of checkpoint `step` alone (no optimizer moments), restored into `targets`: a tree of
    jax.ShapeDtypeStruct (their shardings say where the arrays go; a dtype casts) or numpy arrays
    (host copies)."""
    def restore_arg(t):
        if isinstance(t, jax.ShapeDtypeStruct):
            return ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype)
        return ocp.RestoreArgs(restore_type=type(t), dtype=t.dtype)

    args = ocp.args.PyTreeRestore(item={"params": targets},
                                  restore_args={"params": jax.tree.map(restore_arg, targets)},
                                  partial_restore=True)
    item = fs.join(fs.normalize(run_dir), "checkpoints", str(int(step)), "state")
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(item, args=args)["params"]
