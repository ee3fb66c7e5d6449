"""A consumer's commits are serialized: two in flight could land in the opposite
order, moving the group's offset backwards, and the client's ``_committed`` cache
would then hide it (found by an adversarial review). And an auto-commit asked for
while one runs is not dropped."""

import asyncio
import threading
import time
from types import SimpleNamespace

from tidemq.client.consumer import Consumer
from tidemq.client.transport import LoopThread


class ReorderingCoordinator:
    """Applies each commit after ``arrive[i]`` s and answers after ``answer[i]`` s."""

    def __init__(self, arrive: list[float], answer: list[float]) -> None:
        self.arrive, self.answer, self.calls = arrive, answer, 0
        self.offsets: dict[tuple[str, int], int] = {}

    async def coordinator(self, method, path, json_body=None, **_):
        i = self.calls
        self.calls += 1

        async def apply() -> None:
            await asyncio.sleep(self.arrive[i])
            for o in json_body["offsets"]:
                self.offsets[(o["topic"], o["partition"])] = o["offset"]

        applied = asyncio.ensure_future(apply())
        await asyncio.sleep(self.answer[i])
        await applied
        return {"committed": len(json_body["offsets"])}


def test_concurrent_commits_can_move_the_offset_backwards_for_good() -> None:
    consumer = Consumer.__new__(Consumer)
    consumer.group = "g"
    consumer._member_id, consumer._member_epoch = "m", 3
    consumer._committed = {}
    # An auto-commit (poll -> _maybe_auto_commit, submitted, not awaited) of 100, then
    # the revocation's / commit()'s commit of 150 on another connection.
    fake = consumer._transport = ReorderingCoordinator(arrive=[0.05, 0.01], answer=[0.06, 0.1])

    async def scenario() -> None:
        await asyncio.gather(consumer._commit({("t", 0): 100}), consumer._commit({("t", 0): 150}))
        await consumer._commit({("t", 0): 150})  # e.g. the final commit at close

    asyncio.run(scenario())
    assert fake.offsets[("t", 0)] == 150, f"group offset left at {fake.offsets}"


class SlowCoordinator:
    """Each commit takes ``delay_s``; records what the group's offsets became."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.offsets: dict[tuple[str, int], int] = {}

    async def coordinator(self, method, path, json_body=None, **_):
        await asyncio.sleep(self.delay_s)
        for o in json_body["offsets"]:
            self.offsets[(o["topic"], o["partition"])] = o["offset"]
        return {"committed": len(json_body["offsets"])}


class Positions:
    """The fetch buffer's done positions, as the application moves them."""

    def __init__(self) -> None:
        self.done: dict[tuple[str, int], int] = {}

    def positions(self) -> dict[tuple[str, int], int]:
        return dict(self.done)


def test_a_poll_during_an_auto_commit_is_committed_without_another_poll() -> None:
    """At least once, ``poll`` commits what the previous poll's records made done. A
    poll that found an auto-commit still running used to drop its request, so those
    records stayed uncommitted until the application polled yet again."""
    consumer = Consumer.__new__(Consumer)
    consumer.group = "g"
    consumer._member_id, consumer._member_epoch = "m", 3
    consumer._committed = {}
    consumer._options = SimpleNamespace(auto_commit_interval_ms=0)
    consumer._last_auto_commit = 0.0
    consumer._auto_commit_lock = threading.Lock()
    consumer._auto_commit_running = consumer._auto_commit_again = False
    fake = consumer._transport = SlowCoordinator(delay_s=0.2)
    buffer = consumer._buffer = Positions()
    consumer._thread = thread = LoopThread("test-auto-commit")
    try:
        buffer.done = {("t", 0): 5}
        consumer._maybe_auto_commit()  # a poll: commits 5, for 0.2 s
        buffer.done = {("t", 0): 10}
        consumer._maybe_auto_commit()  # the next poll, while that commit runs
        deadline = time.monotonic() + 5
        while fake.offsets.get(("t", 0)) != 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake.offsets == {("t", 0): 10}
        assert not consumer._auto_commit_running  # and a later poll can start one
    finally:
        thread.stop()
