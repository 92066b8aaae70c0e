"""Reading and writing image files beside the model's work: a reader thread that decodes the next images
while the sampler runs, and a writer thread that encodes and writes results while it runs the next batch.

Both hold bounded queues (a folder never sits in memory whole), and both hand an unexpected exception back
to the caller's thread, which raises it: a failure the upscaler does not expect still stops the run, as
it would without threads. Expected per-file failures are the caller's to turn into report lines.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

_DONE = object()
# How often a blocked thread looks whether the run was stopped (seconds): only bounds the wait at the end.
_POLL_S = 0.1


class BackgroundReader(Generic[Item, Result]):
    """`read(item)` for each item in a thread, at most `depth` results ahead of the consumer.

    Iterate it for (item, result) in the items' order. `read` returns whatever the consumer wants,
    e.g. an image or the error that stopped it; an exception it raises stops the reader and is raised
    in the consumer's thread. `done` counts the items read so far (the reader runs ahead by this much
    minus what was consumed). `close()` stops the thread early.
    """

    def __init__(self, items: Iterable[Item], read: Callable[[Item], Result], depth: int):
        if depth < 1:
            raise ValueError(f"read-ahead depth = {depth}: must be >= 1")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.done = 0
        self._thread = threading.Thread(
            target=self._work, args=(list(items), read), name="addsr-reader", daemon=True
        )
        self._thread.start()

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, items: list, read: Callable) -> None:
        try:
            for item in items:
                result = read(item)
                self.done += 1
                if not self._put((item, result)):
                    return
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(_Raised(error))
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[tuple[Item, Result]]:
        try:
            while True:
                try:
                    value = self._queue.get(timeout=_POLL_S)
                except queue.Empty:
                    if self._thread.is_alive() or not self._queue.empty():
                        continue
                    raise RuntimeError("the reader thread stopped without finishing") from None
                if value is _DONE:
                    return
                if isinstance(value, _Raised):
                    raise value.error
                yield value
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class BackgroundWriter:
    """`write(job)` for each submitted job in one thread, in submission order, at most `depth` waiting.

    `submit` blocks while the queue is full (the model never runs far ahead of the disk) and raises in
    the caller's thread an exception an earlier `write` raised; `close()` waits for every job, then
    raises such an exception if one is left.
    """

    def __init__(self, write: Callable[[object], None], depth: int):
        if depth < 1:
            raise ValueError(f"write queue depth = {depth}: must be >= 1")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, args=(write,), name="addsr-writer", daemon=True)
        self._thread.start()

    def _work(self, write: Callable) -> None:
        while True:
            job = self._queue.get()
            if job is _DONE:
                return
            if self._error is not None:
                continue  # after a failure nothing more is written; the caller raises it
            try:
                write(job)
            except BaseException as error:
                self._error = error

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job) -> None:
        self._raise()
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(_DONE)
        self._thread.join()
        self._raise()


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error
