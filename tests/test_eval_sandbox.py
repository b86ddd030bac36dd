"""The sandbox: hostile programs (endless loop, fork bomb, 100 GiB allocation, deleting a file outside
their directory, a socket to 127.0.0.1, exiting 0 midway) fail without harming the host, and the run
goes on: good programs in the same batch still pass."""
import os
import shutil
import socket
import tempfile

import pytest

from a3jax.sandbox import MODES, Limits, Sandbox, probe

LIMITS = Limits(timeout_s=3, cpu_s=2, memory_mb=512, nproc=32, fsize_mb=1)


def _hostile(canary, port):
    return {
        "loop": "while True:\n    pass\n",
        "sleep": "import time\ntime.sleep(60)\n",
        "fork_bomb": "import os\nfor _ in range(200):\n    os.fork()\n",
        "memory": "x = bytearray(100 * 2**30)\nprint(len(x))\n",
        "delete": f"import os, shutil, pathlib\np = {canary!r}\ntry:\n    os.remove(p)\nexcept Exception:\n    pass\n"
                  f"try:\n    pathlib.Path(p).unlink()\nexcept Exception:\n    pass\nshutil.rmtree(os.path.dirname(p))\n",
        "socket": f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hi')\n",
        "exit_midway": "import os\nos._exit(0)\nassert False\n",
        "big_file": "open('big', 'w').write('x' * (4 << 20))\n",
        "env": "import os\nassert 'HOME' not in os.environ and 'PYTHONPATH' not in os.environ\n",
    }


GOOD = "def f(x):\n    return x + 1\n\nassert f(1) == 2\nprint('done')\n"


def _leftovers(root):
    """Live processes whose working directory is one of this test's sandboxes (under `root`: other
    tests running beside this one use sandboxes of their own)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.readlink(f"/proc/{pid}/cwd").startswith(root + os.sep):
                    out.append(pid)
            except OSError:
                pass
    return out


@pytest.fixture
def sandbox_root(monkeypatch):
    """A directory of this test's own for the sandboxes' working directories (traversable by the
    unprivileged uid the sandbox may run programs as, unlike pytest's tmp_path)."""
    root = tempfile.mkdtemp(prefix="sandbox-test-")
    os.chmod(root, 0o711)
    monkeypatch.setattr(tempfile, "tempdir", root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("mode", ["auto", "guard"])
def test_hostile_programs_fail_and_the_host_is_unharmed(tmp_path, sandbox_root, mode):
    canary = tmp_path / "keep" / "canary.txt"
    canary.parent.mkdir()
    canary.write_text("still here")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.setblocking(False)
    hostile = _hostile(str(canary), server.getsockname()[1])
    sb = Sandbox(LIMITS, workers=2, mode=mode)
    outs = sb.run_many([GOOD] + list(hostile.values()) + [GOOD])
    status = dict(zip(hostile, outs[1:-1]))
    assert outs[0].passed and outs[-1].passed
    assert {k for k, o in status.items() if o.passed} == {"env"}
    assert status["loop"].seconds < LIMITS.timeout_s + 2  # stopped by the CPU limit or the wall clock
    assert status["sleep"].status == "timeout"
    assert canary.read_text() == "still here"
    with pytest.raises(BlockingIOError):
        server.accept()  # nobody connected
    server.close()
    assert _leftovers(sandbox_root) == []


def test_isolation_is_reported():
    mode, exe = probe(__import__("sys").executable)
    sb = Sandbox(LIMITS)
    assert sb.mode == mode in MODES and sb.python == exe and os.path.isfile(exe)
    assert sb.isolation["network"] == ("guard" if mode == "guard" else "namespace")
    with pytest.raises(ValueError, match="Limits.cpu_s must be a positive number"):
        Limits(cpu_s=0)
    with pytest.raises(ValueError, match="Sandbox mode must be"):
        Sandbox(LIMITS, mode="docker")
