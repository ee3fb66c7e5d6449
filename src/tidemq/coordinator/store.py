"""The coordinator's durable command log and snapshot, in SQLite.

Owns: ``DATA_DIR/coordinator.sqlite`` with two tables::

    commands(seq INTEGER PRIMARY KEY, json TEXT)   -- one row per applied command
    snapshot(id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER, json TEXT)

Must always hold:

* a command is committed (WAL mode, ``synchronous=FULL``: fsynced) before the caller
  applies it to memory and answers: persist before reply;
* the state is the snapshot (state through ``snapshot.seq``) plus every command with a
  larger ``seq``, replayed in order; sequence numbers are assigned here, strictly
  increasing, never reused (even after older rows are deleted);
* every ``snapshot_every`` commands the snapshot is rewritten and the commands it
  covers are deleted, in one transaction.

SQLite blocks, so every call runs on one dedicated thread (the connection lives
there); the event loop only awaits. One thread also means one writer, in order.

Snapshots never touch the event loop: the thread keeps its own copy of the state (the
*shadow*), applies every command it commits to it, and builds and encodes the snapshot
from the shadow when one is due, right after the commit. The loop's state is never
read from the thread, so there is no race; the cost is a second copy of the metadata
in memory. The JSON is encoded one row at a time, so the thread gives up the GIL
between rows and the loop keeps running while a large snapshot is written.
"""

from __future__ import annotations

import asyncio
import copy
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tidemq.core.metadata import (
    ClusterState,
    Command,
    command_from_json,
    command_to_json,
)
from tidemq.errors import InvariantViolation, TideError

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS commands (seq INTEGER PRIMARY KEY, json TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS snapshot ("
    " id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, json TEXT NOT NULL)",
)


class CommandStore:
    """Append-only command log with periodic snapshots. Use :meth:`open`."""

    def __init__(self, path: Path, snapshot_every: int = 1000) -> None:
        self.path = path
        self.snapshot_every = snapshot_every
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tide-sqlite")
        self._connection: sqlite3.Connection | None = None
        self._shadow = ClusterState()  # the thread's own copy of the state
        self.last_seq = 0
        self.snapshot_seq = 0

    @classmethod
    async def open(
        cls, path: Path, snapshot_every: int = 1000
    ) -> tuple[CommandStore, ClusterState]:
        """Opens (creating if needed) the store and returns it with the recovered state."""
        store = cls(path, snapshot_every)
        try:
            state = await store._run(store._open_and_load)
        except BaseException:
            await store.close()
            raise
        return store, state

    async def append(self, commands: list[Command]) -> int:
        """Durably appends commands in one transaction (one fsync); returns the last
        sequence number. Writes a snapshot first when one is due (on the thread).

        The caller must have checked the commands against the state they will be
        applied to (they are applied to the shadow here, in the same order)."""
        last_seq: int = await self._run(self._append, list(commands))
        return last_seq

    async def close(self) -> None:
        if self._connection is not None:
            await self._run(self._close)
        self._executor.shutdown(wait=True)

    # -- on the SQLite thread --

    async def _run(self, function: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise InvariantViolation("the command store is not open")
        return self._connection

    def _open_and_load(self) -> ClusterState:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, isolation_level=None)
        self._connection = connection
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA:
            connection.execute(statement)
        row = connection.execute("SELECT seq, json FROM snapshot WHERE id = 1").fetchone()
        state = ClusterState() if row is None else ClusterState.from_snapshot(json.loads(row[1]))
        self.snapshot_seq = self.last_seq = 0 if row is None else int(row[0])
        rows = connection.execute(
            "SELECT seq, json FROM commands WHERE seq > ? ORDER BY seq", (self.snapshot_seq,)
        )
        for seq, text in rows:
            _replay(state, int(seq), text)
            self.last_seq = int(seq)
        self._shadow = copy.deepcopy(state)
        return state

    def _append(self, commands: list[Command]) -> int:
        first = self.last_seq + 1
        rows = [
            (first + index, json.dumps(command_to_json(command), separators=(",", ":")))
            for index, command in enumerate(commands)
        ]
        with self._db() as connection:  # one transaction, committed on exit
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany("INSERT INTO commands (seq, json) VALUES (?, ?)", rows)
        self.last_seq = first + len(commands) - 1
        for seq, text in rows:
            _replay(self._shadow, seq, text)
        if self.last_seq - self.snapshot_seq >= self.snapshot_every:
            self._write_snapshot(_encode(self._shadow.to_snapshot()), self.last_seq)
        return self.last_seq

    def _write_snapshot(self, text: str, seq: int) -> None:
        with self._db() as connection:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(
                "INSERT OR REPLACE INTO snapshot (id, seq, json) VALUES (1, ?, ?)", (seq, text)
            )
            connection.execute("DELETE FROM commands WHERE seq <= ?", (seq,))
        self.snapshot_seq = seq

    def _close(self) -> None:
        self._db().close()
        self._connection = None


def _encode(snapshot: dict[str, Any]) -> str:
    """``json.dumps(snapshot)`` one list row at a time (each call holds the GIL)."""
    parts = []
    for key, value in snapshot.items():
        if isinstance(value, list):
            rows = ",".join(json.dumps(row, separators=(",", ":")) for row in value)
            encoded = f"[{rows}]"
        else:
            encoded = json.dumps(value, separators=(",", ":"))
        parts.append(f"{json.dumps(key)}:{encoded}")
    return "{" + ",".join(parts) + "}"


def _replay(state: ClusterState, seq: int, text: str) -> None:
    try:
        state.apply(command_from_json(json.loads(text)))
    except (TideError, ValueError, KeyError, TypeError) as error:
        raise InvariantViolation(f"command {seq} does not replay: {error}") from error
