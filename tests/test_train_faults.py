"""Faults: kill -9 and SIGTERM between checkpoints then resume == uninterrupted run, bit for bit on CPU;
restore onto a different mesh; corrupt/partial latest checkpoint -> previous one; NaN stop / skip."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from a3jax.checkpoint import RunCheckpoints
from a3jax.config import MeshConfig
from a3jax.model import param_shapes, param_shardings
from a3jax.sharding import make_mesh, rules_of
from a3jax.train.state import abstract_state, make_optimizer, state_shardings
from a3jax.train.trainer import NonFiniteLossError, train
from train_helpers import (compile_cache, corpus, exact_view, read_jsonl, tiny_config,  # noqa: F401 (fixtures)
                           paused_train_command, tiny_overrides, wait_for)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted 12-step run (checkpoints at 6 and 12) on the default mesh (fsdp = all 8 devices)."""
    cfg = tiny_config(tmp_path_factory.mktemp("ref") / "run", corpus)
    out = train(cfg, progress_bar=False, tensorboard=False)
    assert out["step"] == 12
    return cfg


def _params_of(run_dir, step):
    tree = ocp.StandardCheckpointer().restore(os.path.join(run_dir, "checkpoints", str(step), "state"))
    return jax.device_get(tree["params"])


def _assert_bitwise_equal(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (k, x), (_, y) in zip(la, lb):
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"{jax.tree_util.keystr(k)} differs"


def _spawn(run_dir, corpus, cache_env, sleep=0.0):
    env = dict(os.environ, PYTHONPATH=ROOT, **cache_env)
    cmd = paused_train_command(sleep, ["--no-progress", *tiny_overrides(str(run_dir), corpus,
                                                                        **{"train.eval_batches": 1})])
    log = open(os.path.join(os.path.dirname(str(run_dir)), f"log-{time.time()}.txt"), "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log.name


def _logged_steps(run_dir):
    try:
        return [r["step"] for r in read_jsonl(run_dir) if r["kind"] == "train"]
    except (FileNotFoundError, ValueError):
        return []


@pytest.mark.slow
def test_kill9_and_sigterm_then_resume_equals_uninterrupted(reference, corpus, compile_cache, tmp_path):
    run = tmp_path / "run"
    ck = lambda s: os.path.isdir(os.path.join(run, "checkpoints", str(s)))
    # 1) kill -9 once checkpoint 6 is committed (steps sleep 0.4 s, so we are well before step 12)
    proc, log1 = _spawn(run, corpus, compile_cache, sleep=0.4)
    wait_for(lambda: ck(6) and max(_logged_steps(run) or [0]) >= 8, proc, what="checkpoint 6 and step 8")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not ck(12), "the kill came too late: the run had finished"
    assert max(_logged_steps(run)) >= 8  # work after the checkpoint was lost and will be redone
    # 2) rerun; SIGTERM (preemption) after it logged step 8 again: it must save and exit 143
    proc, log2 = _spawn(run, corpus, compile_cache, sleep=0.4)
    wait_for(lambda: "step 8/12" in open(log2).read(), proc, what="the resumed run's step 8")
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    out2 = open(log2).read()
    assert rc == 128 + signal.SIGTERM, out2
    assert "resumed from checkpoint 6" in out2
    saved = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(run, "checkpoints", "*")))
    assert saved[-1] > 6 and saved[-1] < 12, (saved, out2)
    assert f"signal {int(signal.SIGTERM)} at step {saved[-1]}" in out2
    # 3) rerun to the end
    proc, log3 = _spawn(run, corpus, compile_cache)
    assert proc.wait(timeout=300) == 0, open(log3).read()
    assert f"resumed from checkpoint {saved[-1]}" in open(log3).read()
    # final params and every logged loss equal the uninterrupted run's, bit for bit
    _assert_bitwise_equal(_params_of(run, 12), _params_of(reference.run_dir, 12))
    assert exact_view(read_jsonl(run)) == exact_view(read_jsonl(reference.run_dir))


@pytest.mark.slow
def test_restore_other_mesh_and_corrupt_latest_falls_back(reference, corpus, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference.run_dir, run)
    # (a) checkpoint 6 restores onto a 2x4 (fsdp x tensor) mesh with the new shardings, values identical
    mesh_cfg = MeshConfig(data=1, fsdp=2, tensor=4)
    mesh, rules = make_mesh(mesh_cfg), rules_of(mesh_cfg)
    opt, _ = make_optimizer(reference.train.optimizer, reference.total_steps)
    shapes = param_shapes(reference.model)
    ssh = state_shardings(opt, param_shardings(reference.model, mesh, rules), shapes, mesh)
    ck = RunCheckpoints(str(run), reference.checkpoint)
    state = ck.restore_state(6, abstract_state(opt, shapes, ssh))
    ck.close()
    w = state.params["layers"]["w_gate"]
    assert w.sharding.spec == ssh.params["layers"]["w_gate"].spec and len(w.addressable_shards) == 8
    assert w.addressable_shards[0].data.shape == (2, 16, 16)  # [L, E/fsdp, M/tensor]
    _assert_bitwise_equal(jax.device_get(state.params), _params_of(reference.run_dir, 6))
    # (b) corrupt the latest checkpoint (12) and leave a partial save's tmp directory behind
    for f in glob.glob(os.path.join(run, "checkpoints", "12", "state", "**", "*"), recursive=True):
        if os.path.isfile(f):
            with open(f, "wb") as fh:
                fh.write(b"\x00garbage")
    os.makedirs(os.path.join(run, "checkpoints", "13.orbax-checkpoint-tmp-1234", "state"))
    # (c) rerun on the 2x4 mesh: reports 12, resumes from 6 resharded, continues to 12
    cfg = tiny_config(run, corpus, **{"mesh.fsdp": 2, "mesh.tensor": 4})
    out = train(cfg, progress_bar=False, tensorboard=False)
    assert out["resumed_from"] == 6 and out["step"] == 12
    assert len(glob.glob(os.path.join(run, "checkpoints_bad", "12-*"))) == 1
    assert os.path.isdir(os.path.join(run, "checkpoints", "12"))
    ref = [r for r in read_jsonl(reference.run_dir) if r["kind"] == "train"]
    new = [r for r in read_jsonl(run) if r["kind"] == "train"]
    assert [r["step"] for r in new] == [r["step"] for r in ref]
    # steps 7..12 recomputed on another mesh: equal up to fp32 reduction order
    for a, b in zip(ref, new):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-4, err_msg=f"step {a['step']}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
                 _params_of(run, 12), _params_of(reference.run_dir, 12))


def _nan_config(run_dir, corpus, **extra):
    # lr 1e30 without clipping: step 1 is finite, its update blows the params up, step 2 is not finite.
    return tiny_config(run_dir, corpus, **{
        "train.optimizer.learning_rate": 1e30, "train.optimizer.warmup_steps": 0, "train.optimizer.grad_clip": 0.0,
        "checkpoint.every": 1, "data.stages": "[{ar: 4}]", "train.eval_every": 0, "train.log_every": 1,
        "mesh.fsdp": 1, "mesh.data": -1, **extra})


@pytest.mark.slow
def test_nonfinite_stops_with_step_and_last_checkpoint(corpus, tmp_path):
    cfg = _nan_config(tmp_path / "run", corpus)
    with pytest.raises(NonFiniteLossError) as e:
        train(cfg, progress_bar=False, tensorboard=False)
    msg = str(e.value)
    assert "at step 2" in msg and os.path.join(cfg.run_dir, "checkpoints", "1") in msg
    assert sorted(os.listdir(os.path.join(cfg.run_dir, "checkpoints"))) == ["1"]  # nothing bad saved


def test_nonfinite_skip_keeps_last_good_params(corpus, tmp_path):
    cfg = _nan_config(tmp_path / "run", corpus, **{"train.skip_nonfinite": True})
    out = train(cfg, progress_bar=False, tensorboard=False)
    assert out["step"] == 4 and out["skipped_nonfinite"] == 3
    p1, p4 = _params_of(cfg.run_dir, 1), _params_of(cfg.run_dir, 4)
    _assert_bitwise_equal(p1, p4)  # the skipped updates were never applied
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(p4))
