"""Admin: topics, cluster and groups through the coordinator's JSON API.

Every method returns the coordinator's JSON answer as a dict (docs/PROTOCOL.md,
"Coordinator API") and raises the TideError the coordinator answered with.
"""

from __future__ import annotations

import weakref
from types import TracebackType
from typing import Any
from urllib.parse import quote

from tidemq.client.config import AdminOptions, resolve
from tidemq.client.transport import LoopThread, Transport
from tidemq.errors import ClientClosed, TideError


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
        """Creates a topic. Left out, partitions and replication_factor take the
        coordinator's defaults (12, and min(2, live brokers))."""
        body: dict[str, Any] = {"name": name}
        if partitions is not None:
            body["partitions"] = partitions
        if replication_factor is not None:
            body["replication_factor"] = replication_factor
        result: dict[str, Any] = self._call("POST", "/v1/topics", json_body=body)
        return result

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
