"""A non-editable install: the wheel, installed into a fresh venv and run from another directory, still
resolves the named configs (`model=llama3.2-1b`, `data=curriculum/paper`) shipped as package data.
`make install ACCEL=...` (read with `make -n`: nothing is installed) adds the JAX CUDA plugin of the
venv's own jax version, and refuses an unknown ACCEL by name."""
import glob
import importlib.metadata
import os
import shutil
import site
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Every subprocess runs without PYTHONPATH: with the checkout on it, pip would see this source tree's
# a3jax (and the a3jax.egg-info a build leaves) as already installed and skip the wheel.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run(cmd, **kw):
    kw.setdefault("env", ENV)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_finds_its_configs(tmp_path):
    # Built from a copy, so the build's egg-info and build/ never land in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache", "results"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)])
    (wheel,) = glob.glob(str(wheels / "a3jax-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    vpy = str(venv / "bin" / "python")
    _run([sys.executable, "-m", "pip", "--python", vpy, "install", "-q", "--no-deps", "--no-index", wheel])
    # The dependencies (jax, flax, ...) come from this interpreter's site-packages, added by a .pth
    # line: a path added that way does not run the .pth files in it, so this checkout's editable
    # install stays invisible and only the wheel provides `a3jax`.
    (vsite,) = glob.glob(str(venv / "lib" / "python*" / "site-packages"))
    with open(os.path.join(vsite, "deps.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(ENV, JAX_PLATFORMS="cpu")
    r = _run([str(venv / "bin" / "a3jax"), "train", "--help"], cwd=elsewhere, env=env)
    assert "CONFIG" in r.stdout
    probe = textwrap.dedent("""
        import a3jax, a3jax.config as c
        print(a3jax.__file__)
        cfg = c.load_config(None, ["model=llama3.2-1b", "data=curriculum/paper"])
        print(cfg.model.hidden_size, cfg.model.rope_type, len(cfg.data.stages))
    """)
    out = _run([vpy, "-c", probe], cwd=elsewhere, env=env).stdout.split()
    assert out[0].startswith(vsite), f"a3jax imported from {out[0]}, not from the wheel in {vsite}"
    assert out[1:] == ["2048", "llama3", "5"]


def _make_install_dry_run(*args):
    """`make -n install ARGS` against this interpreter's venv: the commands it would run, run none."""
    env = {k: v for k, v in ENV.items() if k != "ACCEL"}
    return subprocess.run(["make", "-n", "--no-print-directory", "-C", ROOT, "install", f"VENV={sys.prefix}", *args],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("accel", ["cuda12", "cuda13"])
def test_install_accel_adds_the_cuda_plugin_of_the_installed_jax(accel):
    version = importlib.metadata.version("jax")
    r = _make_install_dry_run(f"ACCEL={accel}")
    assert r.returncode == 0, r.stderr
    assert f'{sys.prefix}/bin/pip install -q "jax[{accel}]=={version}"' in r.stdout
    # Both halves of the plugin are looked up on the registry for that exact version first.
    assert f"for pkg in jax-{accel}-plugin jax-{accel}-pjrt" in r.stdout
    assert " " + version.replace(".", "\\.") + "(,|$)" in r.stdout


def test_install_without_accel_adds_no_plugin():
    r = _make_install_dry_run()
    assert r.returncode == 0, r.stderr
    assert "jax[" not in r.stdout and "index versions" not in r.stdout


@pytest.mark.parametrize("accel", ["rocm", "cuda12 cuda13", ""])
def test_unknown_accel_is_refused_by_name(accel):
    r = _make_install_dry_run(f"ACCEL={accel}")
    assert r.returncode != 0
    assert f"ACCEL='{accel}' is not one of: cpu cuda12 cuda13" in r.stderr
    assert "pip" not in r.stdout
