"""Ordered parallel map with bounded memory, shared by the data scripts.

`multiprocessing.Pool.imap` reads its whole input ahead of the workers, which on a multi-GB corpus
means the whole corpus in memory; here at most `in_flight_per_process` items per worker are queued.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
from typing import Any, Callable, Iterable, Iterator


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], n_processes: int,
                initializer: Callable[..., None] | None = None, initargs: tuple = (),
                in_flight_per_process: int = 2) -> Iterator[Any]:
    """fn(item) for every item, in input order. With one process it runs here (after
    `initializer(*initargs)`); otherwise in a pool whose workers each ran the initializer.
    `fn` must be a module-level function so it can be sent to the workers."""
    if n_processes <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    with mp.Pool(n_processes, initializer=initializer, initargs=initargs) as pool:
        in_flight: collections.deque = collections.deque()
        for item in items:
            in_flight.append(pool.apply_async(fn, (item,)))
            if len(in_flight) >= in_flight_per_process * n_processes:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()
