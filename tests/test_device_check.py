"""bench/device_check.sh --smoke: every part of the prepared GPU check run on this CPU with tiny shapes,
through the same script, parts, timeouts and report as on a GPU host; the one JSON it writes must hold
every part, each ok, with numbers that make sense."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "device_check.sh")


def _reference_dir():
    """A copy of the reference A3 code (make device-bundle REFERENCE=... puts one in .device/reference),
    usable only where torch is."""
    if importlib.util.find_spec("torch") is None:
        return None
    for d in (os.environ.get("A3JAX_REFERENCE_DIR", ""), os.path.join(ROOT, ".device", "reference")):
        if d and os.path.isfile(os.path.join(d, "llama_xlnet.py")):
            return d
    return None


@pytest.mark.slow
def test_smoke_run_reports_every_part_ok(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    bad = subprocess.run(["bash", SCRIPT, "--smoke", "--parts", "tests,bogus"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert bad.returncode == 2 and "unknown part 'bogus'" in bad.stderr

    ref = _reference_dir()
    r = subprocess.run(["bash", SCRIPT, "--smoke"] + (["--reference", ref] if ref else ["--no-reference"]),
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.load(open(tmp_path / "device_check.json"))
    parts = report["parts"]
    assert set(parts) == {"tests", "train", "reference", "decode"}
    for name in ("tests", "train", "decode"):
        assert parts[name]["status"] == "ok", (name, parts[name])
        assert 0 < parts[name]["seconds"] <= parts[name]["timeout_s"]
    assert parts["reference"]["status"] == ("ok" if ref else "skipped: no reference dir")

    tests = parts["tests"]["result"]
    assert (tests["passed"], tests["failures"], tests["errors"]) == (2, 0, 0)
    rows = parts["train"]["result"]["results"]
    assert [r["kernel"] for r in rows] == ["dense", "blockwise"]
    for row in rows:
        for obj in ("a3", "ar"):
            assert row[obj]["tokens_per_s"] > 0 and 0 < row[obj]["mfu"] < 1, row
        # the A3 step runs two streams: more model FLOPs per token than AR's one
        assert row["a3"]["flops_per_token"] > row["ar"]["flops_per_token"]
        assert row["time_ratio"] == pytest.approx(row["a3"]["step_s"] / row["ar"]["step_s"])
    s = report["summary"]
    assert s["best_kernel"] in ("dense", "blockwise") and s["a3_tokens_per_s"] > 0
    assert s["cached_decode_tokens_per_s"] > 0 and s["speculative_tokens_per_s"] > 0
    if ref:
        assert parts["reference"]["result"]["tokens_per_s"] > 0
        assert s["speedup_vs_reference"] == pytest.approx(s["a3_tokens_per_s"] / s["reference_tokens_per_s"])
    assert "targets_met" not in s  # targets are judged on a GPU only
    assert "train step" in r.stdout and "summary:" in r.stdout


def _checkout_without_a3jax(tmp_path):
    """The files device_check.sh needs to reach its wheel installation, without a3jax itself."""
    root = tmp_path / "checkout"
    for rel in ("bench/device_check.sh", "bench/device_report.py", "bench/train.py", "bench/decode.py",
                "bench/reference_a3.py", "tests/conftest.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(open(os.path.join(ROOT, rel), "rb").read())
    return root


def _wheel(folder, name, tag):
    import zipfile
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-1.0-{tag}-{tag}-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", f"TAG = {tag!r}\n")
    return path


def test_bundled_wheels_are_chosen_by_the_host_python(tmp_path):
    """A bundle with wheels for several Pythons installs only this interpreter's (here with no pip: a
    bare venv, so the wheels are unpacked); a bundle without this Python's wheels stops with one line
    naming the version to bundle."""
    import venv
    venv.create(tmp_path / "bare", with_pip=False)  # a python that lacks every package the check needs
    python = str(tmp_path / "bare" / "bin" / "python")
    tag = "cp%d%d" % sys.version_info[:2]
    other = "cp%d%d" % (sys.version_info[0], sys.version_info[1] + 1)
    root = _checkout_without_a3jax(tmp_path)
    wheels = root / ".device" / "wheels"
    env = dict(os.environ, PYTHON=python, OUT=str(tmp_path / "out"))
    cmd = ["bash", str(root / "bench" / "device_check.sh"), "--smoke", "--no-reference"]

    _wheel(wheels, "only_other", other)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2
    assert f"has wheels for {other} but not for this python ({tag})" in r.stderr
    assert "DEVICE_PYTHON_VERSION=%d.%d make device-bundle" % sys.version_info[:2] in r.stderr

    _wheel(wheels, "mine", tag)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "a3jax cannot be imported here: missing module" in r.stderr, r.stderr
    site = root / ".device" / f"site-{tag}"
    assert (site / "mine" / "__init__.py").read_text() == f"TAG = {tag!r}\n"
    assert not (site / "only_other").exists()
