"""The GRPO loop (`a3jax rl CONFIG.yaml key=value ...`, docs/post-training.md).

Per RL step: the step's prompts (a seeded permutation per epoch: a function of the step alone), G
rollouts each from the decoder with the step's seed, rewards on the host, group advantages, the old
policy's and the frozen reference's per-token log-probs, then `inner_steps` jitted updates. Everything
is a function of (params, optimizer state, step), so resuming from a checkpoint reproduces the
uninterrupted run bit for bit.

RUN_DIR/
    rl.yaml            the config
    checkpoints/<n>/   Orbax: TrainState (params, optimizer state, update count, rng) after RL step n
    metrics.jsonl      one line per RL step: reward mean/std, KL, clip fraction, entropy, tokens/s, ...;
                       step 0: eval accuracy before any update, and the sandbox isolation of rewards
                       that run code (unit_tests)
    rollouts.jsonl     prompt, completion, reward, log-prob, decoding setting (first sample per group, capped)
    final/             params checkpoint of the last step (Engine.load, a3jax generate)
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml

from a3jax import fs
from a3jax.checkpoint import copy_tokenizer_files, load_params, save_params, tokenizer_spec
from a3jax.decode import text as text_lib
from a3jax.posttrain import config as config_lib
from a3jax.posttrain import grpo, policy, rewards as rewards_lib, rollout as rollout_lib
from a3jax.model import param_shapes, param_shardings
from a3jax.sharding import activate, make_mesh, rules_of
from a3jax.train.metrics import read_records
from a3jax.train.state import create_state, make_optimizer, state_shardings


class DataError(ValueError):
    """A prompts file that cannot be read, or an example without the prompt field."""


def read_examples(path: str, field: str) -> list:
    if not fs.isfile(path):
        raise DataError(f"prompts file not found: {path}")
    out = []
    for n, ex in fs.read_jsonl(path, DataError):
        if not isinstance(ex, dict) or not isinstance(ex.get(field), str):
            raise DataError(f"{path}:{n}: needs a string field {field!r} (the prompt)")
        out.append(ex)
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def step_indices(n: int, per_step: int, step: int, seed: int) -> np.ndarray:
    """The example indices of RL step `step`: consecutive slices of a seeded permutation per epoch."""
    out = []
    pos = step * per_step
    while len(out) < per_step:
        epoch, off = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = perm[off:off + per_step - len(out)]
        out.extend(take.tolist())
        pos += len(take)
    return np.asarray(out)


def _truncate(path: str, last_step: int) -> int:
    """Keeps the records of a JSONL log with step <= last_step (a resumed run rewrites the rest; a line
    torn by a kill is dropped, as the trainer's metrics do); returns the records kept."""
    if not os.path.isfile(path):
        return 0
    keep = [rec for rec in read_records(path) if int(rec.get("step", 0)) <= last_step]
    with open(path, "w") as f:
        f.write("".join(json.dumps(rec) + "\n" for rec in keep))
    return len(keep)


@functools.lru_cache(maxsize=8)
def _compiled(model_cfg, est, opt_cfg, total_steps: int, hp, mesh_cfg):
    """(placement, optimizer, schedule, update, logprobs), shared by runs of one setting in
    a process (one compile). The mesh and the shardings are the trainer's: params (and the optimizer
    state) by the model's logical axes, rollout rows over the batch axes."""
    mesh, rules = make_mesh(mesh_cfg), rules_of(mesh_cfg)
    optimizer, schedule = make_optimizer(opt_cfg, total_steps)
    ssh = state_shardings(optimizer, param_shardings(model_cfg, mesh, rules), param_shapes(model_cfg), mesh)
    place = grpo.placement(mesh, rules, ssh)
    return (place, optimizer, schedule, grpo.make_update(model_cfg, est, optimizer, hp, place),
            grpo.make_logprobs(model_cfg, est, hp, place))


class Runner:
    """One GRPO run: the model, tokenizer, data, compiled functions and checkpoint manager."""

    def __init__(self, cfg: config_lib.RLConfig, log: Callable = print):
        self.cfg, self.log = cfg, log
        self.mesh, self.rules = make_mesh(cfg.mesh), rules_of(cfg.mesh)
        self.model_cfg, params = load_params(cfg.init_from, self.mesh, self.rules)  # placed like the trainer's
        log(f"mesh {dict(self.mesh.shape)} on {jax.device_count()} {jax.devices()[0].device_kind} devices")
        self.est = policy.estimator_for(self.model_cfg)
        self.tok = text_lib.load_tok(cfg.tokenizer, cfg.init_from)
        self.rewards = rewards_lib.build(cfg.reward_specs())
        self.examples = read_examples(cfg.prompts, cfg.prompt_field)
        self.eval_examples = (read_examples(cfg.eval_prompts, cfg.prompt_field)[:cfg.eval_size]
                              if cfg.eval_prompts else [])
        self.prompt_ids = [self._ids(ex) for ex in self.examples]
        longest = max(len(p) for p in self.prompt_ids + [self._ids(e) for e in self.eval_examples])
        self.buffer = cfg.buffer_length or rollout_lib.default_buffer(
            longest, cfg.max_new_tokens, self.model_cfg.max_position_embeddings)
        self.spec = cfg.decode.spec()
        rollout_lib.check_spec(self.spec)
        self.samp = policy.sampled(cfg.decode.temperature, cfg.decode.top_k, cfg.decode.top_p)
        self.hp = grpo.Hyper(cfg.clip_eps, cfg.kl_beta, cfg.mask_prob)
        self.place, self.optimizer, self.schedule, self.update, self.logprobs = _compiled(
            self.model_cfg, self.est, cfg.optimizer, cfg.steps * cfg.inner_steps, self.hp, cfg.mesh)
        self.state = create_state(params, self.optimizer, cfg.seed, self.place.state)
        # frozen, placed like the policy (the state's buffers are donated)
        self.ref_params = jax.tree.map(jnp.copy, self.state.params)
        os.makedirs(cfg.run_dir, exist_ok=True)
        self.mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(cfg.run_dir, "checkpoints")),
                                          options=ocp.CheckpointManagerOptions(max_to_keep=cfg.max_to_keep,
                                                                               create=True))
        self.metrics_path = os.path.join(cfg.run_dir, "metrics.jsonl")
        self.rollouts_path = os.path.join(cfg.run_dir, "rollouts.jsonl")

    def _ids(self, ex) -> list:
        return text_lib.prompt_ids(self.tok, ex[self.cfg.prompt_field], False)

    # ------------------------------------------------------------------ checkpoints

    def restore(self) -> int:
        """Restores the latest checkpoint (if any); returns the RL step to continue from."""
        step = self.mngr.latest_step()
        if step is None:
            return 0
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
        self.state = self.mngr.restore(step, args=ocp.args.StandardRestore(target))
        self.log(f"resumed from {self.cfg.run_dir}/checkpoints/{step}")
        return int(step)

    def save(self, step: int) -> None:
        self.mngr.save(step, args=ocp.args.StandardSave(self.state))
        self.mngr.wait_until_finished()

    # ------------------------------------------------------------------ one step

    def rollout(self, prompts: list, group: int, seed: int, temperature: Optional[float] = None):
        c = self.cfg
        t = c.decode.temperature if temperature is None else temperature
        return rollout_lib.generate_group(self.model_cfg, self.state.params, prompts, group, c.max_new_tokens,
                                          self.spec, t, c.decode.top_k, c.decode.top_p, seed, self.buffer)

    def score(self, examples: list, completions: list, group: int) -> np.ndarray:
        out = []
        for i, ids in enumerate(completions):
            text = text_lib.completion_text(self.tok, ids)
            out.append(rewards_lib.score(self.rewards, text, examples[i // group], i // group))
        return np.asarray(out, np.float32)

    def evaluate(self, spec=None) -> float:
        """Greedy accuracy (mean reward) on the eval examples, with the rollouts' decoding setting or `spec`."""
        return evaluate(self.model_cfg, self.state.params, self.tok, self.rewards, self.eval_examples,
                        self.cfg.prompt_field, spec or self.spec, self.cfg.max_new_tokens, self.buffer)

    def step(self, step: int) -> dict:
        c = self.cfg
        idx = step_indices(len(self.examples), c.prompts_per_step, step, c.seed)
        examples = [self.examples[i] for i in idx]
        t0 = time.perf_counter()
        roll = self.rollout([self.prompt_ids[i] for i in idx], c.group_size, c.seed * 1_000_003 + step)
        t_roll = time.perf_counter() - t0
        rewards = self.score(examples, roll.completions, c.group_size)
        adv = jax.device_put(grpo.group_advantages(rewards, c.group_size, c.scale_rewards), self.place.vector)
        batch = jax.device_put(roll.batch(), self.place.rows)
        base = jax.random.fold_in(jax.random.PRNGKey(c.seed), step)
        keys = [jax.random.fold_in(base, mu) for mu in range(c.inner_steps)]
        # the old policy's and the reference's log-probs: once when exact, per key for an estimate
        draws = 1 if self.est.exact else c.inner_steps
        olds = [self.logprobs(self.state.params, batch, keys[mu], self.samp) for mu in range(draws)]
        refs = [self.logprobs(self.ref_params, batch, keys[mu], self.samp) for mu in range(draws)]
        olds, refs = olds * (c.inner_steps // draws), refs * (c.inner_steps // draws)
        t1 = time.perf_counter()
        ms = []
        for mu in range(c.inner_steps):
            self.state, m = self.update(self.state, batch, adv, olds[mu], refs[mu], keys[mu], self.samp)
            ms.append(m)
        ms = jax.device_get(ms)
        t_upd = time.perf_counter() - t1
        if any(int(m["nonfinite"]) for m in ms):
            raise FloatingPointError(f"RL step {step + 1}: non-finite loss or gradient (the update was not applied)")
        seq_lp = np.asarray(jnp.sum(olds[0], -1))
        n_tok = int(roll.target.sum())
        rec = dict(step=step + 1, reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                   loss=float(ms[-1]["loss"]), kl=float(ms[-1]["kl"]),
                   clip_frac=float(np.mean([m["clip_frac"] for m in ms])), entropy=float(ms[0]["entropy"]),
                   grad_norm=float(ms[-1]["grad_norm"]), logp_mean=float(seq_lp.mean()),
                   completion_tokens=n_tok, decode_steps=roll.steps,
                   rollout_tokens_per_s=n_tok / max(t_roll, 1e-9),
                   update_tokens_per_s=n_tok * c.inner_steps / max(t_upd, 1e-9),
                   lr=float(self.schedule(int(self.state.step) - 1)))
        self._log_rollouts(step + 1, examples, roll, rewards, seq_lp)
        return rec

    def _log_rollouts(self, step: int, examples, roll, rewards, seq_lp) -> None:
        c = self.cfg
        setting = dict(order=c.decode.order, group_size=c.decode.group_size, speculative=c.decode.speculative,
                       temperature=c.decode.temperature, top_k=c.decode.top_k, top_p=c.decode.top_p,
                       estimator=self.est.name)
        room = c.rollout_log_cap - self._logged
        lines = []
        for g in range(min(len(examples), max(room, 0))):
            i = g * c.group_size
            lines.append(json.dumps(dict(step=step, prompt=examples[g][c.prompt_field],
                                         completion=text_lib.completion_text(self.tok, roll.completions[i]),
                                         reward=float(rewards[i]), logprob=float(seq_lp[i]), decoding=setting)))
        self._logged += len(lines)
        with open(self.rollouts_path, "a") as f:
            f.write("".join(ln + "\n" for ln in lines))

    # ------------------------------------------------------------------ the run

    def run(self, hooks: Sequence[Callable] = ()) -> list:
        c = self.cfg
        with open(os.path.join(c.run_dir, "rl.yaml"), "w") as f:
            yaml.safe_dump(config_lib.to_dict(c), f, sort_keys=False)
        with activate(self.mesh, self.rules):  # activation and cache constraints resolve on the mesh
            return self._run(hooks)

    def _run(self, hooks: Sequence[Callable]) -> list:
        c = self.cfg
        start = self.restore()
        _truncate(self.metrics_path, start)
        self._logged = _truncate(self.rollouts_path, start)
        records = []
        # how the rewards run untrusted code (the sandbox's isolation mode and limits), said once
        sandboxed = {r.name: iso for r in self.rewards if (iso := rewards_lib.isolation(r)) is not None}
        for name, iso in sandboxed.items():
            self.log(f"reward {name}: programs run in the sandbox, isolation {iso['mode']!r}")
        if (self.eval_examples or sandboxed) and start == 0:  # the step-0 record: the run before any update
            rec = dict(step=0, **({"reward_isolation": sandboxed} if sandboxed else {}),
                       **({"eval_accuracy": self.evaluate()} if self.eval_examples else {}))
            self._write(rec)
            records.append(rec)
        for step in range(start, c.steps):
            rec = self.step(step)
            last = step + 1 == c.steps
            if self.eval_examples and (last or (c.eval_every and (step + 1) % c.eval_every == 0)):
                rec["eval_accuracy"] = self.evaluate()
            self._write(rec)
            records.append(rec)
            self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
            if last or (step + 1) % c.checkpoint_every == 0:
                self.save(step + 1)
            for h in hooks:
                h(step + 1, rec)
        final = os.path.join(c.run_dir, "final")
        save_params(final, self.model_cfg, self.state.params, force=True)
        src = tokenizer_spec(c.init_from)
        if src not in ("byte", "") and fs.isdir(src):
            copy_tokenizer_files(src, final)
        self.mngr.close()
        return records

    def _write(self, rec: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def evaluate(model_cfg, params, tok, rewards: list, examples: list, field: str, spec, max_new_tokens: int,
             buffer: int, batch: int = 16) -> float:
    """Mean reward of greedy completions (one per example, decoded with `spec`), in batches of `batch`
    rows (the last padded by repeating a prompt: one compiled shape)."""
    scores = []
    for a in range(0, len(examples), batch):
        chunk = examples[a:a + batch]
        prompts = [text_lib.prompt_ids(tok, e[field], False) for e in chunk]
        prompts += [prompts[-1]] * (batch - len(prompts))
        roll = rollout_lib.generate_group(model_cfg, params, prompts, 1, max_new_tokens, spec, 0.0, 0, 1.0, 0, buffer)
        for i, ex in enumerate(chunk):
            scores.append(rewards_lib.score(rewards, text_lib.completion_text(tok, roll.completions[i]), ex, a + i))
    return float(np.mean(scores))


def run(cfg: config_lib.RLConfig, hooks: Sequence[Callable] = (), log: Callable = print) -> list:
    """Runs (or resumes) GRPO; returns this invocation's metric records."""
    return Runner(cfg, log).run(hooks)
