"""workers/batching.py: the batches the completer and the budget settler write."""

from __future__ import annotations

import asyncio

from batchdb.workers.batching import batches


def test_batches_are_capped_and_close_flushes_what_came_before() -> None:
    async def scenario() -> list[list[int]]:
        pending: asyncio.Queue[int | None] = asyncio.Queue()
        for item in range(7):
            pending.put_nowait(item)
        pending.put_nowait(None)
        pending.put_nowait(99)  # after close: never read
        return [batch async for batch in batches(pending, flush_interval=60.0, max_batch=3)]

    assert asyncio.run(scenario()) == [[0, 1, 2], [3, 4, 5], [6]]


def test_a_batch_is_cut_when_its_flush_interval_ends() -> None:
    async def scenario() -> list[list[int]]:
        pending: asyncio.Queue[int | None] = asyncio.Queue()
        got: list[list[int]] = []

        async def consume() -> None:
            async for batch in batches(pending, flush_interval=0.05, max_batch=100):
                got.append(batch)

        consumer = asyncio.create_task(consume())
        pending.put_nowait(1)
        # The second item arrives only once the first batch has been handed out, whatever the
        # machine's speed: the interval, not the cap, ended that batch.
        while not got:
            await asyncio.sleep(0.01)
        pending.put_nowait(2)
        pending.put_nowait(None)
        await consumer
        return got

    assert asyncio.run(scenario()) == [[1], [2]]
