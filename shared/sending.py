"""Requests in flight: up to `in_flight` sender threads send the stream's work items while this thread packs the
next ones; what they come to is committed strictly in stream order, so the checkpoint is always the contiguous prefix
of settled requests. A crash sends again at most the requests that were in flight (upserts are idempotent).

Rate limiting is shared: the senders use one SendGridClient, whose pacer makes every thread wait once any call
meets a 429 or `X-RateLimit-Remaining: 0` (sendgrid._Pacer). The first failure stops every sender after its current
request; what was settled before it in stream order is committed, the rest is sent again by the resume.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")  # what one work item came to (stream.Sent)
Item = tuple[str, Any]  # ("json", ContactBatch) or ("csv", ImportFile)


@dataclass
class _Order(Generic[T]):
    """Results by sequence number, handed to `commit` in order as soon as the next one is there."""

    commit: Callable[[T], None]
    next: int = 0
    waiting: dict[int, T] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def done(self, seq: int, result: T) -> None:
        with self.lock:
            self.waiting[seq] = result
            while self.next in self.waiting:
                self.commit(self.waiting.pop(self.next))
                self.next += 1


def send_in_flight(work: Iterator[Item], send: Callable[[Item], T], commit: Callable[[T], None], *,
                   in_flight: int, between: Callable[[], None] | None = None,
                   handed_all: Callable[[], None] | None = None) -> None:
    """Send every work item with up to `in_flight` requests at once, committing results in work order. `between`
    runs on this thread whenever an item is handed on (e.g. polling the jobs of committed requests); `handed_all`
    once the last item has been handed on, while the last requests are still out (work that needs the whole
    reading but none of SendGrid's answers). Raises the first failure once every sender has stopped."""
    senders = max(1, in_flight)
    # one item waits for a sender (~6 MB at most), beside those being sent and the one being packed: packing a
    # request takes a fraction of the time sending it does, so a deeper queue only held more bodies in memory
    # (1M at max_in_flight 4: 177 MB with a queue as deep as the senders)
    q: queue.Queue[tuple[int, Item] | None] = queue.Queue(maxsize=1)
    order: _Order[T] = _Order(commit)
    failure: list[BaseException] = []
    stop = threading.Event()

    def sender() -> None:
        while (entry := q.get()) is not None:
            if stop.is_set():
                continue  # drain: the producer must never block
            seq, item = entry
            try:
                result = send(item)
                order.done(seq, result)
            except BaseException as exc:
                failure.append(exc)
                stop.set()

    threads = [threading.Thread(target=sender, name=f"sendgrid-sender-{n}", daemon=True) for n in range(senders)]
    for thread in threads:
        thread.start()
    try:
        for seq, item in enumerate(work):
            if stop.is_set():
                break
            q.put((seq, item))
            if between is not None and not stop.is_set():
                between()
        else:
            if handed_all is not None and not stop.is_set():
                handed_all()
    finally:
        for _ in threads:
            q.put(None)
        for thread in threads:
            thread.join()
    if failure:
        raise failure[0]
