"""The prefetch thread: batches are assembled in the background while the consumer trains.

Decoding and assembling a batch is mostly numpy and pyarrow work, which releases the GIL, so
a thread that stays a bounded number of batches ahead overlaps it with the training step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_ITEM, _END, _ERROR = range(3)


def _put_unless_stopped(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """`items`, produced by a background thread that stays at most `depth` items ahead.

    An exception in the thread is re-raised in the consumer (same object, same message).
    Closing or abandoning the returned generator stops the thread and waits for it.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if not _put_unless_stopped(slots, (_ITEM, item), stop):
                    return
            _put_unless_stopped(slots, (_END, None), stop)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            _put_unless_stopped(slots, (_ERROR, exc), stop)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="ctrscale-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, payload = slots.get()
            if kind == _END:
                return
            if kind == _ERROR:
                raise payload
            yield payload
    finally:
        stop.set()
        thread.join()
