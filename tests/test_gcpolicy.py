"""gcpolicy: settings held while any holder is inside, restored by the last one out, across threads."""

from __future__ import annotations

import gc
import threading

from shared import gcpolicy


def test_sparse_raises_the_thresholds_and_the_last_holder_restores_them() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        with gcpolicy.sparse:
            assert gc.get_threshold() == gcpolicy.SPARSE_THRESHOLDS
            inside, leave = threading.Event(), threading.Event()

            def other_run() -> None:
                with gcpolicy.sparse:
                    inside.set()
                    leave.wait(10)

            t = threading.Thread(target=other_run)
            t.start()
            assert inside.wait(10)
        assert gc.get_threshold() == gcpolicy.SPARSE_THRESHOLDS  # the other run is still inside
        leave.set()
        t.join(10)
        assert gc.get_threshold() == (700, 10, 10)
        gc.set_threshold(100_000, 5, 5)  # a host that set a higher threshold keeps it
        with gcpolicy.sparse:
            assert gc.get_threshold() == (100_000, 20, 10)
        assert gc.get_threshold() == (100_000, 5, 5)
    finally:
        gc.set_threshold(*before)


def test_sparse_still_collects_cycles() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        with gcpolicy.sparse:
            gc.collect()
            collected: list[int] = []
            gc.callbacks.append(lambda phase, info: collected.append(info["collected"]) if phase == "stop" else None)
            try:
                for _ in range(200_000):  # 200,000 cycles: garbage that only the collector can free
                    a: list[object] = []
                    a.append(a)
            finally:
                gc.callbacks.pop()
            assert sum(collected) > 100_000  # the collector ran by itself and freed them
    finally:
        gc.set_threshold(*before)


def test_pause_stops_collection_and_keeps_a_disabled_collector_disabled() -> None:
    assert gc.isenabled()
    with gcpolicy.pause:
        assert not gc.isenabled()
        with gcpolicy.pause:
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gcpolicy.pause:
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_sparse_leaves_automatic_collection_off_when_the_host_turned_it_off() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(0)
        with gcpolicy.sparse:
            assert gc.get_threshold()[0] == 0
        assert gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*before)
