"""`data_store.prefetch.prefetch`: order, overlap, bounded read-ahead, errors, early stop.

Overlap is shown with events, not timings (the test machine is shared): the load of the next
item must start while the caller still holds the current one.
"""

from __future__ import annotations

import threading
import time

import pytest

from data_store.prefetch import prefetch


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("prefetch")]


def test_results_in_order_with_their_items():
    def load(x):
        time.sleep(0.01 * ((7 * x) % 3))  # loads finish at uneven times
        return x * x

    assert list(prefetch(range(10), load)) == [(x, x * x) for x in range(10)]
    assert list(prefetch([], load)) == []
    assert not _prefetch_threads()


def test_the_next_item_loads_while_the_caller_works():
    started = {i: threading.Event() for i in range(3)}

    def load(x):
        started[x].set()
        return x

    for item, _ in prefetch(range(3), load):
        if item < 2:  # still holding `item`: the next load must begin without us
            assert started[item + 1].wait(timeout=10), f"item {item + 1} did not load ahead"


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_at_most_depth_items_load_ahead(depth):
    calls = []
    lock = threading.Lock()

    def load(x):
        with lock:
            calls.append(x)
        return x

    for held, _ in prefetch(range(8), load, depth=depth):
        time.sleep(0.05)  # give the thread every chance to run further ahead than allowed
        with lock:
            assert max(calls) <= held + depth, (held, calls)


def test_items_are_iterated_in_the_callers_thread_only():
    seen = []

    def items():
        for i in range(4):
            seen.append(threading.current_thread())
            yield i

    assert [i for i, _ in prefetch(items(), lambda x: x)] == [0, 1, 2, 3]
    assert set(seen) == {threading.current_thread()}


def test_a_failing_load_is_delivered_with_its_item_and_the_rest_still_come():
    class Boom(BaseException):  # not even an Exception: still delivered, not swallowed
        pass

    def load(x):
        if x == 1:
            raise ValueError(f"bad item {x}")
        if x == 3:
            raise Boom("worse")
        return -x

    out = list(prefetch(range(5), load))
    assert [i for i, _ in out] == [0, 1, 2, 3, 4]
    assert out[0][1] == 0 and out[2][1] == -2 and out[4][1] == -4
    err = out[1][1]
    assert isinstance(err, ValueError) and str(err) == "bad item 1"
    assert err.__traceback__ is not None  # where it was raised, for the caller's message
    assert isinstance(out[3][1], Boom)


def test_every_load_failing_never_hangs():
    def load(x):
        raise OSError(x)

    out = list(prefetch(range(20), load, depth=2))
    assert [type(r) for _, r in out] == [OSError] * 20


def test_stopping_early_joins_the_running_load_and_starts_no_more():
    calls, started, finished = [], threading.Event(), threading.Event()

    def load(x):
        calls.append(x)
        if x == 1:
            started.set()
            time.sleep(0.3)  # running when the caller stops
            finished.set()
        return x

    for item, _ in prefetch(range(100), load):
        assert item == 0
        assert started.wait(timeout=10)
        break  # the for loop closes the generator
    assert finished.is_set(), "the running load was not waited for"
    assert calls == [0, 1]
    assert not _prefetch_threads()


def test_close_without_starting_and_a_failing_item_source():
    it = prefetch(range(3), lambda x: x)
    it.close()  # never started: nothing ran
    assert not _prefetch_threads()

    def items():
        yield 0
        raise RuntimeError("the item source broke")

    it = prefetch(items(), lambda x: x)
    assert next(it) == (0, 0)
    with pytest.raises(RuntimeError, match="source broke"):
        next(it)
    assert not _prefetch_threads()


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        prefetch(range(3), lambda x: x, depth=0)
