"""Admin: topics, cluster and groups through the coordinator's JSON API.

Every method returns the coordinator's JSON answer as a dict (docs/PROTOCOL.md,
"Coordinator API") and raises the TideError the coordinator answered with.

``create_topic`` returns once every partition can take writes: brokers learn a new
topic from their coordinator heartbeats, so right after the coordinator's answer a
produce would meet unknown_topic (and acks=all would wait for a follower that has not
heard of it). It polls each replica's broker (``GET .../offsets``) until the leader
serves the partition and no replica answers unknown_topic / unknown_partition; such a
request also makes the broker heartbeat at once (broker/server.py), so this takes a
few milliseconds, not a heartbeat interval.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from types import TracebackType
from typing import Any
from urllib.parse import quote

from tidemq.client.config import AdminOptions, resolve
from tidemq.client.transport import LoopThread, Transport
from tidemq.errors import ClientClosed, TideError, Unavailable, UnknownPartition, UnknownTopic

_READY_POLL_FIRST_S = 0.002
_READY_POLL_MAX_S = 0.05


def _shut_down(thread: LoopThread, transport: Transport) -> None:
    try:
        if not thread.in_loop_thread:
            thread.call(transport.close(), 5.0)
    except TideError:
        pass
    finally:
        thread.stop()


class Admin:
    def __init__(self, **config: Any) -> None:
        self._connection, _ = resolve(AdminOptions, config)
        self._thread = LoopThread("tidemq-admin")
        self._closed = False
        try:
            self._transport = self._thread.call(self._open(), 10.0)
        except BaseException:
            self._thread.stop()
            raise
        # Admin(...).create_topic(...) without close() is common: close the session and
        # stop the thread when the object goes away (or at exit), without warnings.
        self._finalizer = weakref.finalize(self, _shut_down, self._thread, self._transport)

    async def _open(self) -> Transport:
        return Transport(self._connection)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._closed:
            raise ClientClosed("the admin client is closed")
        timeout_s = self._connection.request_timeout_ms / 1000 * len(self._connection.bootstrap)
        return self._thread.call(self._transport.coordinator(method, path, **kwargs), timeout_s + 1)

    def create_topic(
        self, name: str, partitions: int | None = None, replication_factor: int | None = None
    ) -> dict[str, Any]:
        """Creates a topic and returns once every partition can take writes. Left
        out, partitions and replication_factor take the coordinator's defaults (12,
        and min(2, live brokers)). Raises Unavailable (retriable; the topic exists) if
        the partitions cannot take writes within ``request_timeout_ms``."""
        body: dict[str, Any] = {"name": name}
        if partitions is not None:
            body["partitions"] = partitions
        if replication_factor is not None:
            body["replication_factor"] = replication_factor
        result: dict[str, Any] = self._call("POST", "/v1/topics", json_body=body)
        timeout_s = self._connection.request_timeout_ms / 1000
        self._thread.call(self._until_writable(name, timeout_s), timeout_s + 5)
        return result

    async def _until_writable(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pause_s = _READY_POLL_FIRST_S
        waiting: list[int] = []
        while True:
            topic = await self._transport.coordinator("GET", f"/v1/topics/{quote(name)}")
            brokers = await self._transport.coordinator("GET", "/v1/brokers")
            urls = {int(b["id"]): str(b["url"]) for b in brokers.get("brokers", [])}
            partitions = topic.get("partitions", [])
            ready = await asyncio.gather(
                *(self._writable(name, partition, urls) for partition in partitions)
            )
            waiting = [
                int(entry["partition"])
                for entry, ok in zip(partitions, ready, strict=True)
                if not ok
            ]
            if not waiting:
                return
            if time.monotonic() + pause_s > deadline:
                raise Unavailable(
                    f"topic {name} was created, but partitions {waiting} cannot take writes "
                    f"after {timeout_s:g} s"
                )
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, _READY_POLL_MAX_S)

    async def _writable(self, name: str, partition: dict[str, Any], urls: dict[int, str]) -> bool:
        """The leader serves ``partition`` and every replica has heard of it."""
        leader_id = partition.get("leader_id")
        if leader_id is None or leader_id not in urls:
            return False
        path = f"/v1/topics/{quote(name)}/partitions/{int(partition['partition'])}/offsets"
        probes = [
            self._probe(urls[int(replica)] + path, leader=replica == leader_id)
            for replica in partition.get("replicas", [])
            if int(replica) in urls
        ]
        return all(await asyncio.gather(*probes))

    async def _probe(self, url: str, leader: bool) -> bool:
        try:
            await self._transport.request_json("GET", url)
        except (UnknownTopic, UnknownPartition):
            return False  # not heard of it yet (the request makes the broker ask)
        except TideError:
            return not leader  # a follower answers not_leader once it hosts the replica
        return True

    def delete_topic(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/v1/topics/{quote(name)}")
        return result

    def describe_topic(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/topics/{quote(name)}")
        return result

    def list_topics(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/v1/topics")
        return result

    def describe_cluster(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/v1/cluster")
        return result

    def list_brokers(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/v1/brokers")
        return result

    def describe_group(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/groups/{quote(name)}")
        return result

    def delete_group(self, name: str) -> dict[str, Any]:
        """Forgets the group's committed offsets; refused while it has members."""
        result: dict[str, Any] = self._call("DELETE", f"/v1/groups/{quote(name)}")
        return result

    def list_groups(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/v1/groups")
        return result

    def close(self) -> None:
        self._closed = True
        self._finalizer()

    def __enter__(self) -> Admin:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
