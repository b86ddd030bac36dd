"""`a3jax serve` as a user runs it: a subprocess on a free loopback port over a checkpoint whose tokenizer
ships a chat template; a chat completion equal to the engine's continuation of the rendered
conversation; a stream running at SIGTERM finishes, and the process exits 0."""
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


TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny byte-vocab model with a byte-level HF tokenizer (260 ids) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from a3jax.checkpoint import save_params
    cfg, params = tiny(TINY_BYTE)
    out = save_params(str(tmp_path_factory.mktemp("serve") / "tiny"), cfg, params)
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258, "<mask>": 259})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>", "<mask>"])
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": TEMPLATE}, f)
    return out


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
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 12,
                                                           "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        from a3jax.decode import Engine
        engine = Engine.load(ckpt, slots=2)
        rendered = "<|system|>Be brief.\n<|user|>Hi there\n<|assistant|>"
        want, = engine.generate([rendered], 12)
        choice = r.json()["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": want.text}
        assert r.json()["object"] == "chat.completion"
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                          json={"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0,
                                "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == want.text
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
