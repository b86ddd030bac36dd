"""`a3jax serve` on loopback: a real uvicorn server in a thread, called with the official openai client
and httpx. Greedy and seeded outputs are checked against Engine.generate (the oracle), the wire format
against OpenAI's, bad requests against their status codes, and continuous batching against many
concurrent clients."""
import concurrent.futures
import dataclasses
import json
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import uvicorn

from a3jax.data.tokenizers import load_tokenizer
from a3jax.decode import DecodeSpec, Engine, SamplingParams
from a3jax.serve import ServeOptions, create_app
from compile_helpers import counting_compiles
from test_decode_common import TINY_BYTE, tiny

MAX_LEN = 256


class Live:
    """A running server: base url, the engine it serves, the uvicorn server."""

    def __init__(self, app, engine):
        self.app, self.engine = app, engine
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert time.monotonic() - t0 < 60 and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kw)


@pytest.fixture(scope="module")
def live():
    cfg, params = tiny(TINY_BYTE)
    engine = Engine(cfg, params, load_tokenizer("byte"), slots=4)
    app = create_app(engine, ServeOptions(model_name="tiny", slots=4, max_len=MAX_LEN, widths=(1, 2), max_queue=64))
    srv = Live(app, engine)
    yield srv
    srv.stop()


def engine_text(live, prompts, max_new, spec=None, sampling=None):
    return live.engine.generate(prompts, max_new, spec or DecodeSpec(), sampling)


def metric(live, name, **labels) -> float:
    text = httpx.get(live.url + "/metrics").text
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.escape(name) + (r"\{" + re.escape(sel) + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    m = re.search(pat, text)
    return float(m.group(1)) if m else 0.0


def test_greedy_completions_equal_the_engine(live):
    client = live.client()
    prompts = ["Hello", "The cat sat", "x"]
    for width in (1, 2):
        out = client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0, logprobs=1,
                                        extra_body={"group_size": width})
        want = engine_text(live, prompts, 12, DecodeSpec(group_size=width))
        assert [c.index for c in out.choices] == [0, 1, 2]
        for c, w in zip(out.choices, want):
            assert c.text == w.text, (width, c.text, w.text)
            assert c.finish_reason == ("stop" if w.tokens[-1] == live.engine.cfg.eos_token_id else "length")
            np.testing.assert_allclose(c.logprobs.token_logprobs, w.logprobs, atol=1e-4)
            assert len(c.logprobs.tokens) == len(w.tokens)
        assert out.usage.prompt_tokens == sum(len(p) + 1 for p in prompts)  # BOS each
        assert out.usage.completion_tokens == sum(len(w.tokens) for w in want)
        assert out.object == "text_completion" and out.model == "tiny"


def test_streaming_concatenates_to_the_same_text(live):
    client = live.client()
    plain = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # the raw wire: server-sent events, each `data: {json}`, ending with `data: [DONE]`
    with httpx.stream("POST", live.url + "/v1/completions",
                      json={"model": "tiny", "prompt": "Hello", "max_tokens": 20, "temperature": 0,
                            "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    body = [json.loads(e[6:]) for e in events[:-1]]
    assert all(b["object"] == "text_completion" for b in body)
    assert "".join(b["choices"][0]["text"] for b in body) == plain.choices[0].text


def test_sampling_with_a_seed_is_reproducible_and_equals_the_engine(live):
    client = live.client()
    kw = dict(model="tiny", prompt="The", max_tokens=16, temperature=1.0, n=4, seed=7)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    texts = [c.text for c in a.choices]
    assert texts == [c.text for c in b.choices]
    assert len(set(texts)) == 4, texts
    want = engine_text(live, ["The"], 16, sampling=SamplingParams(temperature=1.0, seed=7, num_samples=4))
    assert texts == [w.text for w in want]
    other = client.completions.create(**{**kw, "seed": 8})
    assert [c.text for c in other.choices] != texts
    topk = client.completions.create(**{**kw, "n": 1}, top_p=0.9, extra_body={"top_k": 3})
    want = engine_text(live, ["The"], 16, sampling=SamplingParams(temperature=1.0, seed=7, top_k=3, top_p=0.9))
    assert topk.choices[0].text == want[0].text


def test_stop_strings_and_echo(live):
    client = live.client()
    full = client.completions.create(model="tiny", prompt="Hello", max_tokens=24, temperature=0).choices[0].text
    stop = full[5:7]
    assert stop and stop not in full[:5]
    cut = client.completions.create(model="tiny", prompt="Hello", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="Hello", max_tokens=24, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]
    echo = client.completions.create(model="tiny", prompt="Hello", max_tokens=24, temperature=0, echo=True)
    assert echo.choices[0].text == "Hello" + full


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "x", "bogus": 1}, 422, "bogus"),
    ({"prompt": "x", "max_tokens": -3}, 422, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 422, "temperature"),
    ({"prompt": "x", "group_size": 0}, 422, "group_size"),
    ({"prompt": "x", "n": 99}, 400, "n"),
    ({"prompt": "x" * MAX_LEN}, 400, "prompt"),
    ({"prompt": "x" * 100, "max_tokens": 200}, 400, "max_tokens"),
    ({"prompt": "x", "order": "sideways"}, 400, "order"),
    ({"prompt": [1, 2, 999]}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "logprobs": 5}, 422, "logprobs"),
    ({"prompt": "x", "presence_penalty": 0.5}, 422, "presence_penalty"),
])
def test_bad_requests_name_the_field(live, body, status, param):
    r = httpx.post(live.url + "/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"], err
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_bad_json_unknown_route_and_the_client_errors(live):
    r = httpx.post(live.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.UnprocessableEntityError, match="bogus"):
        live.client().completions.create(model="tiny", prompt="x", extra_body={"bogus": 1})
    with pytest.raises(openai.BadRequestError, match="chat template"):
        live.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    out = live.client().completions.create(model="tiny", prompt="ok", max_tokens=3, temperature=0)
    assert len(out.choices) == 1  # still serving


def test_models_health_and_metrics(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    h = httpx.get(live.url + "/health").json()
    assert h["status"] == "ok" and h["slots_total"] == 8 and h["slots_busy"] == 0  # 2 lanes x 4 slots
    before = metric(live, "a3jax_generated_tokens_total")
    live.client().completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0)
    text = httpx.get(live.url + "/metrics").text
    for name in ("a3jax_requests_total", "a3jax_prompt_tokens_total", "a3jax_slots_busy", "a3jax_queue_length",
                 "a3jax_request_latency_seconds_bucket", "a3jax_generated_tokens_per_second"):
        assert name in text, name
    assert metric(live, "a3jax_generated_tokens_total") > before
    assert metric(live, "a3jax_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert metric(live, "a3jax_requests_total", endpoint="/v1/completions", status="422") >= 1


def test_serving_compiles_nothing_after_warm_up(live):
    client = live.client()
    client.completions.create(model="tiny", prompt="warm", max_tokens=2, temperature=0)
    with counting_compiles() as compiles:
        for prompt, kw in [("a", {}), ("A much longer prompt than that", {"group_size": 2}),
                           (["x", "yy", "zzz"], {"temperature": 0.7, "seed": 1, "n": 2}),
                           ("q", {"temperature": 1.0, "top_p": 0.8, "extra_body": {"top_k": 5}})]:
            extra = kw.pop("extra_body", {})
            if "group_size" in kw:
                extra["group_size"] = kw.pop("group_size")
            kw.setdefault("temperature", 0)
            client.completions.create(model="tiny", prompt=prompt, max_tokens=9, extra_body=extra, **kw)
        list(client.completions.create(model="tiny", prompt="s", max_tokens=5, temperature=0, stream=True))
    assert compiles == [], f"{len(compiles)} compiles while serving"


def test_many_concurrent_requests_each_equal_their_sequential_result(live):
    rng = np.random.default_rng(0)
    words = ["a", "The quick brown fox", "0123", "Hello there, friend", "zz", "def f(x):", "!"]
    jobs = [(words[i % len(words)] + str(i), int(rng.integers(2, 40))) for i in range(64)]
    longest = max(m for _, m in jobs)
    want = {p: w for p, w in zip([p for p, _ in jobs], engine_text(live, [p for p, _ in jobs], longest))}
    client = live.client(timeout=120)

    def one(job):
        p, m = job
        return client.completions.create(model="tiny", prompt=p, max_tokens=m, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        got = list(pool.map(one, jobs))
    tok = live.engine.tokenizer
    for (p, m), text in zip(jobs, got):
        w = want[p]
        ids = [int(x) for x in w.tokens[:m] if int(x) not in (tok.pad_id, tok.eos_id)]
        assert text == tok.decode(ids), (p, m)
    assert httpx.get(live.url + "/health").json()["slots_busy"] == 0


# A streaming client in its own process, printing each event line as it arrives.
STREAM_CLIENT = """
import json, sys, httpx
with httpx.stream("POST", sys.argv[1], json=json.loads(sys.argv[2]), timeout=60) as r:
    for line in r.iter_lines():
        if line:
            print(line, flush=True)
"""


def test_a_client_killed_mid_stream_frees_its_slot(live):
    before = metric(live, "a3jax_sequences_finished_total", reason="cancelled")
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": MAX_LEN - 10, "temperature": 0, "stream": True}
    client = subprocess.Popen([sys.executable, "-c", STREAM_CLIENT, live.url + "/v1/completions", json.dumps(body)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().startswith("data: ")
    finally:
        client.kill()  # SIGKILL mid-stream: the kernel closes its socket, nobody says goodbye
        client.wait()
    # the server notices the dead connection, cancels the sequence and frees the slot
    t0 = time.monotonic()
    while metric(live, "a3jax_sequences_finished_total", reason="cancelled") <= before:
        assert time.monotonic() - t0 < 20, "the cancelled stream's slot was not freed"
        time.sleep(0.05)
    assert httpx.get(live.url + "/health").json() == {"status": "ok", "slots_busy": 0, "slots_total": 8,
                                                      "queue": 0}
    out = live.client().completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
    assert out.choices[0].text == engine_text(live, ["Hello"], 4)[0].text


def test_a_full_queue_answers_429_with_retry_after(live):
    big = {"model": "tiny", "prompt": ["p"] * 16, "n": 4, "max_tokens": MAX_LEN - 10, "temperature": 0,
           "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=big) as r:
        assert r.status_code == 200
        more = httpx.post(live.url + "/v1/completions", json={**big, "prompt": ["a"] * 2, "stream": False})
        assert more.status_code == 429 and int(more.headers["Retry-After"]) >= 1, more.text
        with pytest.raises(openai.RateLimitError):
            live.client().completions.create(model="tiny", prompt=["a"] * 2, n=4, max_tokens=3)
    t0 = time.monotonic()
    while httpx.get(live.url + "/health").json()["queue"] or httpx.get(live.url + "/health").json()["slots_busy"]:
        assert time.monotonic() - t0 < 20, "the abandoned request's sequences were not dropped"
        time.sleep(0.05)


def test_settings_no_lane_runs_go_through_the_engine(live):
    client = live.client()
    for extra in ({"order": "random"}, {"speculative": 2}, {"group_size": 3}):
        out = client.completions.create(model="tiny", prompt=["Hello", "ab"], max_tokens=10, temperature=0,
                                        extra_body=extra)
        want = engine_text(live, ["Hello", "ab"], 10, DecodeSpec(**extra))
        assert [c.text for c in out.choices] == [w.text for w in want], extra
    streamed = client.completions.create(model="tiny", prompt="Hello", max_tokens=10, temperature=0, stream=True,
                                         extra_body={"order": "random"})
    want = engine_text(live, ["Hello"], 10, DecodeSpec(order="random"))
    assert "".join(c.choices[0].text for c in streamed) == want[0].text


def test_infill_and_score_endpoints_equal_the_engine(live):
    spec = DecodeSpec(order="confidence", group_size=1)
    r = httpx.post(live.url + "/v1/infill", json={"text": "ab[MASK:3]cd", "order": "confidence", "group_size": 1})
    assert r.status_code == 200, r.text
    want, = live.engine.infill("ab[MASK:3]cd", spec=spec)
    got = r.json()["choices"][0]
    assert got["text"] == want.text and got["blanks"] == want.blanks
    np.testing.assert_allclose(got["log_likelihood"], float(np.sum(want.logprobs)), rtol=1e-5)
    same = httpx.post(live.url + "/v1/infill", json={"prefix": "ab", "suffix": "cd", "length": 3,
                                                     "order": "confidence", "group_size": 1}).json()
    assert same["choices"][0]["text"] == want.text
    # the parallel settings reach the Engine: a confidence threshold, self-speculative drafts
    for settings, spec in [({"order": "confidence", "threshold": 0.3}, DecodeSpec(order="confidence", threshold=0.3)),
                           ({"order": "left_to_right", "speculative": 2}, DecodeSpec(speculative=2))]:
        r = httpx.post(live.url + "/v1/infill", json={"text": "x[MASK:6]yz", "temperature": 0, **settings})
        assert r.status_code == 200, r.text
        want, = live.engine.infill("x[MASK:6]yz", spec=spec)
        assert r.json()["choices"][0]["text"] == want.text, settings
        np.testing.assert_allclose(r.json()["choices"][0]["log_likelihood"], float(np.sum(want.logprobs)), rtol=1e-5)
    r = httpx.post(live.url + "/v1/score", json={"input": ["hello world", "abc"], "grouping": "random:4"})
    assert r.status_code == 200, r.text
    for row, w in zip(r.json()["data"], live.engine.score(["hello world", "abc"], grouping="random:4")):
        assert row["tokens"] == w.tokens
        np.testing.assert_allclose(row["log_likelihood"], w.log_likelihood, rtol=1e-5)
    for path, body, param in [("/v1/infill", {"text": "no blanks"}, "text"),
                              ("/v1/infill", {"text": "a[MASK:2]", "length": 3}, "text"),
                              ("/v1/infill", {"text": "a[MASK:2]", "threshold": 2.0}, "threshold"),
                              ("/v1/score", {"input": "abc", "grouping": "sideways"}, "grouping"),
                              ("/v1/score", {"input": "abc", "extra": 1}, "extra")]:
        r = httpx.post(live.url + path, json=body)
        assert r.status_code in (400, 422) and r.json()["error"]["param"] == param, (path, body, r.text)
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_content_lane_of_an_ar_model_equals_the_engine(temperature):
    """An ar model decodes in the content-stream lane: each slot's tokens and log-probs equal
    Engine.generate's (greedy, and sampled with the same seed), rows admitted at different steps."""
    from a3jax.serve.slots import Lane, base_key
    cfg, params = tiny(TINY_BYTE)
    cfg = dataclasses.replace(cfg, objective="ar")
    tok = load_tokenizer("byte")
    prompts = ["Hello", "The cat sat on", "x"]
    want = Engine(cfg, params, tok, slots=4).generate(prompts, 10, DecodeSpec(stop_at_eos=False),
                                                      SamplingParams(temperature=temperature, seed=5))
    lane = Lane(cfg, params, "content", 1, 4, 64)
    got = {i: ([], []) for i in range(len(prompts))}
    for step in range(10 + len(prompts)):
        if step < len(prompts):  # one more row joins the running batch every step
            lane.admit(step, [tok.bos_id] + tok.encode(prompts[step]), 10, base_key(5), temperature, 0, 1.0)
        out = lane.step()
        for i, (ids, lps) in got.items():
            if len(ids) < 10:
                ids += [int(x) for x in out.tokens[i][out.ok[i]]]
                lps += [float(x) for x in out.logprobs[i][out.ok[i]]]
    for i, w in enumerate(want):
        assert got[i][0] == [int(x) for x in w.tokens], prompts[i]
        np.testing.assert_allclose(got[i][1], w.logprobs, atol=1e-4)


def test_what_the_engine_refuses_is_400_and_a_failure_inside_it_is_500(live, monkeypatch):
    """Requests no lane runs are jobs on the Engine: a setting the Engine refuses answers 400 with its
    message and the field, before any byte of a stream; a failure inside decoding answers 500; the
    server serves on after both."""
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 5, "temperature": 1.0, "seed": 1, "n": 3,
            "order": "random"}
    monkeypatch.setattr(live.engine, "slots", 2)  # an Engine with fewer rows per call than the lanes' slots
    for stream in (False, True):
        r = httpx.post(live.url + "/v1/completions", json={**body, "stream": stream})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "n" and "num_samples=3" in err["message"] and "2 slots" in err["message"], err
    monkeypatch.setattr(live.engine, "slots", 4)
    monkeypatch.setattr(live.engine, "params", None)  # the model's weights gone: decoding itself fails
    for stream in (False, True):
        r = httpx.post(live.url + "/v1/completions", json={**body, "stream": stream})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
    monkeypatch.undo()
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    out = live.client().completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0,
                                           extra_body={"order": "random"})
    assert out.choices[0].text == engine_text(live, ["Hello"], 5, DecodeSpec(order="random"))[0].text


def test_an_infill_order_is_one_group_id_per_blank_token(live):
    text = "ab[MASK:3]cd"
    r = httpx.post(live.url + "/v1/infill", json={"text": text, "order": [2, 1, 0]})
    assert r.status_code == 200, r.text
    # the Engine's own layout: BOS a b at 0-2, the blank at 3-5, in a buffer of its first bucket (32)
    groups = np.zeros(32, np.int64)
    groups[3:6] = [2, 1, 0]  # right to left, one token per step
    want, = live.engine.infill(text, spec=DecodeSpec(order=groups))
    assert r.json()["choices"][0]["text"] == want.text and r.json()["choices"][0]["steps"] == 3
    for body, param in [({"text": text, "order": [0, 1]}, "order"),
                        ({"text": "ab[MASK:0]cd"}, "text"),
                        ({"model": "tiny", "prompt": "ab", "order": [0, 1, 2]}, "order")]:
        path = "/v1/completions" if "prompt" in body else "/v1/infill"
        r = httpx.post(live.url + path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_a_request_past_its_deadline_is_cut_off_and_frees_its_slot(live, monkeypatch):
    srv = live.app.state.server
    monkeypatch.setattr(srv, "opts", dataclasses.replace(srv.opts, timeout=0.05))
    before = metric(live, "a3jax_sequences_finished_total", reason="timeout")
    body = {"model": "tiny", "prompt": "x", "max_tokens": MAX_LEN - 16, "temperature": 0}
    r = httpx.post(live.url + "/v1/completions", json=body)
    assert r.status_code == 504 and "0.05 s" in r.json()["error"]["message"], r.text
    with httpx.stream("POST", live.url + "/v1/completions", json={**body, "stream": True}) as r:
        last = [json.loads(e[6:]) for e in r.iter_lines() if e.startswith("data: {")][-1]
    assert last["choices"][0]["finish_reason"] == "timeout"
    monkeypatch.undo()
    assert metric(live, "a3jax_sequences_finished_total", reason="timeout") >= before + 2
    assert httpx.get(live.url + "/health").json()["slots_busy"] == 0


def test_stop_past_its_deadline_cancels_running_and_waiting_sequences():
    """Shutdown: what is still running when the deadline passes, and what never got a slot, ends with
    finish reason 'cancelled' (each client hears 'done'), and the scheduler thread exits."""
    from a3jax.serve.scheduler import Scheduler, Seq
    from a3jax.serve.slots import Lane
    cfg, params = tiny(TINY_BYTE)
    tok = load_tokenizer("byte")
    scheduler = Scheduler({("query", 1): Lane(cfg, params, "query", 1, 2, 128)}, max_queue=8)
    ends = {}
    seqs = [Seq([tok.bos_id] + tok.encode(p), 100, ("query", 1),
                (lambda i: lambda ev, payload: ends.__setitem__(i, payload) if ev == "done" else None)(i))
            for i, p in enumerate(["Hello", "ab", "xyz", "The cat"])]  # 2 slots: two wait
    scheduler.start()
    scheduler.submit(seqs)
    t0 = time.monotonic()
    while scheduler.busy() < 2:
        assert time.monotonic() - t0 < 60, "the first two sequences were never admitted"
        time.sleep(0.005)
    scheduler.stop(timeout=0.0)  # 100 tokens each: nothing can have finished
    assert not scheduler.thread.is_alive()
    assert ends == {0: "cancelled", 1: "cancelled", 2: "cancelled", 3: "cancelled"}
    assert all(s.generated < 100 for s in seqs)
