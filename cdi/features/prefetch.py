"""Bounded prefetch: prepare the next batch in a thread while the current one computes.

Decoding, preprocessing, copying to the device and encoding of batch k+1 overlap the network
passes of batch k. The queue holds at most ``depth`` prepared batches, so memory stays
bounded; an error in the thread is raised in the caller, at the batch that hit it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

S = TypeVar("S")
T = TypeVar("T")

_DONE = object()


def prefetched(sources: Sequence[S], prepare: Callable[[S], T], *, depth: int = 1,
               enabled: bool = True) -> Iterator[T]:
    """``prepare(s)`` for each of ``sources`` in order, computed up to ``depth`` ahead.

    With ``enabled=False`` (or a single source) everything runs in the caller's thread.
    Stopping the iteration early stops the thread after the batch it is preparing.
    """
    if not enabled or len(sources) <= 1:
        for s in sources:
            yield prepare(s)
        return
    out: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def work() -> None:
        try:
            for s in sources:
                if stop.is_set():
                    return
                item: object = prepare(s)
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the caller, raised there
            out.put(_Failure(exc))
            return
        out.put(_DONE)

    thread = threading.Thread(target=work, name="cdi-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        # Unblock a thread waiting to put, then wait for it to finish its batch.
        while thread.is_alive():
            try:
                out.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
