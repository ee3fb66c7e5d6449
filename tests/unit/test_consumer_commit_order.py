"""A consumer's commits are serialized: two in flight could land in the opposite
order, moving the group's offset backwards, and the client's ``_committed`` cache
would then hide it (found by an adversarial review)."""

import asyncio

from tidemq.client.consumer import Consumer


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
