"""a3jax.distributed: how the environment maps to a multi-process job, and a real 2-process x 2-device
run on loopback (launch/local.sh -> a3jax train -> initialize()) checked against one process with 4
devices: same losses, same final params, per-process Grain iterator states saved and restored."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from a3jax import distributed as dist
from a3jax.cli import DEVICE_COMMANDS, main
from a3jax.distributed import DistributedError, Plan, first_slurm_host, plan_from_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- plan_from_env


def test_nothing_set_is_single_process():
    assert plan_from_env({}, tpu_present=False) == Plan("single", source="no distributed environment")


def test_explicit_variables():
    p = plan_from_env({"A3JAX_COORDINATOR": "10.0.0.2:1234", "A3JAX_NUM_PROCESSES": "4",
                       "A3JAX_PROCESS_ID": "3", "A3JAX_LOCAL_DEVICE_IDS": "0,1"}, tpu_present=True)
    assert (p.mode, p.coordinator, p.num_processes, p.process_id, p.local_device_ids) == \
        ("env", "10.0.0.2:1234", 4, 3, (0, 1))
    assert "process 3 of 4" in p.describe()


def test_explicit_one_process_is_single():
    p = plan_from_env({"A3JAX_COORDINATOR": "h:1", "A3JAX_NUM_PROCESSES": "1", "A3JAX_PROCESS_ID": "0"},
                      tpu_present=False)
    assert p.mode == "single"


@pytest.mark.parametrize("env, match", [
    ({"A3JAX_COORDINATOR": "h:1"}, "A3JAX_NUM_PROCESSES, A3JAX_PROCESS_ID missing"),
    ({"A3JAX_COORDINATOR": "h:1", "A3JAX_NUM_PROCESSES": "2", "A3JAX_PROCESS_ID": "2"},
     "A3JAX_PROCESS_ID=2 is not below A3JAX_NUM_PROCESSES=2"),
    ({"A3JAX_COORDINATOR": "nohost", "A3JAX_NUM_PROCESSES": "2", "A3JAX_PROCESS_ID": "0"},
     "A3JAX_COORDINATOR='nohost' must look like host:port"),
    ({"A3JAX_COORDINATOR": "h:1", "A3JAX_NUM_PROCESSES": "two", "A3JAX_PROCESS_ID": "0"},
     "A3JAX_NUM_PROCESSES='two' is not an integer"),
    ({"A3JAX_DISTRIBUTED": "mpi"}, "A3JAX_DISTRIBUTED='mpi' is not one of"),
    ({"A3JAX_DISTRIBUTED": "env"}, "A3JAX_DISTRIBUTED=env but"),
    ({"A3JAX_DISTRIBUTED": "slurm"}, "SLURM_PROCID / SLURM_NTASKS are not set"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "no SLURM_STEP_NODELIST"),
    ({"A3JAX_LOCAL_DEVICE_IDS": "0,x"}, "A3JAX_LOCAL_DEVICE_IDS='0,x'"),
])
def test_bad_environments_name_the_variable(env, match):
    with pytest.raises(DistributedError, match=match):
        plan_from_env(env, tpu_present=False)


@pytest.mark.parametrize("nodes, host", [
    ("node001", "node001"), ("node001,gpu7", "node001"), ("node[007-010,012],gpu1", "node007"),
    ("node[003,007-015]", "node003"), ("rack1-[3-4]", "rack1-3"), ("a-b-c", "a-b-c"),
])
def test_first_slurm_host(nodes, host):
    assert first_slurm_host(nodes) == host


def test_slurm_variables():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "4242",
           "SLURM_NODELIST": "gpu[03-06]", "SLURM_STEP_NODELIST": "gpu[04-06]"}
    p = plan_from_env(env, tpu_present=False)
    assert (p.mode, p.coordinator, p.num_processes, p.process_id) == ("slurm", f"gpu04:{4242 % 4096 + 61440}", 4, 1)
    # A3JAX_* wins over each SLURM value; the port alone can be set too.
    p = plan_from_env({**env, "A3JAX_COORDINATOR_PORT": "9999"}, tpu_present=False)
    assert p.coordinator == "gpu04:9999"
    p = plan_from_env({**env, "A3JAX_COORDINATOR": "head:1", "A3JAX_PROCESS_ID": "3"}, tpu_present=False)
    assert (p.coordinator, p.process_id, p.num_processes) == ("head:1", 3, 4)
    assert plan_from_env({**env, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, tpu_present=False).mode == "single"
    assert plan_from_env({**env, "A3JAX_DISTRIBUTED": "none"}, tpu_present=False).mode == "single"


def test_tpu_vm_is_auto_discovered():
    assert plan_from_env({}, tpu_present=True).mode == "tpu"
    assert plan_from_env({"A3JAX_DISTRIBUTED": "tpu"}, tpu_present=False).mode == "tpu"
    # Explicit variables win over the TPU discovery.
    p = plan_from_env({"A3JAX_COORDINATOR": "h:1", "A3JAX_NUM_PROCESSES": "2", "A3JAX_PROCESS_ID": "1"},
                      tpu_present=True)
    assert p.mode == "env"
    assert dist.tpu_chips_present() is False  # this CPU host


def test_initialize_is_idempotent_and_passes_the_plan(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(dist, "_PLAN", None)
    env = {"A3JAX_COORDINATOR": "127.0.0.1:5555", "A3JAX_NUM_PROCESSES": "2", "A3JAX_PROCESS_ID": "1",
           "A3JAX_INIT_TIMEOUT": "17"}
    assert dist.is_main_process()  # before initialize: never touches JAX
    first = dist.initialize(env)
    again = dist.initialize({})  # a later call, whatever the environment, returns the first answer
    assert first is again and first.mode == "env"
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert not dist.is_main_process()
    assert calls == [dict(coordinator_address="127.0.0.1:5555", num_processes=2, process_id=1,
                          local_device_ids=None, initialization_timeout=17)]
    monkeypatch.setattr(dist, "_PLAN", None)
    calls.clear()
    assert dist.initialize({}).mode == "single" and calls == []  # nothing set: JAX untouched
    assert dist.is_main_process()


# ----------------------------------------------------------------------------- the real thing

CONFIG = """\
model:
  vocab_size: 260
  hidden_size: 32
  intermediate_size: 64
  num_layers: 2
  num_heads: 4
  num_kv_heads: 2
  max_position_embeddings: 64
data:
  source: stdlib
  seq_len: 32
  max_documents: 40
  prefetch: 0
  stages:
    - {strategy: ar, steps: 2}
    - {strategy: "random:4", steps: 2}
mesh: {data: 1, fsdp: -1, tensor: 1}
train:
  global_batch_size: 8
  log_every: 1
  eval_every: 0
  optimizer: {warmup_steps: 1, learning_rate: 0.01}
checkpoint: {every: 2, max_to_keep: 5, async_save: true}
"""


def _xla_flags(devices: int) -> str:
    """The caller's XLA flags (the suite's optimisation level: launch/local.sh keeps them too) with
    this fake device count."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
    return " ".join(flags.split() + [f"--xla_force_host_platform_device_count={devices}"])


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("A3JAX_", "SLURM_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, A3JAX_PYTHON=sys.executable, **extra)
    return env


def _train_records(run_dir) -> dict:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "train":
                out[r["step"]] = r
    return out


def _load_state(path) -> list:
    """All arrays of a saved TrainState as numpy, whatever mesh wrote them."""
    ck = ocp.PyTreeCheckpointer()
    meta = ck.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return jax.tree_util.tree_flatten_with_path(ck.restore(path, args=ocp.args.PyTreeRestore(restore_args=args)))[0]


@pytest.mark.slow
def test_two_processes_on_loopback_match_one_process(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    ref_dir, mp_dir = tmp_path / "ref", tmp_path / "mp"
    local = [os.path.join(ROOT, "launch", "local.sh"), "--devices", "2"]
    # No shared persistent compilation cache here: with jax 0.12 a 2-process CPU job that loads its
    # programs from that cache hangs in its first cross-process collective.
    # The single-process 4-device reference runs alongside the first multi-process job.
    ref = subprocess.Popen([sys.executable, "-m", "a3jax", "train", str(cfg), f"run_dir={ref_dir}", "--no-progress"],
                           env=_clean_env(XLA_FLAGS=_xla_flags(4)), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = subprocess.run(local + ["--log-dir", str(tmp_path / "logs1"), "2", str(cfg), f"run_dir={mp_dir}",
                                    "--no-progress", "--stop-at-step", "2"],
                           env=_clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=400)
    ref_out = ref.communicate(timeout=400)[0]
    assert ref.returncode == 0, ref_out[-3000:]
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    log0 = (tmp_path / "logs1" / "process_0.log").read_text()
    log1 = (tmp_path / "logs1" / "process_1.log").read_text()
    assert "4 cpu devices, 2 process(es)" in log0 and "done: step 2" in log0
    assert "[a3jax train]" not in log1  # logging is process 0's job
    assert sorted(os.listdir(mp_dir / "checkpoints")) == ["2"]

    # Both processes wrote their Orbax shards and their own Grain iterator state.
    ck2 = mp_dir / "checkpoints" / "2"
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(ck2 / "state"))
    for p in (0, 1):
        assert json.loads((ck2 / "data" / f"process_{p}-of-2.json").read_text())["next_index"] == 2

    # Restart both processes: they resume from step 2 and finish.
    second = subprocess.run(local + ["--log-dir", str(tmp_path / "logs2"), "2", str(cfg), f"run_dir={mp_dir}",
                                     "--no-progress"],
                            env=_clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log0 = (tmp_path / "logs2" / "process_0.log").read_text()
    assert "resumed from checkpoint 2" in log0 and "done: step 4" in log0
    assert "restarts at batch" not in log0  # the iterator state was restored, not re-derived
    for p in (0, 1):
        assert json.loads((mp_dir / "checkpoints" / "4" / "data" / f"process_{p}-of-2.json").read_text()) \
            ["next_index"] == 4

    # Same losses at every step (steps 1-2 from the first job, 3-4 from the resumed one) ...
    ref_rec, mp_rec = _train_records(ref_dir), _train_records(mp_dir)
    assert sorted(ref_rec) == sorted(mp_rec) == [1, 2, 3, 4]
    for s in ref_rec:
        assert ref_rec[s]["strategy"] == mp_rec[s]["strategy"]
        np.testing.assert_allclose(mp_rec[s]["loss"], ref_rec[s]["loss"], rtol=1e-6, err_msg=f"step {s}")
        np.testing.assert_allclose(mp_rec[s]["grad_norm"], ref_rec[s]["grad_norm"], rtol=1e-5)
    assert ref_rec[4]["loss"] < ref_rec[1]["loss"] - 0.1  # it trained
    # ... and the same final state (params, AdamW moments, step). Only the reduction order differs
    # (rows of a global batch sit on other devices, and the all-reduce crosses processes).
    ref_state = _load_state(ref_dir / "checkpoints" / "4" / "state")
    mp_state = _load_state(mp_dir / "checkpoints" / "4" / "state")
    assert [k for k, _ in ref_state] == [k for k, _ in mp_state] and len(ref_state) > 20
    for (k, a), (_, b) in zip(ref_state, mp_state):
        assert a.shape == b.shape and a.dtype == b.dtype, k
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=str(k))


def test_device_commands_join_the_job_first_and_report_bad_env(capsys, monkeypatch):
    """generate/infill/score/eval/demo call distributed.initialize() before anything else: a half-set
    environment is a clear error naming the missing variables, not a hang or a single-process run."""
    monkeypatch.setenv("A3JAX_COORDINATOR", "127.0.0.1:1")
    monkeypatch.delenv("A3JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("A3JAX_PROCESS_ID", raising=False)
    for name in sorted(DEVICE_COMMANDS):
        assert main([name, "--ckpt", "/nonexistent"]) == 1
        err = capsys.readouterr().err
        assert f"a3jax {name}:" in err and "A3JAX_NUM_PROCESSES" in err, err


def test_cli_leaves_out_an_absent_tpu_so_libtpu_stays_quiet():
    """libtpu is a dev requirement (for `a3jax compile`); on a host without TPU chips the CLI must not
    make JAX probe it (libtpu would log worker/metadata errors on every command)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES",
                                                             "TPU_ACCELERATOR_TYPE", "TPU_SKIP_MDS_QUERY")}
    code = ("from a3jax.cli import skip_absent_tpu; skip_absent_tpu(); import os, jax; "
            "print(os.environ.get('JAX_PLATFORMS'), jax.devices()[0].platform)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if importlib.util.find_spec("libtpu") is not None:
        assert out.stdout.split() == ["cpu", "cpu"], out.stdout
        assert "TPU_WORKER_HOSTNAMES" not in out.stderr and "TPU_ACCELERATOR_TYPE" not in out.stderr, out.stderr
    else:
        assert out.stdout.split()[-1] == "cpu"
