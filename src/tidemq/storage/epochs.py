"""The leader-epoch cache: which leader epoch wrote which range of offsets.

Entries are ``(epoch, start_offset)``: epoch ``e`` wrote offsets from its start
offset up to the next entry's start offset (or the log end offset for the last).
Invariant: epochs strictly increase; start offsets strictly increase. An epoch in
which no record was appended has no entry.

A follower that reconnects to a new leader asks it ``end_offset_for_epoch(e)`` for
its own latest epoch ``e`` and truncates above the answer (Kafka's KIP-101/279).

Pure: no files. :mod:`tidemq.storage.log` persists the entries in
``leader-epoch-checkpoint`` and rebuilds them from batch headers on recovery.
"""

from __future__ import annotations

from collections.abc import Iterable

UNDEFINED = -1


class LeaderEpochCache:
    __slots__ = ("_entries",)

    def __init__(self, entries: Iterable[tuple[int, int]] = ()) -> None:
        self._entries: list[tuple[int, int]] = []
        for epoch, start_offset in entries:
            self.assign(epoch, start_offset)

    def entries(self) -> list[tuple[int, int]]:
        return list(self._entries)

    def latest_epoch(self) -> int:
        return self._entries[-1][0] if self._entries else UNDEFINED

    def assign(self, epoch: int, start_offset: int) -> bool:
        """Records that ``epoch`` starts at ``start_offset``; True if anything changed.

        An epoch not newer than the latest is ignored. Entries starting at or after
        ``start_offset`` are stale (their offsets were truncated) and are replaced.
        """
        if epoch <= self.latest_epoch():
            return False
        while self._entries and self._entries[-1][1] >= start_offset:
            self._entries.pop()
        if self._entries and self._entries[-1][0] >= epoch:
            return False
        self._entries.append((epoch, start_offset))
        return True

    def truncate_from_end(self, end_offset: int) -> bool:
        """Drops entries for offsets >= end_offset (the log was truncated there)."""
        before = len(self._entries)
        while self._entries and self._entries[-1][1] >= end_offset:
            self._entries.pop()
        return len(self._entries) != before

    def truncate_from_start(self, start_offset: int) -> bool:
        """Forgets offsets below start_offset, keeping the epoch that covers it."""
        covering = [entry for entry in self._entries if entry[1] <= start_offset]
        if not covering or (covering[-1][1] == start_offset and len(covering) == 1):
            return False
        later = [entry for entry in self._entries if entry[1] > start_offset]
        self._entries = [(covering[-1][0], start_offset), *later]
        return True

    def epoch_and_end_offset(self, epoch: int, log_end_offset: int) -> tuple[int, int]:
        """Kafka's OffsetsForLeaderEpoch answer: (largest epoch <= epoch, its end offset).

        The end offset is the start offset of the first epoch greater than ``epoch``,
        or ``log_end_offset`` if ``epoch`` is the latest. An epoch newer than every
        entry answers (latest, ``log_end_offset``): a follower can hold an epoch this
        leader never wrote in (the uncommitted tail of a later, deposed leader), and what
        they share ends at our log end at most (Kafka gets the same by caching the
        leader's own epoch at election). (UNDEFINED, UNDEFINED) when the cache is empty.
        """
        if not self._entries or epoch < 0:
            return UNDEFINED, UNDEFINED
        if epoch >= self.latest_epoch():
            return self.latest_epoch(), log_end_offset
        floor_epoch = epoch
        for entry_epoch, start_offset in self._entries:
            if entry_epoch > epoch:
                return floor_epoch, start_offset
            floor_epoch = entry_epoch
        return floor_epoch, log_end_offset  # unreachable: epoch < latest
