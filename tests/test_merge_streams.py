"""merge_streams, the server's way of reading engine streams: items from several sources as they arrive, tagged with
their source; the server's abort ends a stream that is waiting for its next item; closing the merged stream closes
its sources."""
from __future__ import annotations

import asyncio

import pytest

from lmforge.serve.streaming import StreamAborted, merge_streams


class Source:
    """An async generator of ``items`` with ``delay`` seconds before each; records whether it was closed."""

    def __init__(self, items: list, delay: float = 0.0):
        self.items, self.delay, self.closed = items, delay, False

    async def gen(self):
        try:
            for x in self.items:
                await asyncio.sleep(self.delay)
                yield x
        finally:
            self.closed = True


@pytest.mark.parametrize("n", [1, 3])
def test_items_arrive_tagged_with_their_source_and_sources_are_closed(n):
    sources = [Source([f"{k}-{i}" for i in range(4)], delay=0.001 * (k + 1)) for k in range(n)]

    async def run():
        return [x async for x in merge_streams([s.gen() for s in sources], asyncio.Event())]

    got = asyncio.run(run())
    for k in range(n):
        assert [item for i, item in got if i == k] == [f"{k}-{i}" for i in range(4)]
    assert all(s.closed for s in sources)


@pytest.mark.parametrize("n", [1, 2])
def test_abort_ends_a_stream_waiting_for_its_next_item(n):
    sources = [Source(["a", "b"], delay=30.0) for _ in range(n)]

    async def run():
        abort = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, abort.set)
        got = []
        with pytest.raises(StreamAborted):
            async for item in merge_streams([s.gen() for s in sources], abort):
                got.append(item)
        return got, asyncio.current_task().cancelling()

    got, cancelling = asyncio.run(asyncio.wait_for(run(), 5))
    assert got == [] and cancelling == 0  # no cancellation left pending on the consumer's task
    assert all(s.closed for s in sources)


def test_closing_the_merged_stream_closes_its_sources():
    source = Source(["a", "b", "c"])

    async def run():
        merged = merge_streams([source.gen()], asyncio.Event())
        first = await merged.__anext__()
        await merged.aclose()
        return first, source.closed  # closed by then, not later by the loop's generator finaliser

    assert asyncio.run(run()) == ((0, "a"), True)


def test_abort_while_the_consumer_is_elsewhere_ends_it_at_its_next_pull_without_cancelling_it():
    """One source is read in the consumer's own task: an abort that comes while the consumer is busy elsewhere
    (writing a chunk) must not cancel that work; the stream ends at the consumer's next pull."""
    source = Source(["a", "b", "c"], delay=0.0)

    async def run():
        abort = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, abort.set)
        got, slept = [], False
        with pytest.raises(StreamAborted):
            async for item in merge_streams([source.gen()], abort):
                got.append(item)
                await asyncio.sleep(0.2)  # the abort fires during this, which must finish
                slept = True
        return got, slept, asyncio.current_task().cancelling()

    got, slept, cancelling = asyncio.run(asyncio.wait_for(run(), 5))
    assert got == [(0, "a")] and slept and cancelling == 0
    assert source.closed


def test_a_consumer_cancelled_while_waiting_is_cancelled_not_aborted():
    """The client going away cancels the consumer's task: that stays a cancellation (not the server's abort)."""
    source = Source(["a", "b"], delay=30.0)

    async def consume():
        return [x async for x in merge_streams([source.gen()], asyncio.Event())]

    async def run():
        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(run(), 5))
    assert source.closed
