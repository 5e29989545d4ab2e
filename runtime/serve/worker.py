"""The one thread that runs the model, behind a bounded queue, and how a request waits for it.

The model is not thread-safe and two generations at once would only thrash a small device, so every
model call is a job on one worker thread. A request waits in a queue of `queue_size`; when it is full
the answer is 503 + Retry-After at once. Each job has two deadlines, checked separately: the queue
wait (over it: 503, the server is overloaded, retry) and the generation (over it: cancelled at the
next token). A job is also cancelled when its client disconnects."""
from __future__ import annotations

import asyncio
import concurrent.futures
import math
import queue
import threading
import time
from typing import Any, Awaitable, Callable

from molmo_edge.runtime.serve.errors import APIError


class Cancelled(Exception):
    """Raised inside generation when the request's client is gone or its time is up."""

    def __init__(self, why: str = "cancelled"):
        super().__init__(why)
        self.why = why


class Job:
    def __init__(self, fn: Callable[["Job"], Any]):
        self.fn, self.future = fn, concurrent.futures.Future()
        self.cancelled = threading.Event()
        self.why = "cancelled"
        self.started = threading.Event()
        self.gen_deadline: float | None = None   # monotonic time after which generation stops

    def cancel(self, why: str) -> None:
        self.why = why
        self.cancelled.set()

    def check(self, _piece: str = "") -> None:
        """Called at every generated piece of text: stop when cancelled or past the generation deadline."""
        if self.gen_deadline is not None and time.monotonic() > self.gen_deadline:
            self.cancel("timeout")
        if self.cancelled.is_set():
            raise Cancelled(self.why)


class ModelWorker:
    """One thread, one queue; `service_s` (a moving average of job time) sets Retry-After."""

    def __init__(self, queue_size: int):
        self.capacity = queue_size
        self._q: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.busy = False
        self.service_s = 1.0
        self.completed = self.failed = 0
        self._thread = threading.Thread(target=self._run, name="model worker", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._q.qsize()

    def full(self) -> bool:
        return self._q.full()

    def retry_after(self) -> int:
        return max(1, math.ceil(self.service_s * (self.depth + 1)))

    def busy_error(self, message: str | None = None) -> APIError:
        ra = self.retry_after()
        return APIError(503, message or f"the model is busy ({self.depth} requests queued); retry in {ra} s",
                        code="model_busy", headers={"Retry-After": str(ra)})

    def submit(self, fn: Callable[[Job], Any]) -> Job:
        job = Job(fn)
        try:
            self._q.put_nowait(job)
        except queue.Full:
            raise self.busy_error() from None
        return job

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
                continue
            job.started.set()
            self.busy, t = True, time.perf_counter()
            try:
                job.future.set_result(job.fn(job))
                self.completed += 1
            except BaseException as e:  # delivered to the waiting request, never kills the worker
                job.future.set_exception(e)
                self.failed += 1
            finally:
                self.busy = False
                self.service_s = 0.8 * self.service_s + 0.2 * (time.perf_counter() - t)

    def close(self, timeout: float = 0.0) -> None:
        """Stop taking jobs; the running one finishes (or is cancelled by its request) first."""
        while True:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        try:
            self._q.put(None, timeout=1)
        except queue.Full:
            pass
        self._thread.join(timeout)


async def run_job(worker: ModelWorker, fn: Callable[[Job], Any], queue_timeout: float, gen_timeout: float,
                  disconnected: Callable[[], Awaitable[None]] | None = None) -> Any:
    """Queue `fn`, wait for it (never blocking the event loop) and return its result.

    Over `queue_timeout` in the queue: 503 + Retry-After (retrying later may work). Past `gen_timeout`
    of generation: the job stops at its next token and this raises Cancelled("timeout"). When
    `disconnected` returns (the client left), the job is cancelled and this raises Cancelled("disconnected")."""
    job = worker.submit(fn)
    fut = asyncio.wrap_future(job.future)
    watch = asyncio.ensure_future(disconnected()) if disconnected else None
    try:
        queue_deadline = time.monotonic() + queue_timeout
        while not job.started.is_set() and not fut.done():   # queued: poll cheaply for the start
            if watch is not None and watch.done():
                job.cancel("disconnected")
                job.future.cancel()
                raise Cancelled("disconnected")
            if time.monotonic() > queue_deadline:
                if job.future.cancel():
                    raise worker.busy_error(f"the model is busy: waited {queue_timeout:g} s in the queue; retry later")
                break
            await asyncio.wait([fut] + ([watch] if watch else []), timeout=0.02, return_when=asyncio.FIRST_COMPLETED)
        job.gen_deadline = time.monotonic() + gen_timeout
        waits = [fut] + ([watch] if watch else [])
        done, _ = await asyncio.wait(waits, timeout=gen_timeout + 5, return_when=asyncio.FIRST_COMPLETED)
        if fut not in done:
            job.cancel("disconnected" if watch is not None and watch in done else "timeout")
            try:
                await asyncio.wait_for(asyncio.shield(fut), 10)
            except BaseException:
                pass
            raise Cancelled(job.why)
        return fut.result()
    except asyncio.CancelledError:
        job.cancel("disconnected")
        job.future.cancel()
        raise
    finally:
        if watch is not None:
            watch.cancel()
