"""The `a3jax rl` config: typed, strict (unknown keys and bad values name the key), YAML + key=value
overrides like `a3jax train` (a3jax.config's reader and builder). docs/post-training.md lists the keys."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

import jax
import numpy as np

from a3jax import config as config_lib
from a3jax.config import ConfigError, MeshConfig, OptimizerConfig
from a3jax.decode.spec import DecodeError, DecodeSpec
from a3jax.posttrain import rewards as rewards_lib
from a3jax.sharding import MESH_AXES, mesh_shape


@dataclass(frozen=True)
class DecodeConfig:
    """How rollouts are sampled (a3jax.decode DecodeSpec + SamplingParams)."""
    order: str = "left_to_right"  # left_to_right | random | confidence | entropy | margin | random_dynamic
    group_size: int = 1  # tokens committed per step (in parallel, independently within a step)
    speculative: int = 0  # self-speculative draft block k (left_to_right; samples token by token)
    prompt_group_size: int = -1  # prompt layout: -1 = the model's, 0 = one group, n = AR chunks of n
    temperature: float = 1.0  # 1 = the model's own distribution (the exact setting)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    steps: int = 0  # mdlm: denoiser calls per completion (0 = max_new_tokens / group_size)

    def spec(self) -> DecodeSpec:
        return DecodeSpec(order=self.order, group_size=self.group_size, speculative=self.speculative,
                          prompt_group_size=None if self.prompt_group_size < 0 else self.prompt_group_size,
                          steps=self.steps or None)


@dataclass(frozen=True)
class RewardConfig:
    name: str = "exact_match"  # exact_match | regex | unit_tests | package.module:function
    weight: float = 1.0  # the rewards' weighted sum is the reward
    args: Any = ()  # keyword arguments of the reward (a mapping)


@dataclass(frozen=True)
class RLConfig:
    init_from: str = ""  # the SFT checkpoint (params checkpoint or run directory): the policy and the frozen reference
    run_dir: str = "runs/rl"  # checkpoints/, metrics.jsonl, rollouts.jsonl, final/
    tokenizer: str = "auto"  # auto = the checkpoint's own
    prompts: str = ""  # JSONL: one example per line with `prompt` and what the rewards read (e.g. `answer`)
    prompt_field: str = "prompt"
    eval_prompts: str = ""  # JSONL like prompts: greedy exact-match accuracy every eval_every steps
    eval_every: int = 0  # 0 = at the start and the end only (when eval_prompts is given)
    eval_size: int = 64  # eval examples used (the first n)
    steps: int = 100  # RL steps (one rollout batch each)
    prompts_per_step: int = 4  # prompts per rollout batch
    group_size: int = 8  # G: completions per prompt (>= 2: the advantage is relative to the group)
    inner_steps: int = 2  # optimisation steps per rollout batch (mu)
    max_new_tokens: int = 16
    buffer_length: int = 0  # rollout buffer positions (0 = longest prompt + max_new_tokens, rounded to 16)
    clip_eps: float = 0.2  # importance-ratio clip range (0 = no clipping)
    kl_beta: float = 0.04  # weight of the KL penalty to the reference policy (0 = none)
    scale_rewards: bool = True  # divide advantages by the group's reward std
    mask_prob: float = 0.15  # mdlm one-step estimator: prompt masking probability
    seed: int = 0
    decode: DecodeConfig = DecodeConfig()
    rewards: tuple[RewardConfig, ...] = (RewardConfig(),)
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-4, warmup_steps=0, schedule="constant",
                                                 weight_decay=0.0)
    checkpoint_every: int = 10
    max_to_keep: int = 3
    # the device mesh of the rollouts and updates, as `a3jax train`'s: params (and optimizer state)
    # sharded by the model's logical axes (FSDP by default), rollout rows over the batch axes (data, fsdp)
    mesh: MeshConfig = MeshConfig()
    rollout_log_cap: int = 2000  # rollouts.jsonl lines at most (the first sample of each group is logged)

    def reward_specs(self) -> list:
        return [(r.name, r.weight, dict(r.args)) for r in self.rewards]

    def validate(self, where: str) -> None:
        bad = lambda key, msg: ConfigError(f"{where}: {key} {msg}")  # noqa: E731
        if not self.init_from:
            raise bad("init_from", "must name the checkpoint to start from (the SFT model)")
        if not self.prompts:
            raise bad("prompts", "must name a JSONL file of prompts")
        if self.group_size < 2:
            raise bad("group_size", f"must be >= 2 (GRPO's advantage compares a completion with its group), "
                                    f"got {self.group_size}")
        for key in ("steps", "prompts_per_step", "inner_steps", "max_new_tokens", "checkpoint_every",
                    "max_to_keep"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}")
        if not self.decode.temperature > 0:
            raise bad("decode.temperature", f"must be > 0 (greedy rollouts are all equal), got {self.decode.temperature}")
        if self.clip_eps < 0 or self.kl_beta < 0 or not 0 <= self.mask_prob < 1:
            raise bad("clip_eps/kl_beta/mask_prob", "must be >= 0 (mask_prob in [0, 1))")
        if not self.rewards:
            raise bad("rewards", "must list at least one reward")
        for i, r in enumerate(self.rewards):
            if not isinstance(r.args, tuple) or any(not isinstance(p, tuple) or len(p) != 2 for p in r.args):
                raise bad(f"rewards[{i}].args", f"must be a mapping, got {r.args!r}")
            try:
                rewards_lib.resolve(r.name)
            except rewards_lib.RewardError as e:
                raise bad(f"rewards[{i}].name", str(e)) from None
        self.check_mesh(where, jax.device_count())
        try:
            self.decode.spec()
        except DecodeError as e:
            raise bad("decode", str(e)) from None
        self.optimizer.validate(f"{where}: optimizer")

    def check_mesh(self, where: str, num_devices: int) -> None:
        """The mesh fits the devices and its batch axes divide the rollout rows (prompts_per_step * G)."""
        sizes = dict(zip(MESH_AXES, mesh_shape(self.mesh, num_devices)))
        axes = dict(self.mesh.rules).get("batch") or ()
        n = int(np.prod([sizes.get(a, 1) for a in ((axes,) if isinstance(axes, str) else axes)]))
        rows = self.prompts_per_step * self.group_size
        if rows % n:
            raise ConfigError(f"{where}: prompts_per_step * group_size = {self.prompts_per_step} * {self.group_size} "
                              f"= {rows} rollout rows, which the mesh's batch axes ({n} devices: mesh "
                              f"{sizes}) do not divide; change one of them or the mesh")


def load(path: Optional[str] = None, overrides=()) -> RLConfig:
    """File (optional) + key=value overrides -> validated RLConfig."""
    values = config_lib.parse_yaml(open(path).read(), path) if path else {}
    if path and not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    where = path or "<overrides>"
    if overrides:
        values = config_lib.apply_overrides(values, list(overrides))
        where += " (+ overrides)"
    cfg = config_lib.build(RLConfig, values, where)
    cfg.validate(where)
    return cfg


def to_dict(cfg: RLConfig) -> dict:
    d = config_lib.to_dict(cfg)
    d["rewards"] = [dict(name=r.name, weight=r.weight, args=dict(r.args)) for r in cfg.rewards]
    return d


def replace(cfg: RLConfig, **kw) -> RLConfig:
    return dataclasses.replace(cfg, **kw)
