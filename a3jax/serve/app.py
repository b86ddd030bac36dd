"""The HTTP layer: FastAPI routes in OpenAI's wire format over the scheduler (docs/serve.md).

    app = create_app(Engine.load(ckpt), ServeOptions(slots=8, max_len=512))
    uvicorn.run(app, host="127.0.0.1", port=8000)

The web layer only translates: a request becomes DecodeSpec / SamplingParams (their checks name the
bad field), then sequences for the scheduler's lanes or a Job on the Engine; tokens come back through
sinks and leave as JSON or server-sent events.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import secrets
import time
import uuid
from typing import Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from a3jax.decode import DecodeError, DecodeSpec, Engine, SamplingParams
from a3jax.decode import api
from a3jax.decode import text as text_lib
from a3jax.objectives import ObjectiveError
from a3jax.data import chat as chat_lib
from a3jax.serve.metrics import CONTENT_TYPE, Metrics
from a3jax.serve.protocol import ChatRequest, CompletionRequest, InfillRequest, ScoreRequest
from a3jax.serve.scheduler import QueueFull, Scheduler, Seq, lane_key
from a3jax.serve.slots import Lane, base_key

log = logging.getLogger("a3jax.serve")
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/infill", "/v1/score", "/v1/models", "/health",
             "/metrics")


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """slots: rows per lane; max_len: a lane row's positions (prompt + max_tokens); widths: the
    group sizes an A3 model's left-to-right lanes are compiled for; max_queue: sequences and jobs
    that may wait (more: 429); timeout: seconds a request may take (then it is cut off)."""
    model_name: str = "a3jax"
    slots: int = 8
    max_len: Optional[int] = None
    widths: tuple = (1,)
    max_queue: int = 256
    timeout: float = 600.0
    shutdown_timeout: float = 10.0
    retry_after: int = 1


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_response(status: int, message: str, param=None, headers=None) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "not_found_error", 422: "invalid_request_error",
            429: "rate_limit_error", 503: "unavailable_error", 504: "timeout_error"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


def _param_of(message: str) -> Optional[str]:
    """The request field a DecodeSpec / SamplingParams error names ('DecodeSpec.group_size' -> 'group_size');
    the first one a message names when it names several."""
    m = re.search(r"(?:DecodeSpec|SamplingParams)\.(\w+)", message)
    names = {"num_samples": "n", "stream": "model_stream"}
    return names.get(m.group(1), m.group(1)) if m else None


def build_lanes(engine: Engine, opts: ServeOptions, max_len: int) -> dict:
    """The lanes this model decodes in: an A3 model's query stream at each width, an ar model's
    content stream; none for a model whose decoder is not left to right (mdlm: everything is a Job)."""
    decoder = api.model_decoder(engine.cfg)
    if decoder == "a3":
        keys = [("query", int(w)) for w in opts.widths]
    elif decoder == "content":
        keys = [("content", 1)]
    else:
        keys = []
    return {k: Lane(engine.cfg, engine.params, k[0], k[1], opts.slots, max_len) for k in keys}


def warm_up(lanes: dict) -> None:
    """Compiles every program a lane runs (admit, step, the base key), so serving compiles nothing."""
    for lane in lanes.values():
        bos = max(lane.cfg.bos_token_id, 0)
        for index in (None, 0):
            lane.admit(0, [bos], 1, base_key(0, index), 0.0, 0, 1.0)
            lane.step()
            lane.release(0)


class _Status:
    """Pure ASGI middleware: counts every response by endpoint and status (streams included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"

        async def send_status(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send_status)


class _Choice:
    """One choice of a request in flight: its tokens, text and finish reason."""

    def __init__(self, index: int, seq: Optional[Seq]):
        self.index, self.seq = index, seq
        self.tokens, self.logprobs = [], []
        self.text, self.sent, self.finish, self.error = "", "", None, None


class Server:
    """The routes' state: the engine, the scheduler and the metrics of one app."""

    def __init__(self, engine: Engine, opts: ServeOptions):
        if engine.tokenizer is None:
            raise ValueError("a3jax serve needs an Engine with a tokenizer (text in, text out)")
        self.engine, self.opts, self.tok = engine, opts, engine.tokenizer
        self.max_len = int(opts.max_len or engine.cfg.max_position_embeddings)
        if self.max_len > engine.cfg.max_position_embeddings:
            raise ValueError(f"max_len={self.max_len} exceeds the model's max_position_embeddings="
                             f"{engine.cfg.max_position_embeddings}")
        self.lanes = build_lanes(engine, opts, self.max_len)
        self.metrics = Metrics(sum(lane.slots for lane in self.lanes.values()))
        warm_up(self.lanes)
        self.scheduler = Scheduler(self.lanes, opts.max_queue, self.metrics)
        tok_file = getattr(engine.tokenizer, "file", None)  # the template lives beside the tokenizer's files
        self.chat_template = chat_lib.template_of(tok_file) if tok_file else None
        self.created = int(time.time())

    # ------------------------------------------------------------------ helpers

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.opts.model_name:
            raise HTTPError(404, f"the model {name!r} does not exist; this server serves "
                                 f"{self.opts.model_name!r}", "model")

    def text_of(self, ids) -> str:
        drop = (self.tok.pad_id, self.tok.eos_id)
        return self.tok.decode([int(x) for x in ids if int(x) not in drop])

    def decode_args(self, req, what: str, num_samples: int = 1, max_new: Optional[int] = None):
        """(spec, sampling, decoder) of a request; errors name the request field."""
        seed = req.seed if req.seed is not None else (secrets.randbits(31) if req.temperature > 0 else 0)
        if what == "generation" and not isinstance(req.order, str):
            # group ids would have to cover the prompt's and the new tokens' positions: not a client's layout
            raise HTTPError(400, f"order={req.order!r}: a list of group ids (one per blank token) is taken by "
                                 f"/v1/infill; a completion takes an order name", "order")
        try:
            spec = DecodeSpec(order=req.order, group_size=req.group_size, speculative=req.speculative,
                              threshold=req.threshold, stream=req.model_stream)
            sp = SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=seed,
                                num_samples=num_samples)
            decoder = api.resolve_decoder(self.engine.cfg, spec, sp, what)
        except (DecodeError, ObjectiveError) as e:
            raise HTTPError(400, str(e), _param_of(str(e))) from None
        return spec, sp, decoder

    def prompts_of(self, prompt, content: bool) -> list:
        """Token id lists (BOS as the decoder conditions on it) of a str / list of str / ids / list of ids."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            ids = text_lib.prompt_ids(self.tok, p, content) if isinstance(p, str) else list(p)
            if not ids:
                raise HTTPError(400, "prompt: an empty token list", "prompt")
            bad = [x for x in ids if not 0 <= x < self.engine.cfg.vocab_size]
            if bad:
                raise HTTPError(400, f"prompt: token id {bad[0]} is outside the vocabulary "
                                     f"[0, {self.engine.cfg.vocab_size})", "prompt")
            out.append(ids)
        return out

    def check_lengths(self, prompts: list, max_new: int) -> None:
        for i, ids in enumerate(prompts):
            if len(ids) >= self.max_len:
                raise HTTPError(400, f"prompt {i} has {len(ids)} tokens; the context holds {self.max_len} "
                                     f"(prompt + max_tokens)", "prompt")
            if len(ids) + max_new > self.max_len:
                raise HTTPError(400, f"max_tokens={max_new} with a prompt of {len(ids)} tokens exceeds the "
                                     f"context of {self.max_len} tokens; ask for at most {self.max_len - len(ids)}",
                                "max_tokens")

    def check_n(self, n: int, rows: int) -> None:
        if n > max(self.opts.slots, self.engine.slots):
            raise HTTPError(400, f"n={n} exceeds the server's {max(self.opts.slots, self.engine.slots)} slots",
                            "n")
        if n * rows > self.opts.max_queue:
            raise HTTPError(400, f"{rows} prompts x n={n} = {n * rows} sequences exceed the queue of "
                                 f"{self.opts.max_queue}", "n")

    def infill_order(self, text: str, groups: list) -> np.ndarray:
        """A client's group ids, one per blank token in text order, as one id per token of the text
        (the ids at known positions are never read)."""
        ids, known, _ = text_lib.parse_masked(text, self.tok)
        blanks = np.flatnonzero(~known)
        if len(groups) != len(blanks):
            raise HTTPError(400, f"order has {len(groups)} group ids; the text has {len(blanks)} blank tokens "
                                 f"(one id each)", "order")
        order = np.zeros(len(ids), np.int64)
        order[blanks] = groups
        return order

    async def run_job(self, fn):
        """fn() on the scheduler thread. What the Engine refuses (ValueError: its checks name the setting)
        is the request's fault, 400; any other exception is the server's, 500 (the scheduler goes on)."""
        try:
            fut = self.scheduler.submit_job(fn)
        except QueueFull as e:
            raise HTTPError(429, str(e), headers={"Retry-After": str(self.opts.retry_after)}) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.opts.timeout)
        except asyncio.TimeoutError:
            fut.cancel()
            raise HTTPError(504, f"the request took longer than {self.opts.timeout:g} s") from None
        except ValueError as e:  # DecodeError, ObjectiveError, a bad grouping: the Engine's checks
            raise HTTPError(400, str(e), _param_of(str(e))) from None

    # ------------------------------------------------------------------ generation

    async def start_generation(self, prompts: list, max_new: int, spec, sp, decoder) -> tuple:
        """(choices, events queue): lanes when the spec fits one, else a Job on the Engine, awaited here so
        that its errors get their status (400 for what the Engine refuses) before any byte is sent."""
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        n = sp.num_samples
        key = lane_key(spec, decoder)
        choices = []
        if key in self.lanes:
            eos = spec.eos_id if spec.eos_id is not None else self.engine.cfg.eos_token_id
            psize = spec.prompt_group_size if spec.prompt_group_size is not None else self.engine.cfg.prompt_group_size
            deadline = time.monotonic() + self.opts.timeout
            seqs = []
            for i, ids in enumerate(prompts):
                for j in range(n):
                    idx = i * n + j
                    sink = (lambda idx: lambda ev, payload: loop.call_soon_threadsafe(
                        events.put_nowait, (idx, ev, payload)))(idx)
                    seq = Seq(ids, max_new, key, sink, sp.temperature, sp.top_k, sp.top_p, int(sp.seed),
                              j if n > 1 else None, eos, psize, deadline)
                    seqs.append(seq)
                    choices.append(_Choice(idx, seq))
            try:
                self.scheduler.submit(seqs)
            except QueueFull as e:
                raise HTTPError(429, str(e), headers={"Retry-After": str(self.opts.retry_after)}) from None
            return choices, events
        # the Engine, as a batch of its own
        comps = await self.run_job(lambda: self.engine.generate(prompts, max_new, dataclasses.replace(spec), sp))
        choices = [_Choice(i, None) for i in range(len(comps))]
        self.metrics.generated(sum(len(comp.tokens) for comp in comps))
        for c, comp in zip(choices, comps):
            eos_hit = len(comp.tokens) and int(comp.tokens[-1]) == self.engine.cfg.eos_token_id
            events.put_nowait((c.index, "tokens", ([int(x) for x in comp.tokens], [float(x) for x in comp.logprobs])))
            events.put_nowait((c.index, "done", "stop" if eos_hit else "length"))
        return choices, events

    def apply(self, c: _Choice, ev: str, payload, stops: list) -> None:
        """Folds one scheduler event into its choice (text, stop strings, finish reason)."""
        if c.finish is not None:
            return
        if ev == "tokens":
            ids, lps = payload
            c.tokens += ids
            c.logprobs += lps
            c.text = self.text_of(c.tokens)
            if stops:
                hits = [c.text.find(s) for s in stops if s in c.text]
                if hits:
                    c.text = c.text[:min(hits)]
                    c.finish = "stop"
                    if c.seq is not None:
                        c.seq.cancel("stop")
        elif ev == "done":
            c.finish = payload
        else:
            c.finish, c.error = "error", payload

    def logprobs_of(self, c: _Choice, offset: int = 0) -> dict:
        toks = [self.tok.decode([t]) for t in c.tokens]
        offs = list(np.cumsum([0] + [len(t) for t in toks[:-1]]) + offset) if toks else []
        return {"tokens": toks, "token_logprobs": c.logprobs,
                "top_logprobs": [{t: lp} for t, lp in zip(toks, c.logprobs)], "text_offset": [int(o) for o in offs]}

    async def collect(self, choices, events, request: Request, stops) -> None:
        """Waits until every choice is finished (cancelling them if the client leaves)."""
        by_index = {c.index: c for c in choices}
        try:
            while any(c.finish is None for c in choices):
                try:
                    idx, ev, payload = await asyncio.wait_for(events.get(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise asyncio.CancelledError
                    continue
                self.apply(by_index[idx], ev, payload, stops)
        finally:
            for c in choices:
                if c.seq is not None:
                    c.seq.cancel("cancelled")


def create_app(engine: Engine, opts: Optional[ServeOptions] = None) -> FastAPI:
    """The FastAPI app serving `engine`; the scheduler runs from startup to shutdown (the app's lifespan)."""
    opts = opts or ServeOptions()
    srv = Server(engine, opts)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        srv.scheduler.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, srv.scheduler.stop, opts.shutdown_timeout)

    app = FastAPI(title="a3jax serve", lifespan=lifespan)
    app.state.server = srv
    app.add_middleware(_Status, metrics=srv.metrics)

    @app.exception_handler(HTTPError)
    async def _http_error(request, e: HTTPError):
        return error_response(e.status, e.message, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg')}", None)
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        # a union's member name (str, list[int], ...) is not a field: keep the field path only
        field = ".".join(x for x in loc if not re.match(r"^(str|int|list\[.*\]|function-after\[.*\])$", x)) or None
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body')}: {er.get('msg')}"
                        for er in errs[:3])
        return error_response(422, msg, field)

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        log.exception("request failed")
        return error_response(500, f"{type(e).__name__}: {e}")

    @app.get("/health")
    async def health():
        sch = srv.scheduler
        alive = sch.thread is not None and sch.thread.is_alive()
        body = {"status": "ok" if alive else "unavailable", "slots_busy": sch.busy(), "slots_total": sch.capacity(),
                "queue": sch.queued()}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(srv.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        cfg = srv.engine.cfg
        return {"object": "list", "data": [{"id": opts.model_name, "object": "model", "created": srv.created,
                                            "owned_by": "a3jax", "max_model_len": srv.max_len,
                                            "objective": cfg.objective}]}

    async def complete(request: Request, prompts: list, req, max_new: int, stops: list, kind: str, echo=None):
        started = time.monotonic()
        n = req.n
        spec, sp, decoder = srv.decode_args(req, "generation", n)
        srv.check_n(n, len(prompts))
        srv.check_lengths(prompts, max_new)
        srv.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        choices, events = await srv.start_generation(prompts, max_new, spec, sp, decoder)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        logprobs = getattr(req, "logprobs", None) is not None
        endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"

        def usage():
            done = sum(len(c.tokens) for c in choices)
            p = sum(len(x) for x in prompts)
            return {"prompt_tokens": p, "completion_tokens": done, "total_tokens": p + done}

        def choice_body(c: _Choice, text: str, finish, delta: bool):
            if kind == "chat":
                msg = {"role": "assistant", "content": text}
                return {"index": c.index, ("delta" if delta else "message"): msg, "finish_reason": finish,
                        "logprobs": None}
            lp = srv.logprobs_of(c) if logprobs and (finish is not None or not delta) else None
            return {"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish}

        if not req.stream:
            await srv.collect(choices, events, request, stops)
            srv.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
            bad = [c for c in choices if c.finish == "error"]
            if bad:
                raise HTTPError(500, f"decoding failed: {bad[0].error}")
            if any(c.finish == "timeout" for c in choices):
                raise HTTPError(504, f"the request took longer than {srv.opts.timeout:g} s")
            body = [choice_body(c, c.text, c.finish, False) for c in choices]
            if kind != "chat" and echo:
                for b, c in zip(body, choices):
                    b["text"] = echo[c.index // n] + c.text
            return {"id": rid, "object": obj, "created": created, "model": opts.model_name, "choices": body,
                    "usage": usage()}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        hold = max((len(s) for s in stops), default=1) - 1
        by_index = {c.index: c for c in choices}
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def sse(choice_list, extra=None):
            body = {"id": rid, "object": chunk_obj, "created": created, "model": opts.model_name,
                    "choices": choice_list}
            if extra:
                body.update(extra)
            return f"data: {json.dumps(body)}\n\n"

        async def stream():
            first = True
            try:
                if kind == "chat":
                    yield sse([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None, "logprobs": None} for c in choices])
                elif echo:
                    for c in choices:
                        yield sse([{"index": c.index, "text": echo[c.index // n], "logprobs": None,
                                    "finish_reason": None}])
                while any(c.finish is None for c in choices):
                    idx, ev, payload = await events.get()
                    c = by_index[idx]
                    was = c.finish
                    srv.apply(c, ev, payload, stops)
                    if was is not None:
                        continue
                    if c.finish is None:
                        safe = c.text[:len(c.text) - hold] if hold else c.text
                        safe = safe.rstrip("\ufffd")  # an incomplete UTF-8 sequence waits for its bytes
                        if len(safe) > len(c.sent) and safe.startswith(c.sent):
                            if first:
                                srv.metrics.first_token.observe(time.monotonic() - started)
                                first = False
                            yield sse([choice_body(c, safe[len(c.sent):], None, True)])
                            c.sent = safe
                    else:
                        if c.finish == "error":
                            yield f"data: {json.dumps({'error': {'message': c.error, 'type': 'server_error'}})}\n\n"
                            continue
                        rest = c.text[len(c.sent):] if c.text.startswith(c.sent) else ""
                        yield sse([choice_body(c, rest, c.finish, True)])
                        c.sent = c.text
                if include_usage:
                    yield sse([], {"usage": usage()})
                yield "data: [DONE]\n\n"
            finally:
                for c in choices:  # a client gone mid-stream frees its slots
                    if c.seq is not None:
                        c.seq.cancel("cancelled")
                srv.metrics.latency.labels(endpoint).observe(time.monotonic() - started)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        srv.check_model(req.model)
        content = srv.decode_args(req, "generation")[2] == "content"
        prompts = srv.prompts_of(req.prompt, content)
        echo = None
        if req.echo:
            echo = [srv.text_of(p) for p in prompts]
        return await complete(request, prompts, req, req.max_tokens, req.stop or [], "completion", echo)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        srv.check_model(req.model)
        if srv.chat_template is None:
            raise HTTPError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        special = lambda i: srv.tok.decode([i]) if i is not None and i >= 0 else ""
        try:
            text = chat_lib.render(srv.chat_template, [m.model_dump(exclude_none=True) for m in req.messages],
                                   add_generation_prompt=True, bos_token=special(srv.tok.bos_id),
                                   eos_token=special(srv.tok.eos_id))
        except chat_lib.ChatError as e:
            raise HTTPError(400, str(e), "messages")
        content = srv.decode_args(req, "generation")[2] == "content"
        prompts = [text_lib.prompt_ids(srv.tok, text, content)]
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        max_new = req.max_completion_tokens or req.max_tokens or (srv.max_len - len(prompts[0]))
        return await complete(request, prompts, req, max_new, stops, "chat")

    @app.post("/v1/infill")
    async def infill(req: InfillRequest):
        srv.check_model(req.model)
        if req.text is not None:
            if req.prefix is not None or req.suffix is not None or req.length is not None:
                raise HTTPError(400, "give text (with [MASK:n] blanks) or prefix/suffix/length, not both", "text")
            text = req.text
        else:
            if req.length is None:
                raise HTTPError(400, "give text with [MASK:n] blanks, or prefix and/or suffix with length", "length")
            text = f"{req.prefix or ''}[MASK:{req.length}]{req.suffix or ''}"
        if not text_lib.MASK_RE.search(text):
            raise HTTPError(400, "text has no blank: mark each one as [MASK:n] (n = tokens to fill)", "text")
        if any(int(n) < 1 for n in text_lib.MASK_RE.findall(text)):
            raise HTTPError(400, "text has a blank [MASK:0]: a blank fills at least one token", "text")
        spec, sp, _ = srv.decode_args(req, "infilling", req.n)
        srv.check_n(req.n, 1)
        started = time.monotonic()
        ids = srv.prompts_of(text_lib.MASK_RE.sub("", text), False)[0]
        blanks = sum(int(m) for m in text_lib.MASK_RE.findall(text))
        if len(ids) + blanks > srv.max_len:
            raise HTTPError(400, f"text of {len(ids) + blanks} tokens (blanks included) exceeds the context of "
                                 f"{srv.max_len}", "text")
        if not isinstance(req.order, str):
            spec = dataclasses.replace(spec, order=srv.infill_order(text, req.order))
        rows = await srv.run_job(lambda: srv.engine.infill([text], spec=spec, sampling=sp))
        srv.metrics.latency.labels("/v1/infill").observe(time.monotonic() - started)
        srv.metrics.generated(blanks * len(rows))
        return {"id": "infill-" + uuid.uuid4().hex, "object": "infill", "created": int(time.time()),
                "model": opts.model_name,
                "choices": [{"index": i, "text": r.text, "blanks": r.blanks,
                             "log_likelihood": float(np.sum(r.logprobs)), "steps": int(r.steps)}
                            for i, r in enumerate(rows)],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": blanks * len(rows),
                          "total_tokens": len(ids) + blanks * len(rows)}}

    @app.post("/v1/score")
    async def score(req: ScoreRequest):
        srv.check_model(req.model)
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts:
            raise HTTPError(400, "input must hold at least one text", "input")
        for i, t in enumerate(texts):
            if len(srv.tok.encode(t)) + 1 > srv.max_len:
                raise HTTPError(400, f"input {i} is longer than the context of {srv.max_len} tokens", "input")
        started = time.monotonic()
        try:
            rows = await srv.run_job(lambda: srv.engine.score(texts, grouping=req.grouping, seed=req.seed))
        except HTTPError as e:
            if e.status == 400 and e.param is None:
                e.param = "grouping"
            raise
        srv.metrics.latency.labels("/v1/score").observe(time.monotonic() - started)
        return {"object": "list", "model": opts.model_name, "grouping": req.grouping,
                "data": [{"index": i, "object": "score", "tokens": r.tokens, "log_likelihood": r.log_likelihood,
                          "nll_per_token": r.nll_per_token, "ppl": r.ppl, "bits_per_byte": r.bits_per_byte}
                         for i, r in enumerate(rows)]}

    return app
