"""The training loop: `train(cfg) -> dict` (also `a3jax train CONFIG.yaml key=value ...`).

    mesh (cfg.mesh) -> state: restore the latest good checkpoint of cfg.run_dir, else init (random or
    model.init_from) -> Grain iterator (curriculum stages come with every batch) -> jitted step ->
    metrics (console / TensorBoard / metrics.jsonl) -> periodic eval (held-out split, one loss per
    data.eval_strategies entry) -> checkpoints (every checkpoint.every steps, at the end, on SIGTERM /
    SIGINT).

The loop (`_Trainer.run`) is short: it runs a step, then the hooks due after it (a3jax.train.hooks),
each saying how often it runs: the log line (train.log_every), `Evaluator` (eval sets built once, run
every train.eval_every steps), the checkpoint (checkpoint.every; `CheckpointPolicy` says where and
keeps the last good one), RUN_DIR/final at the last step (a3jax.train.final), then the caller's
`hooks=`. `metrics.MetricsWindow` holds the log window and its totals (saved in and restored from the
checkpoint's `progress` item). Each step's curriculum stage is the one its batch carries (the pipeline
computes it); the trainer does not derive it again.

Multi-process: every process runs this same function on its own data shard
(make_train_iterator(process_index, process_count)); files other than checkpoints are written by
process 0 only; Orbax writes checkpoints from every process.

Non-finite loss: the step never applies a non-finite update (see step.py). With train.skip_nonfinite
the run logs the skip and goes on; otherwise it stops with NonFiniteLossError naming the step and the
last good checkpoint, and saves nothing more.
"""
from __future__ import annotations

import dataclasses

import math
import signal
import threading
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from a3jax import fs, objectives
from a3jax.checkpoint import ARCH_FIELDS, RunCheckpoints, check_compatible, load_params
from a3jax.config import Config, ConfigError, to_dict, yaml_text
from a3jax.data import make_eval_batches, make_train_iterator, to_global_batch
from a3jax.data.checks import mean_group_size
from a3jax.data.grouping import prompt_group_size_for
from a3jax.layout import Layout
from a3jax.model import init_params_sharded, param_count, param_shapes, param_shardings, query_embed_init
from a3jax.sharding import activate, batch_sharding, make_mesh, rules_of
from a3jax.train import metrics as metrics_lib
from a3jax.train.final import FINAL_DIR, write_final
from a3jax.train.hooks import Hooks, StepInfo
from a3jax.train.state import abstract_state, create_state, make_optimizer, state_shardings
from a3jax.train.step import make_eval_step, make_train_step


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
            return bool(multihost_utils.process_allgather(np.int32(self.signum)).max())
        return bool(self.signum)


def _initial_params(cfg: Config, mesh, rules, log):
    """Random init into the shardings, or params from model.init_from (a3jax.checkpoint)."""
    mcfg = cfg.model
    shardings = param_shardings(mcfg, mesh, rules)
    if not mcfg.init_from:
        return init_params_sharded(mcfg, jax.random.PRNGKey(cfg.train.seed), mesh, rules)
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


def batch_stage(batch: dict, step: int) -> int:
    """The curriculum stage of a training batch: the pipeline's per-example `stage` field (a batch is
    one global step, so one stage)."""
    if "stage" not in batch:
        raise RuntimeError(f"the training batch of step {step} has no 'stage' field (keys: {sorted(batch)}); "
                           f"the trainer needs a3jax.data.make_train_iterator's batches, which carry "
                           f"each example's curriculum stage")
    stages = np.unique(np.asarray(batch["stage"]))
    if len(stages) != 1:
        raise RuntimeError(f"the training batch of step {step} mixes curriculum stages {stages.tolist()}")
    return int(stages[0])


class Evaluator:
    """Held-out loss per data.eval_strategies entry: `evaluator(step, params) -> {strategy: loss}`,
    also written to metrics.jsonl and the console. The eval batches (train.eval_batches deterministic
    global batches of the held-out split; each process keeps its rows) are built at the first call and
    reused; a strategy whose batches cannot be built (e.g. an empty held-out split) is reported then
    and left out."""

    def __init__(self, cfg: Config, eval_fn, mesh, rules, sink: metrics_lib.MetricsSink):
        self.cfg, self.eval_fn, self.mesh, self.rules, self.sink = cfg, eval_fn, mesh, rules, sink
        self.sets: Optional[dict] = None

    def _build(self) -> dict:
        cfg, (pi, pc) = self.cfg, (jax.process_index(), jax.process_count())
        sets = {}
        for label, strat in objectives.of(cfg).eval_sets(cfg.data.eval_strategies):
            try:
                bs = make_eval_batches(cfg.data, cfg.train.global_batch_size, strat, max(1, cfg.train.eval_batches))
            except Exception as e:  # noqa: BLE001 - e.g. an empty held-out split
                self.sink.message(f"[a3jax train] eval under {strat!r} disabled: {type(e).__name__}: {e}")
                continue
            sets[label] = [to_global_batch(Layout.from_batch(_local_rows(b, pi, pc)), self.mesh, self.rules)
                           for b in bs]
        return sets

    def __call__(self, step: int, params) -> dict:
        if self.sets is None:
            self.sets = self._build()
        out = {}
        for strat, batches in self.sets.items():
            nll = tok = 0.0
            for b in batches:
                with activate(self.mesh, self.rules):
                    r = jax.device_get(self.eval_fn(params, b))
                nll += float(r["nll"])
                tok += float(r["tokens"])
            out[strat] = nll / max(tok, 1.0)
        if out:
            self.sink.write({"step": step, "kind": "eval", "loss": out})
            self.sink.console("eval @ %d: %s" % (step, "  ".join(f"{k} {v:.4f}" for k, v in out.items())))
        return out


class CheckpointPolicy:
    """Where and when beyond the checkpoint hook the run saves (docs/checkpoints.md). The hook saves every
    checkpoint.every steps and after the last step (train.steps); the loop also saves at stop_at_step
    when that stops the run short of the end, and on a signal. Saving a step that exists is a no-op;
    `last_good` is the newest step saved or restored by this run."""

    def __init__(self, ckpts: RunCheckpoints, total: int, end: int, config_dict: dict,
                 sink: metrics_lib.MetricsSink, last_good: Optional[int] = None):
        self.ckpts, self.total, self.end = ckpts, int(total), int(end)
        self.config_dict, self.sink, self.last_good = config_dict, sink, last_good

    def at_planned_stop(self, step: int, interrupted: int) -> bool:
        return step == self.end and self.end < self.total and not interrupted

    def save(self, step: int, state, data_iter, progress: dict) -> None:
        if self.ckpts.save(step, state, data_iter, self.config_dict, progress):
            self.last_good = step
            self.sink.message(f"[a3jax train] checkpoint {step} -> {self.ckpts.directory}/{step}")

    def last_good_text(self) -> str:
        return (f"last good checkpoint: {self.ckpts.directory}/{self.last_good}" if self.last_good is not None
                else "no checkpoint saved yet")


def train(cfg: Config, *, progress_bar: Optional[bool] = None, tensorboard: bool = True,
          stop_at_step: Optional[int] = None, hooks=()) -> dict:
    """Runs (or resumes) the training job described by `cfg`; returns the final metrics.

    stop_at_step: return (after saving a checkpoint) once this many steps are done, as a preemption
    would; for tests and for splitting a run into jobs. hooks: a3jax.train.hooks.Hook objects run
    after the trainer's own (log, eval, checkpoint, final export), each on its own schedule.
    The returned dict has at least step, loss (mean over the last log window), stage, strategy, eval (dict strategy -> loss, when evaluated),
    interrupted (signal number or 0), resumed_from (step or None), run_dir.
    """
    cfg.validate("train config")
    if not cfg.model.prompt_group_size:
        # the context layout this run's training shows the model, recorded with the params so that
        # decoding defaults to it (model.yaml of final/, exports and checkpoints)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, prompt_group_size=prompt_group_size_for(cfg)))
    main = jax.process_index() == 0
    run_dir = fs.normalize(cfg.run_dir)  # local or gs://; for gs:// credentials are checked here
    if main:
        fs.makedirs(run_dir)
        fs.write_text(fs.join(run_dir, "config.yaml"), yaml_text(cfg))

    def log(msg):
        if main:
            print(f"[a3jax train] {msg}", flush=True)

    # Handlers first: a preemption notice during startup (restore, compile) is honoured after the first step.
    stop = _StopFlag().install()
    try:
        trainer = _Trainer(cfg, log, progress_bar, tensorboard, stop_at_step, hooks)
        try:
            trainer.run(stop)
            trainer.ckpts.wait()
        finally:
            trainer.sink.close()
            trainer.ckpts.close()
        return trainer.result()
    finally:
        stop.uninstall()


def cut_stages(cfg: Config) -> str:
    """What train.steps leaves out of the curriculum (data.stages), in words; "" when it runs it all."""
    total, start, cut = cfg.total_steps, 0, []
    for i, st in enumerate(cfg.data.stages):
        if start >= total:
            cut.append(f"stage {i} ({st.strategy}, {st.steps} steps) will not run")
        elif start + st.steps > total:
            cut.append(f"stage {i} ({st.strategy}) runs {total - start} of its {st.steps} steps")
        start += st.steps
    return "; ".join(cut)


class _Trainer:
    """One run's setup (mesh, state, iterator, jitted steps, pieces) and its loop."""

    def __init__(self, cfg: Config, log, progress_bar, tensorboard, stop_at_step, hooks=()):
        pi, pc = jax.process_index(), jax.process_count()
        self.cfg, self.log = cfg, log
        self.run_dir = fs.normalize(cfg.run_dir)
        tcfg = cfg.train
        self.total = total = cfg.total_steps
        self.end = total if stop_at_step is None else min(total, int(stop_at_step))
        gbs, seq = tcfg.global_batch_size, cfg.data.seq_len
        self.mesh = mesh = make_mesh(cfg.mesh)
        self.rules = rules = rules_of(cfg.mesh)
        optimizer, schedule = make_optimizer(tcfg.optimizer, total, [s.steps for s in cfg.data.stages])
        pshapes = param_shapes(cfg.model)
        psh = param_shardings(cfg.model, mesh, rules)
        ssh = state_shardings(optimizer, psh, pshapes, mesh)
        bsh = batch_sharding(mesh, rules)
        log(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].device_kind} devices, "
            f"{pc} process(es); {total} steps of {gbs} x {seq} tokens")
        cut = cut_stages(cfg)
        if cut:
            log(f"warning: train.steps={total} is shorter than the curriculum "
                f"({sum(st.steps for st in cfg.data.stages)} steps in data.stages): {cut}")

        self.ckpts = RunCheckpoints(self.run_dir, cfg.checkpoint, log=log)
        make_iter = lambda start: make_train_iterator(cfg.data, gbs, pi, pc, start_step=start)  # noqa: E731
        restored = self.ckpts.restore_latest(
            abstract_state(optimizer, pshapes, ssh), make_iter, pc,
            check_config=lambda saved, step: check_compatible(saved, cfg, step, self.ckpts.directory))
        if restored is not None:
            self.start, self.state, self.it, progress = restored
            self.resumed_from = self.start
            log(f"resumed from checkpoint {self.start} ({self.ckpts.directory}/{self.start})")
        else:
            self.start, progress, self.resumed_from = 0, {}, None
            self.state = create_state(_initial_params(cfg, mesh, rules, log), optimizer, tcfg.seed, ssh)
            self.it = make_iter(0)
            log("initialised " + (f"from {cfg.model.init_from}" if cfg.model.init_from else "at random")
                + f": {param_count(cfg.model):,} params")

        self.step_fn = make_train_step(cfg, optimizer, schedule, ssh, bsh, mesh)
        eval_fn = make_eval_step(cfg, psh, bsh, mesh)
        self.sink = metrics_lib.MetricsSink(self.run_dir, self.start, total, enabled=pi == 0,
                                            tensorboard=tensorboard, progress_bar=progress_bar)
        self.evaluate = Evaluator(cfg, eval_fn, mesh, rules, self.sink)
        self.checkpoints = CheckpointPolicy(self.ckpts, total, self.end, to_dict(cfg),
                                            self.sink, last_good=self.resumed_from)
        # Per-step records since the last log line, restored from the checkpoint so averages match.
        self.window = metrics_lib.MetricsWindow(
            gbs * seq, n_devices=jax.device_count(),
            flops_per_token=objectives.of(cfg).train_flops(cfg.model, seq),
            peak_flops=metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, tcfg.peak_flops_per_device),
            start_step=self.start, progress=progress, process_count=pc)
        self.strategies = [st.strategy for st in cfg.data.stages]  # stage index -> its strategy (for logs)
        self.step = self.start
        self.last_record: dict = {}
        self.last_eval: dict = {}
        self.interrupted = 0
        self.hooks = self._builtin_hooks()
        self.hooks.hooks.extend(hooks)

    def _builtin_hooks(self) -> Hooks:
        tcfg, hooks = self.cfg.train, Hooks(self.total)

        def log_record(info: StepInfo):
            self.last_record = self._log(info.step, info.stage)

        def evaluate(info: StepInfo):
            self.last_eval = self.evaluate(info.step, info.state.params)

        hooks.add(log_record, every=max(1, tcfg.log_every))
        if tcfg.eval_every > 0:
            hooks.add(evaluate, every=tcfg.eval_every)
        hooks.add(lambda info: self._save(info.step), every=self.cfg.checkpoint.every, name="checkpoint")
        hooks.add(lambda info: self._write_final(info.state.params), every=0, name="final")
        return hooks

    # ------------------------------------------------------------------ the loop
    def run(self, stop: _StopFlag) -> None:
        tcfg, total, end, sink = self.cfg.train, self.total, self.end, self.sink
        if self.start >= total:
            self.log(f"nothing to do: the run is complete at step {self.start} of {total} "
                     f"(raise train.steps to continue)")
            if not fs.exists(fs.join(self.run_dir, FINAL_DIR)):  # stopped between its last checkpoint and final/
                self._write_final(self.state.params)
        if self.start == 0 and tcfg.eval_every > 0 and tcfg.eval_at_start:
            self.last_eval = self.evaluate(0, self.state.params)
        pending = None  # (step index, stage, device metrics, group size) of the step in flight
        prev_stage = None
        step = self.start
        while step < end:
            batch = next(self.it)
            stage = batch_stage(batch, step)
            if prev_stage is not None and stage != prev_stage:
                sink.message(f"[a3jax train] step {step}: curriculum stage {stage} ({self.strategies[stage]})")
            prev_stage = stage
            gsize = mean_group_size(batch)
            gb = to_global_batch(Layout.from_batch(batch), self.mesh, self.rules)  # the one filter of the batch
            with activate(self.mesh, self.rules):
                self.state, m = self.step_fn(self.state, gb)
            if pending is not None:
                self._finish(*pending)  # the step before: its metrics are ready while this one runs
            pending = (step, stage, m, gsize)
            step = self.step = step + 1
            due = self.hooks.due(step)
            stop_now = stop.is_set()
            if due or stop_now or step == end:
                self._finish(*pending)
                pending = None
            if due:
                info = StepInfo(step, self.state, stage)
                for hook in due:
                    hook.fn(info)
                self.window.restart_clock()  # time spent in hooks (eval, saving) is not step time
            if stop_now:
                self.interrupted = stop.signum
                sink.message(f"[a3jax train] signal {self.interrupted} at step {step}: saving and exiting")
                self._save(step)
                break
        if self.checkpoints.at_planned_stop(step, self.interrupted):
            self._save(step)

    # ------------------------------------------------------------------ the pieces the loop calls
    def _finish(self, s: int, stage: int, m, gsize: float) -> None:
        """Fetches the metrics of step index s into the window (after its dispatch the next step is
        already queued); a non-finite step stops the run or, with train.skip_nonfinite, is reported."""
        m = jax.device_get(m)
        self.window.add(s + 1, stage, m, gsize)
        if int(m["nonfinite"]):
            if not self.cfg.train.skip_nonfinite:
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {s + 1} (loss={float(m['loss'])}, "
                    f"grad_norm={float(m['grad_norm'])}, stage {stage} {self.strategies[stage]!r}); the update was "
                    f"not applied and nothing more is saved; {self.checkpoints.last_good_text()}. "
                    f"Set train.skip_nonfinite=true to skip such steps.")
            self.sink.message(f"[a3jax train] step {s + 1}: non-finite loss {float(m['loss'])}, update skipped")
        self.sink.console("", advance=1)

    def _log(self, step: int, stage: int) -> dict:
        rec = self.window.record(step, stage, self.strategies[stage])
        self.sink.write(rec)
        if self.sink.bar is not None:
            self.sink.console("", postfix=f"loss {rec['loss']:.3f} st {stage}")
        else:
            self.sink.console(metrics_lib.log_line(rec, self.total))
        return rec

    def _write_final(self, params) -> None:
        out = write_final(self.cfg, params, self.run_dir)
        self.sink.message(f"[a3jax train] final params -> {out}")

    def _save(self, step: int) -> None:
        self.sink.flush()  # the metrics up to a checkpoint are written out before it (gs:// buffers them)
        self.checkpoints.save(step, self.state, self.it, self.window.progress())

    def result(self) -> dict:
        result = dict(self.last_record)
        result.update({"step": int(self.step), "eval": self.last_eval, "interrupted": int(self.interrupted),
                       "resumed_from": self.resumed_from, "run_dir": self.run_dir,
                       "last_checkpoint": self.checkpoints.last_good})
        if "loss" not in result and self.window.steps:
            result["loss"] = self.window.mean_loss()
        result.setdefault("loss", math.nan)
        return result
