"""Adversarial review of 151cece (spare reuse): the block-level disk model of
test_journal_blocks across several crashes and server-style restarts (replay, delete
the journal files, Journal.open deleting the spares), with a failure (EIO/ENOSPC) on
any journal call (rename, ftruncate, fdatasync, write, writev, lseek, directory
fsync) and a power loss that may lose or keep directory operations not yet fsynced.

Checked after every crash: (a) every acknowledged record survives unless a block
holding durable bytes was torn (then replay must refuse); (b) nothing truncated comes
back; (c) a healthy journal never refuses to start."""

from __future__ import annotations

import errno
import os
import random
import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from storage_helpers import START_MS, batch_of, open_log, power_lost_file, read_all

import tidemq.storage.journal as journal_module
from tidemq.errors import CorruptBatch
from tidemq.storage import PartitionLog
from tidemq.storage.journal import Journal, journal_files, replay

KEY = "topic-0-abc"
FAULTABLE = ["rename", "ftruncate", "fdatasync", "write", "writev", "lseek", "fsync_dir"]


class Disk:
    def __init__(self, rng: random.Random, journal_dir: Path) -> None:
        self.rng = rng
        self.dir = journal_dir
        self.durable: dict[str, bytes] = {}
        self.versions: dict[str, list[bytes]] = {}
        self.fault: str | None = None
        self.fault_after = 0
        self.short: str | None = None
        self.pending_dir: list[tuple[str, str, str]] = []  # ops since the last dir fsync
        self.journal: Any = None
        self.during_sync: list[Any] = []
        p = types.SimpleNamespace(**{n: getattr(os, n) for n in dir(os) if not n.startswith("__")})
        for name in ("write", "writev", "ftruncate", "fdatasync", "rename", "lseek"):
            setattr(p, name, getattr(self, name))
        self.proxy = p

    def _maybe_fail(self, call: str) -> None:
        if self.fault == call:
            if self.fault_after > 0:
                self.fault_after -= 1
                return
            self.fault = None
            raise OSError(self.rng.choice([errno.EIO, errno.ENOSPC]), f"injected in {call}")

    def _name(self, fd: int) -> str | None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        return os.path.basename(target) if os.path.dirname(target) == str(self.dir) else None

    def _snap(self, fd: int) -> None:
        name = self._name(fd)
        if name is not None:
            self.versions.setdefault(name, []).append((self.dir / name).read_bytes())

    def _short(self, call: str) -> bool:
        if self.short == call:
            self.short = None
            return True
        return False

    def write(self, fd: int, data: bytes) -> int:
        self._maybe_fail("write")
        if self._short("write"):
            data = data[: max(1, len(data) // 3)]
        written = os.write(fd, data)
        self._snap(fd)
        return written

    def writev(self, fd: int, buffers: list[Any]) -> int:
        self._maybe_fail("writev")
        if self._short("writev"):
            data = b"".join(bytes(b) for b in buffers)
            written = os.write(fd, data[: len(data) // 2])
        else:
            written = os.writev(fd, buffers)
        self._snap(fd)
        return written

    def ftruncate(self, fd: int, length: int) -> None:
        self._maybe_fail("ftruncate")
        os.ftruncate(fd, length)
        self._snap(fd)

    def lseek(self, fd: int, pos: int, how: int) -> int:
        self._maybe_fail("lseek")
        return os.lseek(fd, pos, how)

    def rename(self, source: Any, target: Any) -> None:
        self._maybe_fail("rename")
        os.rename(source, target)
        old, new = Path(source).name, Path(target).name
        for history in (self.durable, self.versions):
            if old in history:
                history[new] = history.pop(old)  # type: ignore[assignment]
        self.pending_dir.append(("rename", old, new))

    def fsync_dir(self, directory: Path) -> None:
        self._maybe_fail("fsync_dir")
        self.pending_dir = []

    def fdatasync(self, fd: int) -> None:
        self._maybe_fail("fdatasync")
        name = self._name(fd)
        if name is not None:
            content = (self.dir / name).read_bytes()
            self.durable[name] = content
            self.versions[name] = [content]
        callbacks: list[Any] = []
        if not self.journal._lock.locked():
            callbacks, self.during_sync = self.during_sync, []
        for callback in callbacks:
            callback()

    def power_loss(self, synced: dict[str, int]) -> bool:
        damaged = False
        # directory operations not fsynced: a random suffix of them is lost
        keep = self.rng.randint(0, len(self.pending_dir))
        for op, old, new in reversed(self.pending_dir[keep:]):
            if op == "rename" and (self.dir / new).exists():
                os.rename(self.dir / new, self.dir / old)
                for history in (self.durable, self.versions):
                    if new in history:
                        history[old] = history.pop(new)  # type: ignore[assignment]
        self.pending_dir = []
        for path in sorted(self.dir.iterdir()):
            durable = self.durable.get(path.name, b"")
            content, torn = power_lost_file(
                self.rng,
                durable,
                durable[: synced.get(path.name, 0)],
                self.versions.get(path.name, [durable]),
            )
            damaged = damaged or torn
            path.write_bytes(content)
        self.reset()
        return damaged

    def reset(self) -> None:
        self.durable = {p.name: p.read_bytes() for p in self.dir.iterdir()}
        self.versions = {}
        self.pending_dir = []


OPERATIONS = ["append"] * 4 + ["big_append", "sync", "sync", "sync_racing", "truncate"]
OPERATIONS += ["checkpoint", "checkpoint", "rotate", "kill", "power"]
OPERATIONS += [f"fault_{call}" for call in FAULTABLE] + ["short_write", "short_writev"]


def run_history(root: Path, operations: list[str], seed: int, mp: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    jdir = root / "journal"
    disk = Disk(rng, jdir)
    mp.setattr(journal_module, "os", disk.proxy)
    mp.setattr(journal_module, "fsync_directory", disk.fsync_dir)
    state: dict[str, Any] = {"model": [], "durable": 0, "counter": 0, "epoch": 0, "seg": {}}

    def start() -> tuple[Journal, PartitionLog]:
        journal = Journal.open(jdir)
        disk.journal = journal
        log = open_log(root / KEY)
        log.attach_journal(journal, KEY)
        return journal, log

    journal, log = start()
    state["seg"] = {p: p.stat().st_size for p in (root / KEY).glob("*.log")}

    def crash(power: bool) -> None:
        nonlocal journal, log
        for segment in log._segments:
            segment.close()
        synced = {f.path.name: f.synced for f in journal._files}
        journal._closed = True
        for f in journal._files:
            if f.fd >= 0:
                os.close(f.fd)
        damaged = False
        if power:
            for path in (root / KEY).glob("*.log"):
                os.truncate(path, min(state["seg"].get(path, 0), path.stat().st_size))
            damaged = disk.power_loss(synced)
        disk.fault = disk.short = None
        disk.during_sync = []
        logs: dict[str, PartitionLog] = {}

        def open_key(key: str) -> PartitionLog | None:
            logs[key] = open_log(root / key)
            return logs[key]

        try:
            replay(jdir, open_key, START_MS)
        except CorruptBatch:
            assert damaged, "a healthy journal refused to start (false proof of damage)"
            raise _Stop() from None
        finally:
            for log_ in logs.values():
                log_.close(mark_clean=False)
        if (KEEP_FILES is None and rng.random() < 0.5) or KEEP_FILES is False:
            for path in journal_files(jdir):  # as Broker._open_journal
                path.unlink()
        # else: Journal.open over the files (as the tests' restarts do)
        disk.reset()
        check = open_log(root / KEY)
        got = [value for _, value in read_all(check)]
        check.close()
        model, durable = state["model"], state["durable"]
        assert got[:durable] == model[:durable], (
            f"acknowledged record lost/changed (damaged={damaged}, power={power})"
        )
        assert got == model[: len(got)], "a truncated or stale record came back"
        state["model"], state["durable"] = got, len(got)
        journal, log = start()
        state["seg"] = {p: p.stat().st_size for p in (root / KEY).glob("*.log")}

    def append(size: int = 8) -> None:
        value = f"v{state['counter']}".encode().ljust(size, b".")
        state["counter"] += 1
        try:
            log.append(batch_of([value]), state["epoch"], START_MS)
        except OSError:
            if journal._failed is not None:
                raise
            return
        state["model"].append(value)

    def group_commit() -> None:
        end, generation = log.log_end_offset, log.truncation_generation
        journal.sync()
        log.mark_durable(end, generation)
        state["durable"] = max(state["durable"], log.flushed_offset)

    def step(name: str) -> None:
        if name == "append":
            append()
        elif name == "big_append":
            append(rng.randint(3000, 9000))
        elif name == "sync":
            group_commit()
        elif name == "sync_racing":
            disk.during_sync = [append for _ in range(rng.randint(1, 3))]
            try:
                group_commit()
            finally:
                callbacks, disk.during_sync = disk.during_sync, []
            for callback in callbacks:
                callback()
        elif name == "truncate" and state["model"]:
            cut = rng.randint(0, len(state["model"]) - 1)
            try:
                log.truncate_to(cut)
            except OSError:
                if journal._failed is None:
                    return
                state["durable"] = min(state["durable"], cut)
                raise
            del state["model"][cut:]
            state["durable"] = min(state["durable"], cut)
            state["epoch"] += 1
        elif name == "checkpoint":
            older = journal.rotate()
            log.sync()
            state["seg"] = {p: p.stat().st_size for p in (root / KEY).glob("*.log")}
            journal.discard(older)
        elif name == "rotate":
            journal.rotate()
        elif name == "kill":
            crash(power=False)
        elif name == "power":
            crash(power=True)
        elif name.startswith("short_"):
            disk.short = name[len("short_") :]
        elif name.startswith("fault_"):
            disk.fault = name[len("fault_") :]
            disk.fault_after = rng.randint(0, 2)

    try:
        for name in operations:
            try:
                step(name)
            except OSError:
                # fail-stop: the broker exits; a crash (kill or power loss) follows
                crash(power=rng.random() < 0.6)
        crash(power=True)
    except _Stop:
        return


KEEP_FILES: bool | None = None


class _Stop(Exception):
    pass


@settings(max_examples=int(os.environ.get("ADV_EXAMPLES", "200")), deadline=None)
@given(
    operations=st.lists(st.sampled_from(OPERATIONS), max_size=45),
    seed=st.integers(0, 2**32),
)
def test_reuse_across_crashes_restarts_and_faults_loses_nothing_acknowledged(
    tmp_path_factory: pytest.TempPathFactory, operations: list[str], seed: int
) -> None:
    root = tmp_path_factory.mktemp("adv")
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_history(root, operations, seed, monkeypatch)
