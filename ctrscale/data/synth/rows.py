"""Row generation: a day's rows as an ordered stream of chunks drawn from the teacher.

Rows are generated in fixed chunks of `CHUNK_ROWS`, each from its own (seed, day, chunk)
random stream, so output is byte-identical for a seed whatever the thread timing, and a longer
day is an extension of a shorter one. A thread pool draws chunks ahead, in a bounded window,
while the writer consumes them in order.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ctrscale.data.synth.teacher import ROWS_STREAM, Chunk, Teacher

CHUNK_ROWS = 131_072  # one random stream and one Parquet row group (the loader's unit)


def worker_count() -> int:
    # Past ~4 generators the single Parquet writer is the bottleneck; more only costs memory.
    if hasattr(os, "sched_getaffinity"):
        return min(4, len(os.sched_getaffinity(0)))
    return min(4, os.cpu_count() or 1)


def chunks_in_order(
    pool: ThreadPoolExecutor, window: int, teacher: Teacher, seed: int, day: int, rows: int
) -> Iterator[Chunk]:
    """The day's chunks in order, generated ahead by the pool but never more than `window`."""
    pending: deque[Future[Chunk]] = deque()
    for index, start in enumerate(range(0, rows, CHUNK_ROWS)):
        size = min(CHUNK_ROWS, rows - start)
        pending.append(pool.submit(_generate_chunk, teacher, seed, day, index, size))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _generate_chunk(teacher: Teacher, seed: int, day: int, index: int, rows: int) -> Chunk:
    stream = np.random.SeedSequence(seed, spawn_key=(ROWS_STREAM, day, index))
    # Always a whole chunk, then cut: a shorter day is then exactly a prefix of a longer one.
    return teacher.sample(np.random.default_rng(stream), CHUNK_ROWS).head(rows)
