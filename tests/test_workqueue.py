"""The controller's work queue: every change is worked on, in order, and never by two workers at once."""

from __future__ import annotations

import threading

from vmquota.workqueue import WorkQueue


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_keys_come_out_in_the_order_they_were_added_each_once() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for key in ("a", "b", "a", "c", "b"):
        queue.add(key)
    handed = []
    while not queue.idle():
        key = queue.get()
        assert key is not None
        handed.append(key)
        queue.done(key)
    assert handed == ["a", "b", "c"]


def test_a_key_added_while_it_is_worked_on_comes_back_after_done_not_before() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("vm")
    assert queue.get() == "vm"
    queue.add("vm")  # changed again meanwhile: must be looked at again, but not by a second worker now
    queue.add("other")
    assert queue.get() == "other"
    queue.done("other")
    assert not queue.idle()
    queue.done("vm")
    assert queue.get() == "vm"  # the change made during the first look is not lost
    queue.done("vm")
    assert queue.idle()


def test_a_key_for_later_waits_for_its_time_on_the_clock() -> None:
    clock = Clock()
    queue: WorkQueue[str] = WorkQueue(clock=clock)
    queue.add("later", after=5.0)
    queue.add("now")
    assert queue.get() == "now"
    queue.done("now")
    got: list[str | None] = []
    worker = threading.Thread(target=lambda: got.append(queue.get()))
    worker.start()
    worker.join(timeout=0.1)
    assert worker.is_alive() and got == []  # not due: the worker waits
    clock.now += 5.0
    queue.add("nudge", after=60.0)  # any add wakes the waiting worker, which then sees "later" due
    worker.join(timeout=5)
    assert got == ["later"]


def test_close_releases_waiting_workers() -> None:
    queue: WorkQueue[str] = WorkQueue()
    got: list[str | None] = []
    workers = [threading.Thread(target=lambda: got.append(queue.get())) for _ in range(3)]
    for worker in workers:
        worker.start()
    queue.close()
    for worker in workers:
        worker.join(timeout=5)
    assert got == [None, None, None]
