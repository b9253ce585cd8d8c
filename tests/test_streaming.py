"""run_ahead(): the work runs ahead of a slow reader, which gets every item and knows how far behind it is.
UpdateBudget: when an update goes out, and whether with pictures."""

import contextvars
import threading
import time

import pytest

from ui.streaming import UpdateBudget, run_ahead


def counting(n, seconds=0.0, log=None):
    try:
        for i in range(n):
            time.sleep(seconds)
            if log is not None:
                log.append(i)
            yield i
    finally:
        if log is not None:
            log.append("closed")


def test_a_reader_that_keeps_up_gets_every_item_with_nothing_waiting():
    taken = threading.Semaphore(0)

    def paced():  # the next item only once the reader has the last one
        for i in range(8):
            yield i
            taken.acquire(timeout=5)

    got = []
    for item, waiting in run_ahead(paced()):
        got.append((item, waiting))
        taken.release()
    assert got == [(i, 0) for i in range(8)]


def test_a_slow_reader_does_not_hold_the_work_back_and_sees_what_waits():
    produced, got = [], []
    start = time.perf_counter()
    for item, waiting in run_ahead(counting(20, seconds=0.005, log=produced)):
        got.append((item, waiting))
        time.sleep(0.05 if waiting == 0 else 0.001)  # a full update, or a light one when overtaken
    elapsed = time.perf_counter() - start
    assert [item for item, _ in got] == list(range(20)) and got[-1][1] == 0
    assert any(waiting > 0 for _, waiting in got)
    assert produced == list(range(20)) + ["closed"]
    assert elapsed < 20 * 0.05 / 2  # held back, it would take 20 x 50 ms


def test_an_error_in_the_work_reaches_the_reader_after_the_items_before_it():
    def failing():
        yield 1
        time.sleep(0.02)
        raise ValueError("broken step")

    got = []
    with pytest.raises(ValueError, match="broken step"):
        for item, _ in run_ahead(failing()):
            got.append(item)
    assert got == [1]


def test_closing_the_reader_stops_the_work_after_the_item_in_progress():
    produced = []
    reader = run_ahead(counting(1000, seconds=0.01, log=produced))
    assert next(reader)[0] == 0
    reader.close()  # a cancelled request
    deadline = time.time() + 2
    while "closed" not in produced and time.time() < deadline:
        time.sleep(0.01)
    assert produced[-1] == "closed" and len(produced) <= 4  # item 0, at most two more, "closed"


def test_the_work_sees_the_readers_context_variables():
    request = contextvars.ContextVar("request", default=None)
    request.set("the user's request")

    def work():
        yield request.get(), threading.current_thread().name

    ((seen, thread_name), waiting), = list(run_ahead(work()))
    assert seen == "the user's request" and thread_name != threading.current_thread().name and waiting == 0


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_pictures_wait_for_their_share_and_light_updates_keep_the_gap_short():
    clock = FakeClock()
    budget = UpdateBudget(share=0.1, max_gap=1.0, clock=clock)
    assert budget.allows() and not budget.due()  # the first update has pictures
    with budget.spending():
        clock.now = 0.5  # drawing and sending took 0.5 s: pictures wait until 10 % of the time again
    clock.now = 1.4
    assert not budget.allows() and not budget.due()  # the page had news 0.9 s ago
    clock.now = 1.5
    assert not budget.allows() and budget.due()  # a light update now
    with budget.spending():
        clock.now = 1.52
    assert not budget.due()  # the gap counts from the end of the last update, of any kind
    clock.now = 5.3
    assert budget.allows()  # 0.52 s spent of 5.3 s


def test_on_a_gpu_every_update_has_pictures_and_none_is_due_without_a_gap():
    budget = UpdateBudget(share=None)
    with budget.spending():
        pass
    assert budget.allows() and not budget.due()
