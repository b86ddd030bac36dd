"""GRPO with exact log-probs: the loop's log-probs are a3jax.score's exact likelihood of the realised
grouping (and the decoder's own) for fixed, random, confidence and speculative decoding; at ratio 1
without clipping or KL the GRPO gradient is REINFORCE's; bad configs and bad rewards give named
errors; `a3jax rl` killed with SIGKILL mid-run then resumed reproduces the uninterrupted run bit for bit."""
import dataclasses
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from a3jax.checkpoint import save_params
from a3jax.config import ConfigError, MeshConfig, ModelConfig, OptimizerConfig
from a3jax.decode import DecodeSpec
from a3jax.model import apply_model, numpy_init, param_shapes, param_shardings, token_logprobs
from a3jax.posttrain import config as rl_config, grpo, loop, policy, rewards, rollout
from a3jax.sandbox import probe
from a3jax.score import log_likelihood
from a3jax.sharding import activate, make_mesh, rules_of
from a3jax.train.state import create_state, init_state, make_optimizer, state_shardings
from train_helpers import compile_cache, wait_for  # noqa: F401 (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# byte vocab; a small init_std keeps completions varied (a reward then differs within a group)
CFG = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=64, init_std=0.05)
PROMPTS = [[256, 104, 105], [256, 97, 98, 99, 100], [256, 120]]
SETTINGS = {
    "left_to_right:4": DecodeSpec(order="left_to_right", group_size=4),
    "random:2": DecodeSpec(order="random", group_size=2),
    "confidence:3": DecodeSpec(order="confidence", group_size=3),
    "speculative:3": DecodeSpec(order="left_to_right", speculative=3),
}


@pytest.fixture(scope="module")
def params():
    return numpy_init(CFG, 0)


@pytest.fixture(scope="module")
def ckpt(params, tmp_path_factory):
    return save_params(str(tmp_path_factory.mktemp("rl") / "init"), CFG, params)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_loop_logprobs_are_the_exact_likelihood_of_the_realised_grouping(params, name):
    roll = rollout.generate_group(CFG, params, PROMPTS, 2, 10, SETTINGS[name], 1.0, 0, 1.0, seed=3,
                                  buffer_length=16)
    assert roll.target.sum(1).min() >= 1
    if name != "speculative:3":  # several tokens committed per step: the grouping is not AR
        assert any(len(set(s)) < len(s) for s in (roll.groups[r][roll.target[r]] for r in range(len(roll.groups))))
    est = policy.estimator_for(CFG)
    fn = grpo.make_logprobs(CFG, est, grpo.Hyper())
    lp = np.asarray(fn(params, {k: jnp.asarray(v) for k, v in roll.batch().items()}, jax.random.PRNGKey(0),
                       policy.sampled(1.0)))
    ll = log_likelihood(CFG, params, roll.tokens, roll.groups, roll.segment_ids, target_mask=roll.target)
    np.testing.assert_allclose(lp.sum(1), ll, rtol=1e-5, atol=1e-4)
    dec = np.where(roll.target, roll.decoder_logprobs, 0.0).sum(1)
    np.testing.assert_allclose(lp.sum(1), dec, rtol=1e-5, atol=1e-4)


def test_grpo_gradient_at_ratio_one_is_reinforce(params):
    roll = rollout.generate_group(CFG, params, PROMPTS[:2], 4, 6, SETTINGS["random:2"], 1.0, 0, 1.0, seed=1,
                                  buffer_length=16)
    batch = {k: jnp.asarray(v) for k, v in roll.batch().items()}
    adv = jnp.asarray([1.0, -0.5, 0.25, -2.0, 0.75, 0.5, -1.0, 0.3])
    est = policy.estimator_for(CFG)
    hp = grpo.Hyper(clip_eps=0.0, kl_beta=0.0)
    old = grpo.make_logprobs(CFG, est, hp)(params, batch, jax.random.PRNGKey(0), policy.sampled(1.0))
    g = jax.jit(jax.grad(lambda p: grpo.grpo_loss(CFG, est, p, batch, adv, old, old, jax.random.PRNGKey(0),
                                          policy.sampled(1.0), hp)[0]))(params)

    # REINFORCE from per-sample gradients of log P(o_i), taken from the model directly (one vmapped grad)
    def seq_logp(p, tok, pos, grp, seg, tgt):
        logits = apply_model(CFG, p, tok[None], pos[None], grp[None], seg[None], "query")
        return jnp.sum(jnp.where(tgt[None], token_logprobs(logits, tok[None]), 0.0))

    per_sample = jax.jit(jax.vmap(jax.grad(seq_logp), in_axes=(None, 0, 0, 0, 0, 0)))(
        params, batch["tokens"], batch["positions"], batch["groups"], batch["segment_ids"], batch["target"])
    w = -np.asarray(adv) / roll.target.sum(1) / len(adv)
    want = jax.tree.map(lambda x: jnp.tensordot(jnp.asarray(w, x.dtype), x, axes=1), per_sample)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


def test_sharded_update_equals_one_device(params):
    """The update and log-probs pinned to a data x fsdp mesh of the 8 fake devices (params and Adam
    moments FSDP-sharded like the trainer's, rows over data and fsdp) equal the one-device ones."""
    roll = rollout.generate_group(CFG, params, PROMPTS[:2], 4, 6, SETTINGS["random:2"], 1.0, 0, 1.0, seed=2,
                                  buffer_length=16)
    batch = roll.batch()
    adv = grpo.group_advantages(np.arange(8.0) % 3, 4)
    est, hp, key, samp = policy.estimator_for(CFG), grpo.Hyper(), jax.random.PRNGKey(0), policy.sampled(1.0)
    opt, _ = make_optimizer(OptimizerConfig(learning_rate=0.01, warmup_steps=0, schedule="constant"), 2)
    ref_params = numpy_init(CFG, 1)

    def two_updates(state, logprobs, update, put):
        b = put(batch, "rows")
        old, ref = logprobs(state.params, b, key, samp), logprobs(ref_params, b, key, samp)
        ms = []
        for _ in range(2):  # the second step's ratio differs from 1: clipping and the Adam moments matter
            state, m = update(state, b, put(adv, "vector"), old, ref, key, samp)
            ms.append(m)
        return state, old, jax.device_get(ms)

    one = two_updates(init_state(jax.tree.map(jnp.copy, params), opt, 0),  # a copy: the state is donated
                      grpo.make_logprobs(CFG, est, hp), grpo.make_update(CFG, est, opt, hp),
                      lambda x, _: jax.tree.map(jnp.asarray, x))
    mesh_cfg = MeshConfig(data=2, fsdp=4)
    mesh, rules = make_mesh(mesh_cfg), rules_of(mesh_cfg)
    place = grpo.placement(mesh, rules, state_shardings(opt, param_shardings(CFG, mesh, rules), param_shapes(CFG),
                                                        mesh))
    with activate(mesh, rules):
        ref_params = jax.device_put(ref_params, place.state.params)
        sharded = two_updates(create_state(params, opt, 0, place.state), grpo.make_logprobs(CFG, est, hp, place),
                              grpo.make_update(CFG, est, opt, hp, place),
                              lambda x, kind: jax.device_put(x, getattr(place, kind)))
    w = sharded[0].params["layers"]["w_gate"]
    assert w.sharding.spec == place.state.params["layers"]["w_gate"].spec and len(w.addressable_shards) == 8
    assert w.addressable_shards[0].data.shape[1] == CFG.hidden_size // 4  # [L, E/fsdp, M]
    assert sharded[1].sharding.spec == P(("data", "fsdp"), None)
    assert one[2][1]["clip_frac"] > 0 or one[2][1]["ratio_mean"] != 1.0
    np.testing.assert_allclose(np.asarray(sharded[1]), np.asarray(one[1]), rtol=1e-5, atol=1e-5)
    for a, b in zip(one[2], sharded[2]):
        for k in ("loss", "kl", "grad_norm", "clip_frac", "entropy"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # Adam normalises the gradient: a reduction-order difference moves a param by a fraction of lr
    for x, y in zip(jax.tree.leaves(one[0]), jax.tree.leaves(sharded[0]), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=5e-5)


def test_group_advantages_are_normalised_within_each_group():
    a = grpo.group_advantages([1, 0, 0, 0, 5, 5, 5, 7], 4)
    np.testing.assert_allclose(a[:4].mean(), 0, atol=1e-6)
    np.testing.assert_allclose(a[4:].std(), 1, atol=1e-3)
    assert a[0] > 0 > a[1] and a[7] > 0 > a[4]


# ----------------------------------------------------------------------------- configs and rewards


def _data(tmp_path, n=6):
    p = tmp_path / "prompts.jsonl"
    rng = np.random.default_rng(0)
    p.write_text("".join(json.dumps({"prompt": "".join(rng.choice(list("abcxyz"), 3)), "answer": "abc",
                                    "tests": "assert True"}) + "\n"
                         for _ in range(n)))
    return str(p)


def _overrides(ckpt, tmp_path, **kw):
    ov = dict(init_from=ckpt, prompts=_data(tmp_path), run_dir=str(tmp_path / "run"), steps=3, prompts_per_step=2,
              group_size=4, inner_steps=2, max_new_tokens=6, checkpoint_every=1, buffer_length=16,
              rewards="[{name: regex, args: {pattern: '[a-z]'}}]", **{"decode.order": "random",
                                                                      "decode.group_size": 2,
                                                                      "optimizer.learning_rate": 0.01})
    ov.update(kw)
    return [f"{k}={v}" for k, v in ov.items()]


@pytest.mark.parametrize("kw,key", [
    (dict(rewards="[{name: no_such_reward}]"), "rewards[0].name"),
    (dict(group_size=1), "group_size"),
    (dict(rewards="[{name: regex, args: [1]}]"), "rewards[0].args"),
    (dict(**{"decode.temperature": 0.0}), "decode.temperature"),
    (dict(**{"decode.order": "sideways"}), "decode"),
    (dict(surprise=1), "surprise"),
    (dict(prompts_per_step=3), "3 \\* 4 = 12 rollout rows, which the mesh's batch axes \\(8 devices"),
])
def test_bad_configs_name_the_key(ckpt, tmp_path, kw, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        rl_config.load(None, _overrides(ckpt, tmp_path, **kw))


def test_rl_cli_reports_a_bad_config_by_key(ckpt, tmp_path, capsys):
    from a3jax.posttrain.cli import cli_main
    assert cli_main(_overrides(ckpt, tmp_path, group_size=1)) == 1
    err = capsys.readouterr().err
    assert err.startswith("a3jax rl: ") and "group_size must be >= 2" in err
    assert not (tmp_path / "run").exists(), "a bad config fails before any work"


def _boom(completion, example):
    raise RuntimeError("bug in the reward")


def _nan(completion, example):
    return float("nan")


@pytest.mark.parametrize("fn,match", [(_boom, "raised on example 0 .*bug in the reward"), (_nan, "returned nan")])
def test_a_reward_that_raises_or_returns_nan_stops_the_run_by_name(fn, match):
    rs = [rewards.Reward("mine", fn, 1.0, {})]
    with pytest.raises(rewards.RewardError, match="reward 'mine' " + match):
        rewards.score(rs, "x", {}, 0)


def test_builtin_rewards():
    assert rewards.exact_match("12\nmore", {"answer": 12}) == 1.0
    assert rewards.exact_match("the answer is 7.", {"answer": "7"}, pattern=r"answer is (\d+)") == 1.0
    assert rewards.exact_match("13", {"answer": 12}) == 0.0
    assert rewards.regex("abc", {}, pattern="b") == 1.0 and rewards.regex("a", {}, pattern="b") == 0.0
    tests = "assert add(2, 3) == 5"
    assert rewards.unit_tests("def add(a, b):\n    return a + b", {"tests": tests}) == 1.0
    assert rewards.unit_tests("def add(a, b):\n    return a - b", {"tests": tests}) == 0.0


def test_unit_tests_reward_runs_in_the_sandbox():
    # passing needs the program to run to its end: an exit(0) before the failing tests is no pass (a
    # bare `python -c` would exit 0), nor a loop stopped at the deadline
    assert rewards.unit_tests("import os\nos._exit(0)", {"tests": "assert False"}) == 0.0
    assert rewards.unit_tests("while True:\n    pass", {"tests": ""}, timeout_s=1, cpu_s=1) == 0.0
    r = rewards.build([("unit_tests", 1.0, {"field": "tests", "timeout_s": 3})])[0]
    iso = rewards.isolation(r)
    assert iso["mode"] == probe(sys.executable)[0] and iso["timeout_s"] == 3
    assert rewards.isolation(rewards.build([("regex", 1.0, {"pattern": "a"})])[0]) is None
    for bad in ({"timeout_s": -1}, {"seconds": 3}, {"mode": "chroot"}):
        with pytest.raises(rewards.RewardError, match="reward 'unit_tests': bad sandbox args"):
            rewards.build([("unit_tests", 1.0, bad)])


# ----------------------------------------------------------------------------- the loop, kill -9 and resume

# `a3jax rl ARGS` pausing after every RL step (a hook: a pause changes no result), so that the test
# kills the run reliably between two checkpoints
_PAUSED_RL = ("import sys, time; from a3jax.posttrain.cli import cli_main; pause = float(sys.argv[1]); "
              "sys.exit(cli_main(sys.argv[2:], hooks=[lambda step, rec: time.sleep(pause)]))")


def _spawn_rl(args, cache_env, pause, log_path):
    env = dict(os.environ, PYTHONPATH=ROOT, **cache_env)
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-c", _PAUSED_RL, str(pause), *args], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def _steps_logged(run_dir):
    try:
        return [json.loads(ln)["step"] for ln in open(os.path.join(run_dir, "metrics.jsonl")) if ln.strip()]
    except (OSError, ValueError):  # not there yet, or a line half written
        return []


def _exact_metrics(run_dir):
    timing = ("rollout_tokens_per_s", "update_tokens_per_s")
    return [{k: v for k, v in json.loads(ln).items() if k not in timing} for ln in open(run_dir / "metrics.jsonl")]


@pytest.mark.slow  # three runs, two of them fresh processes (about 25 s on 2 cores)
def test_kill9_mid_run_then_resume_equals_the_uninterrupted_run(ckpt, tmp_path, compile_cache):
    args = _overrides(ckpt, tmp_path, steps=4, checkpoint_every=2)
    full = rl_config.load(None, args + [f"run_dir={tmp_path / 'full'}"])
    recs = loop.run(full, log=lambda *_: None)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(np.isfinite(r["kl"]) for r in recs)
    assert any(r["reward_std"] > 0 for r in recs)  # the rewards differ within groups: gradients flow
    assert recs[0]["kl"] == 0.0 and recs[-1]["kl"] > 0  # the policy moved away from the reference
    line = json.loads((tmp_path / "full" / "rollouts.jsonl").read_text().splitlines()[0])
    assert set(line) == {"step", "prompt", "completion", "reward", "logprob", "decoding"}
    assert line["decoding"]["order"] == "random" and line["decoding"]["estimator"] == "exact"

    cut = tmp_path / "cut"
    ck = lambda s: (cut / "checkpoints" / str(s)).is_dir()  # noqa: E731 (a committed Orbax step)
    # 1) kill -9 once checkpoint 2 is committed and step 3 is done (it pauses 1 s after each step)
    proc = _spawn_rl(args + [f"run_dir={cut}"], compile_cache, 1.0, tmp_path / "log1.txt")
    wait_for(lambda: ck(2) and max(_steps_logged(cut) or [0]) >= 3, proc, what="checkpoint 2 and step 3")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not ck(4), "the kill came too late: the run had finished"
    assert not (cut / "final").exists() and max(_steps_logged(cut)) == 3  # step 3 is lost and will be redone
    # 2) the same command again resumes from checkpoint 2 and runs to the end
    proc = _spawn_rl(args + [f"run_dir={cut}"], compile_cache, 0.0, tmp_path / "log2.txt")
    assert proc.wait(timeout=300) == 0, (tmp_path / "log2.txt").read_text()
    out = (tmp_path / "log2.txt").read_text()
    assert f"resumed from {cut}/checkpoints/2" in out
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in out  # the default mesh: FSDP over the 8 devices
    # every deterministic metric, the rollout log and the final params equal the uninterrupted run's
    assert _exact_metrics(cut) == _exact_metrics(tmp_path / "full")
    assert (cut / "rollouts.jsonl").read_text() == (tmp_path / "full" / "rollouts.jsonl").read_text()
    from a3jax.checkpoint import load_params
    _, a = load_params(str(tmp_path / "full" / "final"))
    _, b = load_params(str(cut / "final"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- the mdlm arm


MDLM = dataclasses.replace(CFG, objective="mdlm", mask_token_id=259)


@pytest.mark.slow  # its own decoder and update compiles (about 13 s on 2 cores)
def test_mdlm_arm_one_step_estimate_and_loop(tmp_path):
    params = numpy_init(MDLM, 1)
    est = policy.estimator_for(MDLM)
    assert est.name == "one_step" and not est.exact
    roll = rollout.generate_group(MDLM, params, PROMPTS[:2], 2, 6, DecodeSpec(order="random", group_size=2), 1.0, 0,
                                  1.0, seed=0, buffer_length=16)
    assert roll.target.sum(1).min() >= 1 and len(set(map(tuple, roll.completions))) > 1
    batch = {k: jnp.asarray(v) for k, v in roll.batch().items()}
    fn = grpo.make_logprobs(MDLM, est, grpo.Hyper(mask_prob=0.0))
    lp = np.asarray(fn(params, batch, jax.random.PRNGKey(0), policy.sampled(1.0)))
    # mask_prob 0: the completion fully masked, the prompt intact, one bidirectional pass
    xt = np.where(roll.target, 259, roll.tokens)
    logits = apply_model(MDLM, params, jnp.asarray(xt), batch["positions"], jnp.zeros_like(batch["groups"]),
                         batch["segment_ids"], "content")
    logits = logits.at[..., 259].set(-jnp.inf)
    want = np.where(roll.target, np.asarray(token_logprobs(logits, batch["tokens"])), 0.0)
    np.testing.assert_allclose(lp, want, rtol=1e-5, atol=1e-5)
    masked = grpo.make_logprobs(MDLM, est, grpo.Hyper(mask_prob=0.5))
    a, b = (np.asarray(masked(params, batch, jax.random.PRNGKey(k), policy.sampled(1.0))) for k in (1, 2))
    assert not np.allclose(a, b), "prompt masking draws from the key"
    save_params(str(tmp_path / "mdlm"), MDLM, params)
    # with a unit_tests reward too: the metrics say once (step 0) how its programs are isolated
    cfg = rl_config.load(None, _overrides(str(tmp_path / "mdlm"), tmp_path, steps=1, rewards=(
        "[{name: regex, args: {pattern: '[a-z]'}}, {name: unit_tests, weight: 0.5, args: {timeout_s: 2}}]")))
    logged = []
    recs = loop.run(cfg, log=logged.append)
    assert [r["step"] for r in recs] == [0, 1] and np.isfinite(recs[1]["loss"])
    iso = recs[0]["reward_isolation"]["unit_tests"]
    assert iso["mode"] == probe(sys.executable)[0] and iso["timeout_s"] == 2
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0]) == recs[0]
    assert sum("reward unit_tests: programs run in the sandbox" in ln for ln in logged) == 1
    line = json.loads((tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()[0])
    assert line["decoding"]["estimator"] == "one_step"
