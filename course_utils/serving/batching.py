"""Dynamic batching: gather concurrent requests into one model call.

On a small model a call with 32 images costs only a few times a call with one (lesson 00), so
a service under concurrent load wastes most of its time on per-call overhead. The batcher puts
each request's tensor in a queue; one worker thread takes up to ``max_batch_size`` of them,
waiting at most ``max_wait_ms`` after the first for others to arrive, runs the model **once**,
and hands each caller its own row through a ``concurrent.futures.Future`` (which threads can
wait on and asyncio can await).

The queue is bounded (``max_queue``): past it, :meth:`submit_all` raises :class:`BatcherFull`
at once, so an overloaded service refuses work it could not finish in time (a 503 with
``Retry-After``) instead of queueing it until every caller times out.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

_STOP = object()


class BatcherFull(RuntimeError):
    """The queue holds ``max_queue`` inputs already: the caller should shed the request."""


class DynamicBatcher:
    """Run ``predict(batch) -> rows`` on batches gathered from concurrent :meth:`submit` calls.

    Inputs are numpy arrays (the service's) or torch tensors; a batch is stacked the same way.

    >>> b = DynamicBatcher(lambda x: x * 2, max_batch_size=4, max_wait_ms=1)
    >>> b.submit(np.ones(3)).result(timeout=5).tolist()
    [2.0, 2.0, 2.0]
    >>> b.close()
    """

    def __init__(self, predict: Callable[[Any], Any], max_batch_size: int = 32,
                 max_wait_ms: float = 2.0, on_batch: Callable[[int], None] | None = None,
                 max_queue: int = 0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.on_batch = on_batch
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0 (0: unbounded), got {max_queue}")
        self.max_queue = max_queue
        self._admit = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="dynamic-batcher", daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> Future:
        """Queue one input (no batch dimension); the future resolves to its output row."""
        return self.submit_all([item])[0]

    def submit_all(self, items: list[Any]) -> list[Future]:
        """Queue inputs together, or none of them (:class:`BatcherFull` when they do not fit)."""
        with self._admit:   # one lock for admission and close: nothing is queued behind the stop mark
            if self._closed:
                raise RuntimeError("the batcher is closed")
            waiting = self._queue.qsize()
            # a request larger than the whole queue is admitted when the queue is empty, never refused forever
            if self.max_queue and waiting + len(items) > self.max_queue and waiting > 0:
                raise BatcherFull(f"{waiting} inputs waiting for the model, at most {self.max_queue}")
            futures: list[Future] = []
            for item in items:
                future: Future = Future()
                self._queue.put((item, future))
                futures.append(future)
        return futures

    @property
    def full(self) -> bool:
        """Whether a new request would be refused now (checked before decoding an upload)."""
        return bool(self.max_queue) and self._queue.qsize() >= self.max_queue

    @property
    def waiting(self) -> int:
        """Inputs queued and not yet taken into a batch."""
        return self._queue.qsize()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker after the requests already queued."""
        with self._admit:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    def _gather(self, first) -> tuple[list, bool]:
        items, stop = [first], False
        deadline = time.monotonic() + self.max_wait_s
        while len(items) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            items.append(item)
        return items, stop

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            items, stop = self._gather(first)
            live = [(x, f) for x, f in items if f.set_running_or_notify_cancel()]
            if live:
                try:
                    outputs = self.predict(_stack([x for x, _ in live]))
                    for (_, future), row in zip(live, outputs, strict=True):
                        future.set_result(row)
                except Exception as error:  # the model failed: every caller in the batch hears why
                    for _, future in live:
                        future.set_exception(error)
                if self.on_batch is not None:
                    self.on_batch(len(live))
            if stop:
                return


def _stack(items: list[Any]) -> Any:
    if isinstance(items[0], np.ndarray):
        return np.stack(items)
    import torch

    return torch.stack(items)
