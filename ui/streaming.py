"""Streaming that never slows the work: the work runs ahead in a thread while the reader catches up.

A viewer that renders and sends pictures after every step would otherwise hold the denoising
loop until each update has gone out (with Gradio, about 85 ms per update on 2 CPU cores). Here
the loop never waits; the reader learns how far behind it is and can send a light update
(numbers only) for a step that a newer one has already overtaken.
"""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
_END = object()


def run_ahead(items: Iterable[T]) -> Iterator[tuple[T, int]]:
    """Iterate ``items`` in a background thread; yield ``(item, waiting)`` for every item in
    order, where ``waiting`` is how many newer items were already made when this one was handed
    over (0 for the newest, so always for the last).

    Closing this generator (a cancelled request) stops the producer after the item it is making
    and closes ``items``. An exception raised by ``items`` is raised here after the items before
    it. The producer runs in a copy of the caller's context variables, so request-scoped state
    (Gradio's request, which ZeroGPU's ``@spaces.GPU`` reads) is the same as the caller's.
    """
    made: queue.Queue = queue.Queue()
    stop = threading.Event()

    def produce():
        iterator = iter(items)
        try:
            for item in iterator:
                made.put((item, None))
                if stop.is_set():
                    break
        except BaseException as error:  # handed to the reader, raised there
            made.put((_END, error))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            made.put((_END, None))

    context = contextvars.copy_context()
    producer = threading.Thread(target=context.run, args=(produce,), name="run-ahead", daemon=True)
    producer.start()
    try:
        while True:
            item, error = made.get()
            if item is _END:
                if error is not None:
                    raise error
                break
            with made.mutex:  # the end marker is not an item: the last item sees waiting == 0
                waiting = sum(1 for newer, _ in made.queue if newer is not _END)
            yield item, waiting
        producer.join()
    finally:
        stop.set()  # on close: the producer stops after its current item


class UpdateBudget:
    """When to send an update, and whether with pictures. Pictures go out while sending has taken
    at most ``share`` of the time since the stream started (``share=None``: always). Between them,
    a light update is ``due`` once ``max_gap`` seconds have passed since the last update ended
    (``None``: never). Time every update with ``spending()`` around the ``yield``: a generator
    resumes when its consumer has dealt with what it yielded."""

    def __init__(self, share: float | None, max_gap: float | None = None, clock=time.perf_counter):
        self.share = share
        self.max_gap = max_gap
        self.clock = clock
        self.started = self.last_update_end = clock()
        self.spent = 0.0

    def allows(self) -> bool:
        return self.share is None or self.spent <= self.share * (self.clock() - self.started)

    def due(self) -> bool:
        return self.max_gap is not None and self.clock() - self.last_update_end >= self.max_gap

    @contextmanager
    def spending(self):
        start = self.clock()
        try:
            yield
        finally:
            self.last_update_end = self.clock()
            self.spent += self.last_update_end - start
