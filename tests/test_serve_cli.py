"""`a3jax serve` as a user runs it: a subprocess on a free loopback port, a request while it runs, then
SIGTERM: the running stream finishes, the process exits 0 and leaves nothing behind."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from test_decode_common import TINY_BYTE, tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from a3jax.checkpoint import save_params
    cfg, params = tiny(TINY_BYTE)
    return save_params(str(tmp_path_factory.mktemp("serve") / "tiny"), cfg, params)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_cli_serves_and_shuts_down_on_sigterm(ckpt):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "a3jax", "serve", "--ckpt", ckpt, "--port", str(port),
                             "--slots", "2", "--max-len", "64", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() - t0 < 120, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
        events = []

        def stream():
            body = {"model": "tiny", "prompt": "Hello", "max_tokens": 50, "temperature": 0, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                events.extend(line for line in r.iter_lines() if line)

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        t.join(60)
        assert events[-1] == "data: [DONE]", events[-3:]
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop", "cancelled")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_cli_rejects_bad_arguments(ckpt):
    out = subprocess.run([sys.executable, "-m", "a3jax", "serve", "--ckpt", ckpt, "--group-sizes", "0,2"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 2 and "--group-sizes" in out.stderr
