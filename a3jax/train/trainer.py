"""The training loop: `train(cfg) -> dict` (also `a3jax train CONFIG.yaml key=value ...`).

    mesh (cfg.mesh) -> state: restore the latest good checkpoint of cfg.run_dir, else init (random or
    model.init_from) -> Grain iterator (curriculum stages come with every batch) -> jitted step ->
    metrics (console / TensorBoard / metrics.jsonl) -> periodic eval (held-out split, one loss per
    data.eval_strategies entry) -> checkpoints (every checkpoint.every steps, at the end, on SIGTERM /
    SIGINT).

Multi-process: every process runs this same function on its own data shard
(make_train_iterator(process_index, process_count)); files other than checkpoints are written by
process 0 only; Orbax writes checkpoints from every process.

Non-finite loss: the step never applies a non-finite update (see step.py). With train.skip_nonfinite
the run logs the skip and goes on; otherwise it stops with NonFiniteLossError naming the step and the
last good checkpoint, and saves nothing more.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from typing import Optional

import jax
import numpy as np

from a3jax.config import Config, ConfigError, save_yaml, to_dict
from a3jax.sharding import activate, batch_sharding, make_mesh, param_shardings, rules_of
from a3jax.train import metrics as metrics_lib
from a3jax.checkpoint import ARCH_FIELDS, RunCheckpoints, check_compatible
from a3jax.train.state import abstract_state, create_state, make_optimizer, state_shardings
from a3jax.train.step import BATCH_KEYS, make_eval_step, make_train_step


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/Inf and train.skip_nonfinite is off."""


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint and returns after the current step."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.getsignal(s)
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:  # second signal: give up immediately
            self.uninstall()
            raise KeyboardInterrupt
        self.signum = signum

    def uninstall(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def is_set(self) -> bool:
        if jax.process_count() > 1:  # a preemption notice may reach only some hosts: agree on it
            from jax.experimental import multihost_utils

            return bool(multihost_utils.process_allgather(np.int32(self.signum)).max())
        return bool(self.signum)


def _initial_params(cfg: Config, mesh, rules, log):
    """Random init into the shardings, or params from model.init_from (a3jax.checkpoint)."""
    from a3jax.model import param_shapes, query_embed_init
    from a3jax.sharding import init_params_sharded

    mcfg = cfg.model
    shardings = param_shardings(mcfg, mesh, rules)
    if not mcfg.init_from:
        return init_params_sharded(mcfg, jax.random.PRNGKey(cfg.train.seed), mesh, rules)
    from a3jax.checkpoint import load_params  # lazy: the weights module is only needed here

    loaded_cfg, params = load_params(mcfg.init_from, mesh, rules, dtype="float32")  # fp32 master weights
    want = param_shapes(mcfg)
    mismatch = [f"{k}: checkpoint {getattr(loaded_cfg, k)!r} vs config {getattr(mcfg, k)!r}"
                for k in ARCH_FIELDS + ("rope_theta", "rope_type", "rope_factor", "rms_norm_eps")
                if getattr(loaded_cfg, k) != getattr(mcfg, k)]
    if mismatch:
        raise ConfigError(f"model.init_from={mcfg.init_from}: its model.yaml differs from the run's model "
                          f"config ({'; '.join(mismatch)}); pick the matching model config")
    if loaded_cfg.query_init != mcfg.query_init:
        # A converted AR model got its query vector from the converter's query_init; the run asks for
        # another start (e.g. model.query_init=normal to reproduce the reference code).
        log(f"re-initialising query_embed per model.query_init={mcfg.query_init!r} "
            f"(the checkpoint used {loaded_cfg.query_init!r})")
        params = dict(params)
        qe = query_embed_init(mcfg, params["embed"], jax.random.PRNGKey(cfg.train.seed)).astype(params["embed"].dtype)
        params["query_embed"] = qe
    got = jax.tree.map(lambda a: tuple(a.shape), params)
    flat_w = dict(jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda x: isinstance(x, tuple))[0])
    flat_g = dict(jax.tree_util.tree_flatten_with_path(got, is_leaf=lambda x: isinstance(x, tuple))[0])
    if flat_w.keys() != flat_g.keys() or any(flat_w[k] != flat_g[k] for k in flat_w):
        diffs = [f"{jax.tree_util.keystr(k)}: checkpoint {flat_g.get(k)} vs model {flat_w.get(k)}"
                 for k in sorted(set(flat_w) | set(flat_g), key=str) if flat_w.get(k) != flat_g.get(k)]
        raise ConfigError(f"model.init_from={mcfg.init_from}: params do not match the model config: "
                          + "; ".join(diffs[:8]))
    return jax.device_put(params, shardings)


def _local_rows(batch: dict, pi: int, pc: int) -> dict:
    n = next(iter(batch.values())).shape[0] // pc
    return {k: v[pi * n:(pi + 1) * n] for k, v in batch.items()}


def mean_group_size(batch: dict) -> float:
    """Mean number of target-bearing tokens per group in this process's batch (1.0 under AR; about
    k under blocks:k / random:k): a live check that the curriculum stage is what the data delivers.
    Rows are sorted by (segment, group), so groups are runs of equal (segment, group) ids."""
    seg, grp = np.asarray(batch["segment_ids"]), np.asarray(batch["groups"])
    real = seg != 0
    new = np.ones_like(real)
    new[:, 1:] = (seg[:, 1:] != seg[:, :-1]) | (grp[:, 1:] != grp[:, :-1])
    n_groups = int((new & real).sum())
    return float(real.sum()) / max(n_groups, 1)


def train(cfg: Config, *, progress_bar: Optional[bool] = None, tensorboard: bool = True,
          stop_at_step: Optional[int] = None) -> dict:
    """Runs (or resumes) the training job described by `cfg`; returns the final metrics.

    stop_at_step: return (after saving a checkpoint) once this many steps are done, as a preemption
    would; for tests and for splitting a run into jobs. The returned dict has at least step, loss
    (mean over the last log window), stage, strategy, eval (dict strategy -> loss, when evaluated),
    interrupted (signal number or 0), resumed_from (step or None), run_dir.
    """
    cfg.validate("train config")
    main = jax.process_index() == 0
    run_dir = os.path.abspath(cfg.run_dir)
    if main:
        os.makedirs(run_dir, exist_ok=True)
        save_yaml(cfg, os.path.join(run_dir, "config.yaml"))

    def log(msg):
        if main:
            print(f"[a3jax train] {msg}", flush=True)

    # Handlers first: a preemption notice during startup (restore, compile) is honoured after the first step.
    stop = _StopFlag().install()
    try:
        return _train(cfg, stop, log, progress_bar, tensorboard, stop_at_step)
    finally:
        stop.uninstall()


def _train(cfg: Config, stop: _StopFlag, log, progress_bar, tensorboard, stop_at_step) -> dict:
    from a3jax.data import make_eval_batches, make_train_iterator, stage_for_step, to_global_batch
    from a3jax.model import param_shapes

    pi, pc = jax.process_index(), jax.process_count()
    main = pi == 0
    run_dir = os.path.abspath(cfg.run_dir)
    tcfg = cfg.train
    total = cfg.total_steps
    gbs = tcfg.global_batch_size
    seq = cfg.data.seq_len
    mesh = make_mesh(cfg.mesh)
    rules = rules_of(cfg.mesh)
    optimizer, schedule = make_optimizer(tcfg.optimizer, total)
    pshapes = param_shapes(cfg.model)
    psh = param_shardings(cfg.model, mesh, rules)
    ssh = state_shardings(optimizer, psh, pshapes, mesh)
    bsh = batch_sharding(mesh, rules)
    log(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].device_kind} devices, "
        f"{pc} process(es); {total} steps of {gbs} x {seq} tokens")

    ckpts = RunCheckpoints(run_dir, cfg.checkpoint, log=log)
    make_iter = lambda start: make_train_iterator(cfg.data, gbs, pi, pc, start_step=start)
    restored = ckpts.restore_latest(
        abstract_state(optimizer, pshapes, ssh), make_iter, pc,
        check_config=lambda saved, step: check_compatible(saved, cfg, step, ckpts.directory))
    if restored is not None:
        start, state, it, progress = restored
        log(f"resumed from checkpoint {start} ({ckpts.directory}/{start})")
    else:
        start, progress = 0, {}
        state = create_state(_initial_params(cfg, mesh, rules, log), optimizer, tcfg.seed, ssh)
        it = make_iter(0)
        log("initialised " + (f"from {cfg.model.init_from}" if cfg.model.init_from else "at random")
            + f": {sum(int(np.prod(s)) for s in jax.tree.leaves(pshapes, is_leaf=lambda x: isinstance(x, tuple))):,} params")
    last_good = start if restored is not None else None

    step_fn = make_train_step(cfg, optimizer, schedule, ssh, bsh, mesh)
    eval_fn = make_eval_step(cfg, psh, bsh, mesh)
    sink = metrics_lib.MetricsSink(run_dir, start, total, enabled=main, tensorboard=tensorboard,
                                   progress_bar=progress_bar)
    peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, tcfg.peak_flops_per_device)
    flops_tok = metrics_lib.train_flops_per_token(cfg.model, seq, "a3")
    n_dev = jax.device_count()
    config_dict = to_dict(cfg)

    # Eval batches are built once (deterministic), per process its rows of each global batch.
    eval_sets = None

    def run_eval(step: int) -> dict:
        nonlocal eval_sets
        if eval_sets is None:
            eval_sets = {}
            for strat in cfg.data.eval_strategies:
                try:
                    bs = make_eval_batches(cfg.data, gbs, strat, max(1, tcfg.eval_batches))
                except Exception as e:  # noqa: BLE001 - e.g. an empty held-out split
                    sink.message(f"[a3jax train] eval under {strat!r} disabled: {type(e).__name__}: {e}")
                    continue
                eval_sets[strat] = [to_global_batch({k: _local_rows(b, pi, pc)[k] for k in BATCH_KEYS}, mesh)
                                    for b in bs]
        out = {}
        for strat, batches in eval_sets.items():
            nll = tok = 0.0
            for b in batches:
                with activate(mesh, rules):
                    r = jax.device_get(eval_fn(state.params, b))
                nll += float(r["nll"])
                tok += float(r["tokens"])
            out[strat] = nll / max(tok, 1.0)
        if out:
            sink.write({"step": step, "kind": "eval", "loss": out})
            sink.console("eval @ %d: %s" % (step, "  ".join(f"{k} {v:.4f}" for k, v in out.items())))
        return out

    # Per-step records since the last log line (restored from the checkpoint so averages match).
    window = list(progress.get("window", []))
    tokens_seen = int(progress.get("tokens_seen", start * gbs * seq))
    skipped_total = int(progress.get("skipped_nonfinite", 0))

    def progress_dict():
        return {"window": window, "tokens_seen": tokens_seen, "process_count": pc,
                "skipped_nonfinite": skipped_total}

    def save(step: int) -> None:
        nonlocal last_good
        if ckpts.save(step, state, it, config_dict, progress_dict()):
            last_good = step
            sink.message(f"[a3jax train] checkpoint {step} -> {ckpts.directory}/{step}")

    last_record: dict = {}
    last_eval: dict = {}
    pending = None  # (step index, stage, strategy, device metrics) of the step in flight
    t_last = time.perf_counter()
    timed = []  # step times of the window, excluding the first step of this process (compile)
    first_step_of_process = True
    interrupted = 0

    def finish(p) -> None:
        """Fetches the metrics of step p (after its dispatch the next step is already queued)."""
        nonlocal t_last, tokens_seen, skipped_total, first_step_of_process
        s, stage, strategy, m, gsize = p
        m = jax.device_get(m)
        now = time.perf_counter()
        dt = now - t_last
        t_last = now
        if not first_step_of_process:
            timed.append(dt)
        first_step_of_process = False
        tokens_seen += gbs * seq
        if int(m["nonfinite"]):
            where = (f"last good checkpoint: {ckpts.directory}/{last_good}" if last_good is not None
                     else "no checkpoint saved yet")
            if not tcfg.skip_nonfinite:
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {s + 1} (loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])}, "
                    f"stage {stage} {strategy!r}); the update was not applied and nothing more is saved; "
                    f"{where}. Set train.skip_nonfinite=true to skip such steps.")
            skipped_total += 1
            sink.message(f"[a3jax train] step {s + 1}: non-finite loss {float(m['loss'])}, update skipped")
        window.append({"step": s + 1, "stage": stage, "loss": float(m["loss"]), "accuracy": float(m["accuracy"]),
                       "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]), "z_loss": float(m["z_loss"]),
                       "param_norm": float(m["param_norm"]), "nonfinite": int(m["nonfinite"]),
                       "group_size": gsize})
        sink.console("", advance=1)

    def write_log(step: int, stage: int, strategy: str) -> dict:
        nonlocal timed
        good = [w for w in window if not w["nonfinite"]] or window
        mean = lambda key, ws=good: float(np.mean([w[key] for w in ws])) if ws else float("nan")
        stage_loss = {}
        for st in sorted({w["stage"] for w in good}):
            stage_loss[str(st)] = mean("loss", [w for w in good if w["stage"] == st])
        step_time = float(np.mean(timed)) if timed else None
        tps = gbs * seq / step_time if step_time else None
        rec = {
            "step": step, "kind": "train", "stage": stage, "strategy": strategy,
            "loss": mean("loss"), "stage_loss": stage_loss, "accuracy": mean("accuracy"),
            "grad_norm": window[-1]["grad_norm"], "lr": window[-1]["lr"], "param_norm": window[-1]["param_norm"],
            "z_loss": mean("z_loss"), "group_size": mean("group_size", window), "skipped_nonfinite": skipped_total, "tokens_seen": tokens_seen,
            "step_time_s": step_time, "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / n_dev if tps else None,
            "mfu": (flops_tok * tps / (peak * n_dev)) if (tps and peak) else None,
        }
        sink.write(rec)
        line = (f"step {step}/{total} stage {stage} ({strategy}) loss {rec['loss']:.4f} "
                f"gnorm {rec['grad_norm']:.3f} lr {rec['lr']:.2e}")
        if tps:
            line += f" {tps:,.0f} tok/s {step_time * 1e3:.0f} ms/step"
        if rec["mfu"] is not None:
            line += f" mfu {100 * rec['mfu']:.1f}%"
        if sink.bar is not None:
            sink.console("", postfix=f"loss {rec['loss']:.3f} st {stage}")
        else:
            sink.console(line)
        window.clear()
        timed = []
        return rec

    end = total if stop_at_step is None else min(total, int(stop_at_step))
    if start >= total:
        log(f"nothing to do: the run is complete at step {start} of {total} (raise train.steps to continue)")
    # Testing/debugging knob: sleep after every step (the fault tests use it to kill -9 a run
    # reliably between two checkpoints). Not a config key: it must never change results.
    debug_sleep = float(os.environ.get("A3JAX_DEBUG_STEP_SLEEP", "0") or 0)
    step = start
    try:
        if start == 0 and tcfg.eval_every > 0 and tcfg.eval_at_start:
            last_eval = run_eval(0)
        prev_stage = stage_for_step(cfg.data.stages, start)[0] if start < total else None
        while step < end:
            batch = next(it)
            stage, strategy = stage_for_step(cfg.data.stages, step)
            if "stage" in batch and int(batch["stage"][0]) != stage:
                raise RuntimeError(f"data pipeline gave a stage-{int(batch['stage'][0])} batch at step {step}, "
                                   f"the curriculum says stage {stage}")
            if stage != prev_stage:
                sink.message(f"[a3jax train] step {step}: curriculum stage {stage} ({strategy})")
                prev_stage = stage
            gsize = mean_group_size(batch)
            gb = to_global_batch({k: batch[k] for k in BATCH_KEYS}, mesh)
            with activate(mesh, rules):
                state, m = step_fn(state, gb)
            if pending is not None:
                finish(pending)
            pending = (step, stage, strategy, m, gsize)
            step += 1
            log_now = step % max(1, tcfg.log_every) == 0 or step == total
            eval_now = tcfg.eval_every > 0 and (step % tcfg.eval_every == 0 or step == total)
            ckpt_now = cfg.checkpoint.every > 0 and step % cfg.checkpoint.every == 0
            stop_now = stop.is_set()
            if log_now or eval_now or ckpt_now or stop_now or step == end:
                finish(pending)
                pending = None
            if log_now:
                last_record = write_log(step, stage, strategy)
            if eval_now:
                last_eval = run_eval(step)
            if ckpt_now or step == total:
                save(step)
            if log_now or eval_now or ckpt_now:
                t_last = time.perf_counter()  # eval / save time is not step time
            if debug_sleep:
                time.sleep(debug_sleep)
            if stop_now:
                interrupted = stop.signum
                sink.message(f"[a3jax train] signal {interrupted} at step {step}: saving and exiting")
                save(step)
                break
        if step == end and end < total and not interrupted:
            save(step)
        ckpts.wait()
    finally:
        sink.close()
        ckpts.close()
    result = dict(last_record)
    result.update({"step": int(step), "eval": last_eval, "interrupted": int(interrupted),
                   "resumed_from": restored[0] if restored is not None else None, "run_dir": run_dir,
                   "last_checkpoint": last_good})
    if "loss" not in result and window:
        result["loss"] = float(np.mean([w["loss"] for w in window]))
    result.setdefault("loss", math.nan)
    return result
