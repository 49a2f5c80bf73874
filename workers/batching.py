"""Gather items submitted one by one into batches for one statement each.

The BatchCompleter (outcomes) and the BudgetSettler (spend) both turn many
small writes into one: each batch is what arrived within `flush_interval`
seconds of its first item, at most `max_batch` items. `None` on the queue
closes it: the items before it still come out, in a last batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")


async def batches(pending: asyncio.Queue[T | None], *, flush_interval: float, max_batch: int) -> AsyncIterator[list[T]]:
    """Yield batches from `pending` until a `None` is read."""
    loop = asyncio.get_running_loop()
    closing = False
    while not closing:
        first = await pending.get()
        if first is None:
            return
        batch = [first]
        deadline = loop.time() + flush_interval
        while len(batch) < max_batch:
            timeout = deadline - loop.time()
            if timeout <= 0:
                break
            try:
                item = await asyncio.wait_for(pending.get(), timeout)
            except TimeoutError:
                break
            if item is None:
                closing = True
                break
            batch.append(item)
        yield batch
