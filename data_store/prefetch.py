"""Load the next item in a background thread while the caller works on the current one.

    for case_id, case in prefetch(case_ids, store.read_case):
        if isinstance(case, BaseException):
            ...  # that item's failure; the others still come
        ...  # work on `case` while the next one loads

What it guarantees:

- Items come out in input order, each once, with what `load(item)` returned or, if it raised,
  the exception itself (traceback attached), so the caller decides: record it, skip it or
  ``raise result``. Nothing is swallowed and a failing load never stops the loads after it.
  An exception raised by `items` itself is raised to the caller after the items before it.
- At most `depth` items are loaded (or loading) ahead of the one the caller holds, so memory is
  bounded by ``depth + 1`` loaded items. `items` is iterated in the caller's thread only, one
  step ahead of need (it may be a generator that is not thread-safe).
- One background thread, started on the first `next()` and joined when the generator ends:
  when the items run out, or when it is closed (the caller breaks out of a ``for`` loop over it,
  calls ``close()``, or drops it). Loads not started yet are then cancelled; one already running
  is waited for, so no load is left running behind the caller. A loop body that raises keeps
  the generator alive in its traceback: wrap it in ``contextlib.closing`` to stop at once.

The overlap is real where `load` releases the GIL (file reads, zlib/blosc decompression, numpy
arithmetic) and so does the caller's work (torch operators): reading and normalising the next
case runs beside the current case's sliding-window inference.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

__all__ = ["prefetch"]

T = TypeVar("T")
R = TypeVar("R")


def prefetch(
    items: Iterable[T], load: Callable[[T], R], depth: int = 1
) -> Iterator[tuple[T, R | BaseException]]:
    """``(item, load(item))`` in order, loading up to `depth` items ahead in a thread.

    Args:
        items: what to load; iterated lazily, in the caller's thread.
        load: called once per item, in the background thread.
        depth: how many items may be loaded ahead of the one the caller holds (>= 1).

    Returns:
        An iterator of ``(item, result)``: `result` is what `load` returned, or the exception
        it raised.

    Raises:
        ValueError: `depth` < 1.
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be at least 1, got {depth}")
    return _prefetch(iter(items), load, depth)


def _prefetch(source: Iterator, load: Callable, depth: int) -> Iterator[tuple]:
    """The generator behind `prefetch` (its argument check runs at call time, not on `next`)."""
    pending: deque[tuple[T, Future]] = deque()
    broken: list[Exception] = []  # what `source` raised: raised after the items before it
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        try:
            _fill(source, pending, broken, pool, load, depth + 1)  # the first and `depth` more
            while pending:
                item, future = pending.popleft()
                error = future.exception()  # waits; never raises what `load` raised
                result = error if error is not None else future.result()
                _fill(source, pending, broken, pool, load, depth)
                yield item, result
                del result, error  # the caller is done with it: do not hold it while waiting
            if broken:
                raise broken[0]
        finally:
            for _, future in pending:
                future.cancel()  # not started: never runs; a running one is joined on exit


def _fill(source: Iterator, pending: deque, broken: list, pool, load, size: int) -> None:
    """Submit items from `source` until `size` are pending, it is exhausted or it raised."""
    while not broken and len(pending) < size:
        try:
            item = next(source)
        except StopIteration:
            return
        except Exception as err:
            broken.append(err)
            return
        pending.append((item, pool.submit(load, item)))
