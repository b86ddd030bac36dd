"""The scheduler: one thread that owns the model and runs continuous batching over lanes of slots.

Work arrives as `Seq`s (one prompt, one sample: one slot) and as `Job`s (a function run on the
Engine: the settings no lane runs, infilling, scoring). The thread loops:

    1. drop cancelled sequences (a client gone, a stop string seen, a deadline passed) and free their
       slots;
    2. admit waiting sequences into the free slots of their lane (prefill, one row each);
    3. run at most one Job (a batch of its own, between steps);
    4. run one step of every lane that has active rows, hand each row's new tokens to its sink, and
       retire rows that reached EOS or max_tokens.

So a request joins the running batch at the next step and leaves when done: a short request never
waits for a long one. Which lane a request takes is `lane_key` (docs/serve.md): left-to-right
decoding (an A3 model's query stream in groups of a compiled width, or an `ar` model's content
stream) runs in lanes; everything else is a Job.

Sinks are called from this thread; the web layer (a3jax.serve.app) forwards them to its event loop.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable, Optional

import numpy as np

from a3jax.decode import DecodeSpec
from a3jax.serve.slots import base_key

log = logging.getLogger("a3jax.serve")


class QueueFull(RuntimeError):
    """The bounded queue has no room: the web layer answers 429."""


@dataclasses.dataclass(eq=False)
class Seq:
    """One prompt decoded once in one slot. sink(event, payload) receives ('tokens', (ids, logprobs)),
    then ('done', finish_reason) or ('error', message)."""
    prompt: list
    max_new: int
    lane: tuple
    sink: Callable
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    sample_index: Optional[int] = None
    eos: int = -1
    prompt_group_size: int = 0
    deadline: Optional[float] = None  # time.monotonic() after which the sequence is cut off
    cancelled: Optional[str] = None  # a finish reason once the web layer or the deadline ends it
    generated: int = 0

    def cancel(self, reason: str = "cancelled") -> None:
        """Ends the sequence at the scheduler's next iteration (callable from any thread)."""
        if self.cancelled is None:
            self.cancelled = reason


@dataclasses.dataclass(eq=False)
class Job:
    fn: Callable
    future: concurrent.futures.Future


def lane_key(spec: DecodeSpec, decoder: str) -> Optional[tuple]:
    """The lane (kind, width) a generation with this spec runs in, or None when it needs the Engine:
    the decoder is left to right with the exact KV cache and nothing else (no speculative drafts, no
    dynamic order, no step cap, no teacher forcing)."""
    plain = (isinstance(spec.order, str) and spec.order == "left_to_right" and not spec.speculative
             and spec.threshold is None and spec.window is None and spec.use_cache and spec.mode == "a3"
             and spec.max_steps is None and not spec.teacher_forcing and spec.phases is None and spec.steps is None)
    if not plain:
        return None
    if decoder == "content":
        return ("content", 1)
    if decoder == "a3":
        return ("query", spec.group_size or 1)
    return None


class Scheduler:
    """lanes: {(kind, width): Lane}; max_queue: sequences and jobs that may wait; metrics: a
    a3jax.serve.metrics.Metrics (or None)."""

    def __init__(self, lanes: dict, max_queue: int, metrics=None):
        self.lanes = lanes
        self.max_queue = max_queue
        self.metrics = metrics
        self.cond = threading.Condition()
        self.waiting = {k: collections.deque() for k in lanes}
        self.jobs = collections.deque()
        self.running = {k: {} for k in lanes}  # lane -> {slot: Seq}
        self.stopping = False
        self.thread = None
        self.error = None

    # ------------------------------------------------------------------ any thread

    def queued(self) -> int:
        return sum(len(q) for q in self.waiting.values()) + len(self.jobs)

    def busy(self) -> int:
        return sum(len(r) for r in self.running.values())

    def capacity(self) -> int:
        return sum(lane.slots for lane in self.lanes.values())

    def submit(self, seqs: list) -> None:
        """Queues sequences (all or none); QueueFull when the queue has no room for all of them."""
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if self.queued() + len(seqs) > self.max_queue:
                raise QueueFull(f"the queue holds {self.queued()} of {self.max_queue}; this request needs "
                                f"{len(seqs)} more")
            for s in seqs:
                if s.lane not in self.lanes:
                    raise KeyError(f"no lane {s.lane}")
                self.waiting[s.lane].append(s)
            self._gauges()
            self.cond.notify()

    def submit_job(self, fn: Callable) -> concurrent.futures.Future:
        """Runs fn() on the scheduler thread between steps; its result or exception goes to the future."""
        fut = concurrent.futures.Future()
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if self.queued() + 1 > self.max_queue:
                raise QueueFull(f"the queue holds {self.queued()} of {self.max_queue}")
            self.jobs.append(Job(fn, fut))
            self._gauges()
            self.cond.notify()
        return fut

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="a3jax-scheduler", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops taking work, lets running sequences finish for up to `timeout` seconds, then cancels
        the rest (their clients get finish_reason 'cancelled')."""
        with self.cond:
            self.stopping = True
            for q in self.waiting.values():
                for s in q:
                    s.cancel("cancelled")
            self.cond.notify()
        if self.thread is None:
            return
        self.thread.join(timeout)
        if self.thread.is_alive():
            with self.cond:
                for r in self.running.values():
                    for s in r.values():
                        s.cancel("cancelled")
                self.cond.notify()
            self.thread.join(5.0)

    # ------------------------------------------------------------------ the scheduler thread

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue.set(self.queued())
            self.metrics.slots_busy.set(self.busy())

    def _run(self) -> None:
        while True:
            with self.cond:
                self._drop_cancelled()
                admits = self._take_admissions()
                job = self.jobs.popleft() if self.jobs else None
                active = any(self.running.values())
                if not admits and job is None and not active:
                    if self.stopping and not self.queued():
                        self._gauges()
                        return
                    self.cond.wait(0.05)
                    continue
                self._gauges()
            for key, slot, seq in admits:
                self._admit(key, slot, seq)
            if job is not None and job.future.set_running_or_notify_cancel():
                try:
                    job.future.set_result(job.fn())
                except BaseException as e:  # the job's caller gets the error; the server goes on
                    job.future.set_exception(e)
            for key, running in self.running.items():
                if running:
                    self._step(key)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for key, running in self.running.items():
            for slot, seq in list(running.items()):
                if seq.cancelled is None and seq.deadline is not None and now > seq.deadline:
                    seq.cancel("timeout")
                if seq.cancelled is not None:
                    self._retire(key, slot, seq.cancelled)
        for q in self.waiting.values():
            for seq in [s for s in q if s.cancelled is not None or (s.deadline is not None and now > s.deadline)]:
                q.remove(seq)
                seq.cancel("timeout")
                seq.sink("done", seq.cancelled)
                if self.metrics is not None:
                    self.metrics.finished.labels(seq.cancelled).inc()

    def _take_admissions(self) -> list:
        out = []
        for key, q in self.waiting.items():
            lane, running = self.lanes[key], self.running[key]
            free = [i for i in range(lane.slots) if i not in running]
            while q and free:
                seq, slot = q.popleft(), free.pop(0)
                running[slot] = seq
                out.append((key, slot, seq))
        return out

    def _admit(self, key, slot: int, seq: Seq) -> None:
        try:
            self.lanes[key].admit(slot, seq.prompt, seq.max_new, base_key(seq.seed, seq.sample_index),
                                  seq.temperature, seq.top_k, seq.top_p, seq.prompt_group_size)
        except Exception as e:  # a bad row fails its request only
            log.exception("admitting a request failed")
            with self.cond:
                self.running[key].pop(slot, None)
            seq.sink("error", f"{type(e).__name__}: {e}")

    def _retire(self, key, slot: int, reason: str) -> None:
        seq = self.running[key].pop(slot)
        self.lanes[key].release(slot)
        seq.sink("done", reason)
        if self.metrics is not None:
            self.metrics.finished.labels(reason).inc()

    def _step(self, key) -> None:
        lane = self.lanes[key]
        try:
            out = lane.step()
        except Exception as e:  # fail the rows of this lane, keep serving
            log.exception("a decoding step failed")
            with self.cond:
                for slot, seq in list(self.running[key].items()):
                    self.running[key].pop(slot)
                    lane.release(slot)
                    seq.sink("error", f"{type(e).__name__}: {e}")
            return
        made = 0
        with self.cond:
            for slot, seq in list(self.running[key].items()):
                ok = out.ok[slot]
                ids, lps = out.tokens[slot][ok], out.logprobs[slot][ok]
                reason = None
                if seq.eos >= 0:
                    hit = np.flatnonzero(ids == seq.eos)
                    if len(hit):  # the row ends at its EOS (kept); what the step drew after it is dropped
                        ids, lps, reason = ids[:hit[0] + 1], lps[:hit[0] + 1], "stop"
                seq.generated += len(ids)
                made += len(ids)
                if reason is None and seq.generated >= seq.max_new:
                    reason = "length"
                if len(ids):
                    seq.sink("tokens", ([int(x) for x in ids], [float(x) for x in lps]))
                if reason is not None:
                    self._retire(key, slot, reason)
            self._gauges()
        if self.metrics is not None:
            self.metrics.generated(made)
