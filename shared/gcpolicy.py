"""The cyclic garbage collector during bulk work.

Exports and the sandbox allocate millions of short-lived objects (rows, contacts, JSON documents) that reference
counting frees; with the default thresholds the collector still passes over the young ones every 700 allocations
and, growing ever older, over the whole heap: ~1.3 s of a 14 s export of 1M rows, measured with gc.callbacks.
Both helpers are re-entrant across threads: the first to enter sets, the last to leave restores.
"""

from __future__ import annotations

import gc
import threading

SPARSE_THRESHOLDS = (50_000, 20, 10)  # gen0 allocations before a pass (default 700); gen1 and gen2 (10, 10) about so


class _Shared:
    """A process-wide setting held while any holder is inside; what was there before comes back after the last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._apply()
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._restore()

    def _apply(self) -> None:
        raise NotImplementedError

    def _restore(self) -> None:
        raise NotImplementedError


class _Pause(_Shared):
    """No collection at all: for bounded bursts (one request's contacts), never for a whole export."""

    _was_enabled = False

    def _apply(self) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()

    def _restore(self) -> None:
        if self._was_enabled:
            gc.enable()


class _Sparse(_Shared):
    """Collections 70x rarer: cycles (exceptions, HTTP internals) are still reclaimed, so memory stays bounded over
    a run of any length."""

    _before = gc.get_threshold()

    def _apply(self) -> None:
        self._before = gc.get_threshold()
        if self._before[0] == 0:  # the host turned automatic collection off: leave it so
            return
        gc.set_threshold(*(max(a, b) for a, b in zip(self._before, SPARSE_THRESHOLDS, strict=True)))

    def _restore(self) -> None:
        gc.set_threshold(*self._before)


pause = _Pause()  # `with gcpolicy.pause:`
sparse = _Sparse()  # `with gcpolicy.sparse:`
