"""Training: optimizer/schedule, FLOPs formula, loss decrease, 2x4 mesh == one device, gradient
accumulation, curriculum stages in the logs, plot and CLI."""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from a3jax.checkpoint import load_params
from a3jax.config import MeshConfig, ModelConfig, OptimizerConfig, load_config
from a3jax.data import make_train_iterator, stage_for_step
from a3jax.data.checks import mean_group_size
from a3jax.model import init_params, param_shapes, param_shardings
from a3jax.sharding import activate, batch_sharding, make_mesh, rules_of
from a3jax.train import metrics as M
from a3jax.train.cli import cli_main as train_main
from a3jax.train.plot import cli_main as plot_main
from a3jax.train.state import create_state, decay_mask, make_optimizer, make_schedule, state_shardings
from a3jax.layout import LAYOUT_KEYS
from a3jax.train.step import make_train_step
from a3jax.checkpoint import copy_tokenizer
from a3jax.train.hooks import Hook, Hooks
from a3jax.train.trainer import CheckpointPolicy, batch_stage, cut_stages, train
from train_helpers import compile_cache, corpus, read_jsonl, tiny_config  # noqa: F401 (fixtures by name)


# ----------------------------------------------------------------------------- pieces


def test_decay_mask_matrices_only():
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    shapes = param_shapes(cfg)
    mask = decay_mask(jax.tree.map(lambda s: jnp.zeros(s), shapes, is_leaf=lambda x: isinstance(x, tuple)))
    assert mask["query_embed"] is False and mask["final_norm"] is False
    assert mask["layers"]["attn_norm"] is False and mask["layers"]["mlp_norm"] is False  # [L, E] yet no decay
    for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        assert mask["layers"][k] is True
    assert mask["embed"] is True and mask["lm_head"] is True


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warmup_then_decay(kind):
    opt = OptimizerConfig(learning_rate=1e-3, warmup_steps=10, schedule=kind, end_learning_rate_fraction=0.1)
    s = make_schedule(opt, 110)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(5e-4)
    assert float(s(10)) == pytest.approx(1e-3)
    end = {"cosine": 1e-4, "linear": 1e-4, "constant": 1e-3}[kind]
    assert float(s(110)) == pytest.approx(end, rel=1e-4)
    if kind != "constant":
        assert float(s(60)) < 1e-3 and float(s(60)) > end


def test_flops_formula_and_peak_table():
    cfg = ModelConfig(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                      vocab_size=128256, tie_word_embeddings=True)
    ar = M.forward_flops_per_token(cfg, 2048, "ar")
    a3 = M.forward_flops_per_token(cfg, 2048, "a3")
    # AR forward ~ 2 * (non-embedding params) + attention + lm_head, the textbook count.
    n_layer = 16 * (2048 * 2048 * 2 + 2 * 2048 * 512 + 3 * 2048 * 8192)
    assert ar == pytest.approx(2 * n_layer + 16 * 2 * 2048 * 2048 + 2 * 2048 * 128256)
    # Two streams: a bit under 2x (no query K/V, no last-layer content update, one lm_head).
    assert 1.7 < a3 / ar < 2.0
    assert M.train_flops_per_token(cfg, 2048) == 3 * a3
    assert M.peak_flops_per_device("TPU v5 lite") == 197e12
    assert M.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert M.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert M.peak_flops_per_device("cpu") is None
    assert M.peak_flops_per_device("cpu", override=1e12) == 1e12


def _step_metrics(loss, nonfinite=0, grad_norm=1.0):
    return {"loss": loss, "accuracy": 0.5, "grad_norm": grad_norm, "lr": 1e-3, "z_loss": 0.0, "param_norm": 2.0,
            "nonfinite": nonfinite}


def test_metrics_window_record_and_resume_from_progress():
    """The log record of a window (non-finite steps left out of the means, running totals) and a window
    rebuilt from a checkpoint's progress dict (JSON) giving the same record as the uninterrupted one."""
    make = lambda progress=None, start=0: M.MetricsWindow(100, n_devices=2, flops_per_token=6.0, peak_flops=1e3,  # noqa: E731
                                                          start_step=start, progress=progress)
    w = make(start=3)
    assert w.tokens_seen == 300 and w.progress()["window"] == []
    w.add(4, 0, _step_metrics(3.0), 1.0)
    w.add(5, 1, _step_metrics(float("nan"), nonfinite=1), 2.0)
    saved = json.loads(json.dumps(w.progress()))  # what a checkpoint at step 5 holds
    w.add(6, 1, _step_metrics(1.0, grad_norm=0.5), 4.0)
    resumed = make(progress=saved, start=5)
    resumed.add(6, 1, _step_metrics(1.0, grad_norm=0.5), 4.0)
    timing = ("step_time_s", "tokens_per_s", "tokens_per_s_per_device", "mfu")
    rec, rec2 = w.record(6, 1, "random:4"), resumed.record(6, 1, "random:4")
    assert {k: v for k, v in rec.items() if k not in timing} == {k: v for k, v in rec2.items() if k not in timing}
    assert rec["loss"] == 2.0 and rec["stage_loss"] == {"0": 3.0, "1": 1.0}  # the NaN step is left out
    assert rec["group_size"] == pytest.approx(7 / 3) and rec["grad_norm"] == 0.5
    assert rec["skipped_nonfinite"] == 1 and rec["tokens_seen"] == 600
    # step times: two of the three steps (the first of the process includes the compile)
    assert rec["step_time_s"] > 0 and rec["mfu"] == pytest.approx(6.0 * rec["tokens_per_s"] / 2e3)
    assert rec2["step_time_s"] is None and rec2["mfu"] is None  # the resumed window timed only its first step
    assert w.steps == [] and w.step_times == []  # a record empties the window
    line = M.log_line(rec, 10)
    assert line.startswith("step 6/10 stage 1 (random:4) loss 2.0000 gnorm 0.500 lr 1.00e-03 ")
    assert "tok/s" in line and "mfu" in line and "tok/s" not in M.log_line(rec2, 10)


def test_metrics_reader_skips_torn_lines_and_splits_kinds(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write('{"step": 1, "kind": "train", "loss": 2.0}\n{"step": 1, "kind": "eval", "loss": {"ar": 3.0}}\n'
                '{"step": 2, "kind": "tr')  # a line torn by a kill
    assert [r["kind"] for r in M.read_records(str(tmp_path / "metrics.jsonl"))] == ["train", "eval"]
    train_recs, eval_recs = M.read_metrics(str(tmp_path))
    assert [r["loss"] for r in train_recs] == [2.0] and eval_recs[0]["loss"] == {"ar": 3.0}
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        M.read_metrics(str(tmp_path / "nowhere"))


class _FakeCheckpoints:
    directory = "/run/checkpoints"

    def __init__(self):
        self.saved = []

    def save(self, step, state, data_iter, config_dict, progress):
        if step in self.saved:
            return False
        self.saved.append(step)
        return True


class _Quiet:
    def message(self, line):
        pass


def test_checkpoint_policy_when_to_save():
    ck = _FakeCheckpoints()
    policy = CheckpointPolicy(ck, total=10, end=6, config_dict={}, sink=_Quiet(), last_good=2)
    assert policy.at_planned_stop(6, interrupted=0) and not policy.at_planned_stop(6, interrupted=15)
    assert not CheckpointPolicy(ck, 10, 10, {}, _Quiet()).at_planned_stop(10, 0)  # the end is saved anyway
    assert policy.last_good_text() == "last good checkpoint: /run/checkpoints/2"
    policy.save(4, None, None, {})
    policy.save(4, None, None, {})  # exists: not saved again
    assert ck.saved == [4] and policy.last_good == 4
    assert CheckpointPolicy(ck, 10, 10, {}, _Quiet()).last_good_text() == "no checkpoint saved yet"


def test_hooks_say_how_often_they_run():
    due = lambda hook: [s for s in range(1, 11) if hook.due(s, 10)]  # noqa: E731
    assert due(Hook(print, every=4)) == [4, 8, 10]  # every 4 and the last step
    assert due(Hook(print, every=0)) == [10]  # only at the end (checkpoint.every=0, final/)
    assert due(Hook(print, every=3, at_end=False)) == [3, 6, 9]
    hooks = Hooks(10)
    a, b = hooks.add(print, every=5), hooks.add(len, every=2, name="b")
    assert hooks.due(4) == [b] and hooks.due(10) == [a, b] and hooks.due(7) == []
    assert (a.name, b.name) == ("print", "b")


def test_final_carries_the_tokenizer_files(tmp_path):
    src = tmp_path / "tok"
    src.mkdir()
    for name, text in (("tokenizer.json", "{}"), ("tokenizer_config.json", '{"a": 1}'), ("other.txt", "x")):
        (src / name).write_text(text)
    for spec in (str(src), str(src / "tokenizer.json")):  # a model directory or its tokenizer.json
        out = tmp_path / f"out{len(spec)}"
        out.mkdir()
        assert copy_tokenizer(spec, str(out)) == ["tokenizer.json", "tokenizer_config.json"]
        assert sorted(os.listdir(out)) == ["tokenizer.json", "tokenizer_config.json"]
        assert (out / "tokenizer_config.json").read_text() == '{"a": 1}'
    assert copy_tokenizer("byte", str(tmp_path)) == []  # the byte tokenizer has no files


def test_eta_in_piped_log_lines_and_cut_curriculum_named():
    rec = dict(step=25, stage=1, strategy="random:4", loss=1.0, grad_norm=1.0, lr=1e-3, tokens_per_s=100.0,
               step_time_s=2.5, mfu=None)
    assert M.log_line(rec, 4025).endswith(" eta 02:46:40")  # 4000 steps x 2.5 s
    assert "eta" not in M.log_line(dict(rec, step_time_s=None, tokens_per_s=None), 4025)  # first step: no timing
    cfg = load_config(None, ["data.stages=[{ar: 4}, {blocks:2: 4}, {random:4: 4}]", "train.steps=6",
                             "train.optimizer.warmup_steps=1"])
    assert cut_stages(cfg) == "stage 1 (blocks:2) runs 2 of its 4 steps; stage 2 (random:4, 4 steps) will not run"
    assert cut_stages(load_config(None, ["data.stages=[{ar: 4}, {blocks:2: 4}]"])) == ""


def test_batch_stage_comes_from_the_batch():
    assert batch_stage({"stage": np.array([2, 2, 2], np.int32)}, 7) == 2
    with pytest.raises(RuntimeError, match="step 7 has no 'stage' field"):
        batch_stage({"tokens": np.zeros((3, 4))}, 7)
    with pytest.raises(RuntimeError, match=r"mixes curriculum stages \[0, 1\]"):
        batch_stage({"stage": np.array([0, 1, 1])}, 7)


def test_mean_group_size_counts_runs_of_segment_and_group():
    seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]], np.int32)
    grp = np.array([[0, 1, 1, 2, 2, 3], [0, 1, 1, 1, 2, 2]], np.int32)  # groups (seg, grp): 3 + 2 real
    assert mean_group_size({"segment_ids": seg, "groups": grp}) == pytest.approx(9 / 5)
    # a group id shared across a segment boundary is two groups
    assert mean_group_size({"segment_ids": np.array([[1, 2]]), "groups": np.array([[0, 0]])}) == 1.0


# ----------------------------------------------------------------------------- step equivalences


def _setup(corpus, mesh_cfg, microbatches=1, devices=None, batch=8, sgd=False):
    cfg = tiny_config("/unused", corpus, **{"train.microbatches": microbatches, "train.global_batch_size": batch,
                                            "train.optimizer.warmup_steps": 0})
    mesh = make_mesh(mesh_cfg, devices)
    rules = rules_of(mesh_cfg)
    opt, sched = make_optimizer(cfg.train.optimizer, 10)
    if sgd:  # params move by exactly -grad: compares gradients without Adam's amplification of tiny ones
        opt, sched = optax.sgd(1.0), optax.constant_schedule(1.0)
    psh = param_shardings(cfg.model, mesh, rules)
    ssh = state_shardings(opt, psh, param_shapes(cfg.model), mesh)
    bsh = batch_sharding(mesh, rules)
    step = make_train_step(cfg, opt, sched, ssh, bsh, mesh)
    return cfg, mesh, rules, opt, sched, ssh, bsh, step


def _host_params(cfg):
    return jax.device_get(init_params(cfg.model, jax.random.PRNGKey(0)))


def _batches(cfg, n):
    it = make_train_iterator(cfg.data, cfg.train.global_batch_size)
    return [{k: b[k] for k in LAYOUT_KEYS} for b in (next(it) for _ in range(n))]


@pytest.fixture(scope="module")
def host_data(corpus):
    """Initial params and two batches of the tiny config (shared: each costs a compile / a data load)."""
    cfg = tiny_config("/unused", corpus)
    return _host_params(cfg), _batches(cfg, 2)


def _run(cfg, mesh, rules, opt, ssh, bsh, step, params, batches):
    state = create_state(jax.device_put(params, ssh.params), opt, 0, ssh)
    out = []
    for b in batches:
        gb = jax.device_put(b, bsh)
        with activate(mesh, rules):
            state, m = step(state, gb)
        out.append(jax.device_get(m))
    return jax.device_get(state), out


@pytest.mark.slow
def test_2x4_mesh_equals_single_device(corpus, host_data):
    """Two steps on one device vs on a 2x4 (fsdp x tensor) mesh of fake devices. SGD(lr=1) so the params
    move by exactly -grad: the comparison is on gradients (Adam would turn fp32 reduction-order noise
    in near-zero gradients into full-size sign flips). Tolerances (fp32): loss rtol 1e-5, grad norm
    rtol 1e-4, params/gradients rtol 1e-4 + atol 1e-7."""
    one = _setup(corpus, MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1], sgd=True)
    params, batches = host_data
    s1, m1 = _run(*one[:4], *one[5:], params, batches)
    many = _setup(corpus, MeshConfig(data=1, fsdp=2, tensor=4), sgd=True)
    assert dict(many[1].shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    s8, m8 = _run(*many[:4], *many[5:], params, batches)
    for a, b in zip(m1, m8):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), s1.params, s8.params)
    assert int(s1.step) == int(s8.step) == 2
    # the update actually moved the params (so the comparison is not vacuous)
    assert np.abs(s1.params["embed"] - params["embed"]).max() > 1e-3


@pytest.mark.slow
def test_grad_accumulation_equals_big_batch(corpus, host_data):
    mesh_cfg = MeshConfig(data=1, fsdp=2, tensor=1)
    devs = jax.devices()[:2]
    big = _setup(corpus, mesh_cfg, microbatches=1, devices=devs, batch=8, sgd=True)
    acc = _setup(corpus, mesh_cfg, microbatches=4, devices=devs, batch=8, sgd=True)
    params, batches = host_data[0], host_data[1][:1]
    # the microbatches hold different numbers of target tokens: normalisation must use the whole batch
    tm = (batches[0]["loss_mask"] * (batches[0]["segment_ids"] > 0)).reshape(2, 4, -1).swapaxes(0, 1).sum((1, 2))
    assert len(set(tm.tolist())) > 1
    sb, mb = _run(*big[:4], *big[5:], params, batches)
    sa, ma = _run(*acc[:4], *acc[5:], params, batches)
    np.testing.assert_allclose(mb[0]["loss"], ma[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(mb[0]["grad_norm"], ma[0]["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(mb[0]["accuracy"], ma[0]["accuracy"], rtol=1e-6)
    # params - grad: gradients equal to fp32 summation-order noise (grads are O(1e-2), noise O(1e-8))
    grad = lambda s: jax.tree.map(lambda new, old: old - new, s.params, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grad(sb), grad(sa))
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grad(sb))) > 1e-3  # not vacuous


# ----------------------------------------------------------------------------- whole runs


@pytest.mark.slow
def test_loss_decreases_and_curriculum_logged(corpus, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", corpus, **{
        "data.stages": "[{ar: 16}, {blocks:2: 6}, {random:4: 8}]", "train.log_every": 1,
        "train.eval_every": 16, "checkpoint.every": 0, "mesh.fsdp": 1, "mesh.tensor": 1, "mesh.data": -1,
        # mixed precision: bf16 compute with fp32 master weights / optimizer state
        "model.dtype": "bfloat16", "train.optimizer.learning_rate": 1e-2})
    out = train(cfg, progress_bar=False)
    recs = [r for r in read_jsonl(cfg.run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in recs] == list(range(1, 31))
    # logged stage/strategy switch exactly at the configured steps (step n covers batch n-1)
    for r in recs:
        st, name = stage_for_step(cfg.data.stages, r["step"] - 1)
        assert (r["stage"], r["strategy"]) == (st, name)
    # ... and the data really changed: mean group size 1 under AR, ~2 under blocks:2, ~4 under random:4
    gs = {st: np.mean([r["group_size"] for r in recs if r["stage"] == st]) for st in (0, 1, 2)}
    assert gs[0] == 1.0 and 1.6 < gs[1] <= 2.0 and 3.0 < gs[2] <= 4.0, gs
    # the loss falls from ~ln(260)=5.56 on the learnable corpus within the AR stage (16 steps)
    first, last_ar = recs[0]["loss"], np.mean([r["loss"] for r in recs[12:16]])
    assert first > 5.0 and last_ar < first - 2.0, (first, last_ar)
    evals = [r for r in read_jsonl(cfg.run_dir) if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [16, 30] and set(evals[0]["loss"]) == {"ar", "random:4"}
    assert evals[1]["loss"]["ar"] < first - 2.0
    assert out["step"] == 30 and out["stage"] == 2 and out["eval"]["ar"] == evals[1]["loss"]["ar"]
    # the final checkpoint holds fp32 params and optimizer state although compute was bf16
    meta = ocp.StandardCheckpointer().metadata(os.path.join(cfg.run_dir, "checkpoints", "30", "state"))
    tree = getattr(meta, "item_metadata", meta)
    dtypes = {str(getattr(x, "dtype", "")) for x in jax.tree.leaves(dict(tree)["params"])}
    assert dtypes == {"float32"}, dtypes
    for key in ("grad_norm", "lr", "tokens_per_s", "step_time_s", "tokens_seen"):
        assert recs[-1][key] is not None and recs[-1][key] > 0
    assert os.listdir(os.path.join(cfg.run_dir, "tensorboard"))
    # a3jax plot draws it
    assert plot_main([cfg.run_dir]) == 0
    png = os.path.join(cfg.run_dir, "loss.png")
    assert os.path.getsize(png) > 10_000 and open(png, "rb").read(4) == b"\x89PNG"
    # piped (no bar) log lines carry an ETA; the last step wrote RUN_DIR/final, a params checkpoint
    # holding the last step's params
    logged = capsys.readouterr().out
    assert re.search(r"step 29/30 .* eta 00:00:\d\d", logged), logged[-2000:]
    assert "final params -> " in logged
    mcfg, final = load_params(os.path.join(cfg.run_dir, "final"))
    assert (mcfg.objective, mcfg.num_layers, mcfg.hidden_size) == ("a3", 2, 32)
    last = ocp.StandardCheckpointer().restore(os.path.join(cfg.run_dir, "checkpoints", "30", "state"))["params"]
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), final, last)


def test_cli_help_and_bad_override(capsys):
    assert train_main(["--help"]) == 0
    assert "a3jax train" in capsys.readouterr().out
    assert train_main(["train.no_such_key=1"]) == 1
    assert "no_such_key" in capsys.readouterr().err
