"""Deleting a consumer group, and the bound on the groups the cluster remembers.

Every group that commits or has a member leaves committed offsets and a session
bound in the coordinator's state; tools that make a group per run (benchmarks, `tide
consume` with a fresh group) grew that state without end. The state now remembers
at most MAX_GROUPS groups (a new one past that is refused, 409, saying how to make
room) and `DELETE /v1/groups/{group}` forgets one that has no member."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from tests.coordinator.test_group_shell import (
    SESSION_MS,
    Api,
    Clock,
    coordinator,
    owned,
    run,
    until,
)

import tidemq.core.metadata as metadata


async def metrics(api: Api) -> str:
    async with api.client.get("/metrics") as response:
        assert response.status == 200
        return await response.text()


async def member_that_committed(api: Api) -> dict[str, Any]:
    """Group g's one member, holding both partitions, having committed 7 on 0."""
    await api.setup(partitions=2)
    a = await api.beat(None, 0, [])
    a = await api.beat(a["member_id"], a["member_epoch"], a["assignment"])
    assert (await api.commit(a["member_id"], a["member_epoch"], 0, 7))[0] == 200
    return a


def test_a_group_with_a_member_is_not_deleted_and_one_without_is_forgotten(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        clock = Clock()
        async with coordinator(tmp_path, clock) as (c, _store, api):
            a = await member_that_committed(api)
            status, body = await api.call("DELETE", "/v1/groups/g")
            assert (status, body["error"]["code"]) == (409, "cluster_state_conflict")
            assert c.state.offsets["g"] == {("orders", 0): 7}  # nothing changed
            assert 'tide_consumer_group_rebalances_total{group="g"}' in await metrics(api)
            status, _ = await api.call("POST", "/v1/groups/g/leave", {"member_id": a["member_id"]})
            assert status == 200
            status, body = await api.call("DELETE", "/v1/groups/g")
            assert (status, body) == (200, {"deleted": "g"})
            assert "g" not in c.state.offsets and "g" not in c.state.group_session_ms
            assert 'group="g"' not in await metrics(api)  # its series went with it
            status, body = await api.call("GET", "/v1/groups/g")
            assert (status, body["error"]["code"]) == (404, "unknown_group")
            status, body = await api.call("DELETE", "/v1/groups/g")
            assert (status, body["error"]["code"]) == (404, "unknown_group")
        async with coordinator(tmp_path, clock) as (c, _store, _api):  # durable
            assert "g" not in c.state.offsets and "g" not in c.state.group_session_ms

    run(scenario)


def test_a_group_is_not_deleted_while_members_from_before_a_restart_may_fetch(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        clock = Clock()
        async with coordinator(tmp_path, clock) as (_c, _store, api):
            await member_that_committed(api)
        clock.now_ms += 5  # the coordinator restarts; a keeps fetching, unheard of
        async with coordinator(tmp_path, clock) as (c, _store, api):
            status, body = await api.call("DELETE", "/v1/groups/g")
            assert (status, body["error"]["code"]) == (503, "unavailable")
            assert c.state.offsets["g"] == {("orders", 0): 7}
            clock.now_ms += SESSION_MS + 1  # a's session has certainly run out
            status, body = await api.call("DELETE", "/v1/groups/g")
            assert (status, body) == (200, {"deleted": "g"})

    run(scenario)


def test_past_the_bound_a_new_group_is_refused_until_one_is_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metadata, "MAX_GROUPS", 3)

    async def scenario() -> None:
        clock = Clock()
        async with coordinator(tmp_path, clock) as (c, _store, api):
            await api.setup(partitions=2)
            for group in ("g1", "g2", "g3"):
                assert (await api.commit(None, None, 0, 1, group=group))[0] == 200
            status, body = await api.commit(None, None, 0, 1, group="g4")
            assert (status, body["error"]["code"]) == (409, "cluster_state_conflict")
            assert "tide groups delete" in body["error"]["message"]
            # a member of a new group is refused too (its session bound is state)
            status, body = await api.call(
                "POST",
                "/v1/groups/g5/heartbeat",
                {
                    "member_id": None,
                    "member_epoch": 0,
                    "topics": ["orders"],
                    "owned": owned([]),
                    "session_timeout_ms": SESSION_MS,
                },
            )
            assert (status, body["error"]["code"]) == (409, "cluster_state_conflict")
            assert "g5" not in c.groups and "g4" not in c.state.offsets
            # groups already remembered go on committing
            assert (await api.commit(None, None, 1, 2, group="g2"))[0] == 200
            assert (await api.call("DELETE", "/v1/groups/g1"))[0] == 200
            assert (await api.commit(None, None, 0, 1, group="g4"))[0] == 200
            assert set(c.state.offsets) == {"g2", "g3", "g4"}

    run(scenario)


def test_new_groups_committing_in_one_transaction_stay_within_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent commits are checked, then persisted together: each new group counts
    against the room the ones before it in the batch took. Were each checked against
    the state alone, a batch would pass the bound, and the second apply (or its
    replay after a restart) would fail, stopping the coordinator."""
    monkeypatch.setattr(metadata, "MAX_GROUPS", 2)

    async def scenario() -> None:
        clock = Clock()
        async with coordinator(tmp_path, clock) as (c, store, api):
            await api.setup(partitions=3)
            store.appends.clear()
            store.gate.clear()
            first = asyncio.create_task(api.commit(None, None, 0, 1, group="a"))
            await until(lambda: len(store.appends) == 1, "the first commit's fsync")
            queued = [
                asyncio.create_task(api.commit(None, None, p, 5, group=name))
                for p, name in ((1, "b"), (2, "c"))
            ]
            await until(
                lambda: len(getattr(c, "_pending_commits", [])) == 2,
                "both to queue behind the first",
            )
            store.gate.set()
            assert (await first)[0] == 200
            answers = await asyncio.gather(*queued)
            assert sorted(status for status, _ in answers) == [200, 409]
            assert len(c.state.offsets) == 2
        async with coordinator(tmp_path, clock) as (c, _store, _api):  # replays cleanly
            assert len(c.state.offsets) == 2

    run(scenario)


def test_a_deleted_group_that_was_only_in_a_snapshot_as_empty_offsets_replays(
    tmp_path: Path,
) -> None:
    """An empty member-less commit (`{"offsets": []}`, valid per the schema) makes
    state.offsets["x"] = {}; the snapshot writes no row for it, so the group is
    remembered live but not after a restart from that snapshot. DELETE passes the
    live check, DeleteGroup("x") is persisted after the snapshot, and its replay
    raises UnknownGroup: the coordinator can no longer start."""

    async def scenario() -> None:
        clock = Clock()
        async with coordinator(tmp_path, clock, snapshot_every=2) as (c, store, api):
            await api.setup(partitions=1)
            status, body = await api.call("POST", "/v1/groups/x/offsets", {"offsets": []})
            assert status == 200, body
            assert store.snapshot_seq == store.last_seq  # a snapshot covers the commit
            # An empty commit remembers nothing now (it made offsets["x"] = {}, which
            # no snapshot row held); a DeleteGroup persisted for such a group replays.
            assert "x" not in c.state.offsets
            status, body = await api.call("DELETE", "/v1/groups/x")
            assert (status, body["error"]["code"]) == (404, "unknown_group")
            c.state.offsets["x"] = {}  # as a state written before this fix holds it
            status, body = await api.call("DELETE", "/v1/groups/x")
            assert (status, body) == (200, {"deleted": "x"})
        # It used to stop every start: InvariantViolation "command N does not replay".
        async with coordinator(tmp_path, clock, snapshot_every=2) as (c, _store, _api):
            assert "x" not in c.state.offsets

    run(scenario)


def test_every_group_the_bound_counts_can_be_found_with_list_and_describe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group whose members consumed without committing (delivery="manual" without a
    commit, tide consume with a fresh group that read nothing) is remembered by its
    session bound only. It counts against MAX_GROUPS, but GET /v1/groups lists only
    in-memory groups and groups with offsets, and describe answers 404: at the bound
    the operator told to 'tide groups delete' unused groups cannot find it."""
    monkeypatch.setattr(metadata, "MAX_GROUPS", 1)

    async def scenario() -> None:
        clock = Clock()
        async with coordinator(tmp_path, clock) as (_c, _store, api):
            await api.setup(partitions=1)
            a = await api.beat(None, 0, [])  # group g: joins, never commits, leaves
            status, _ = await api.call("POST", "/v1/groups/g/leave", {"member_id": a["member_id"]})
            assert status == 200
            status, body = await api.commit(None, None, 0, 1, group="other")
            assert (status, body["error"]["code"]) == (409, "cluster_state_conflict")
            status, body = await api.call("GET", "/v1/groups")
            assert status == 200
            assert "g" in body["groups"], body  # was {"groups": []}
            status, _ = await api.call("GET", "/v1/groups/g")
            assert status == 200  # was 404 unknown_group (yet DELETE worked)

    run(scenario)


def test_a_refused_heartbeat_does_not_make_the_state_remember_a_group(
    tmp_path: Path,
) -> None:
    """A late heartbeat of a member of a deleted group (epoch > 0, unknown member) is
    fenced (409), yet RecordGroupSession is committed before the heartbeat is judged:
    the refused request brings the deleted group back into the state (and takes a slot
    of the bound, invisible to GET /v1/groups)."""

    async def scenario() -> None:
        clock = Clock()
        async with coordinator(tmp_path, clock) as (c, _store, api):
            await api.setup(partitions=1)
            a = await api.beat(None, 0, [])
            a = await api.beat(a["member_id"], a["member_epoch"], a["assignment"])
            clock.now_ms += SESSION_MS + 1
            await c.tick()  # a's session expired: the group has no member
            status, _ = await api.call("DELETE", "/v1/groups/g")
            assert status == 200
            before = c.state.to_snapshot()
            status, body = await api.beat_raw(
                {
                    "member_id": a["member_id"],
                    "member_epoch": a["member_epoch"],
                    "topics": ["orders"],
                    "owned": a["assignment"],
                    "session_timeout_ms": SESSION_MS,
                }
            )
            assert (status, body["error"]["code"]) == (409, "fenced_member")
            # nothing changed (group_sessions gained g: the deleted group came back)
            assert c.state.to_snapshot() == before
            assert not metadata.remembers_group(c.state, "g")

    run(scenario)
