"""Fixtures of the fault suite.

``fault_network_guard`` (autouse) makes sure that, pass or fail, no network namespace
or bridge of this process survives a test: the runner deletes its network in
``finally``, and this checks it and deletes anything left over.
"""

from __future__ import annotations

import gc
import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.fault.harness.network import PREFIX


def _ours() -> list[str]:
    tag = f"{PREFIX}{os.getpid()}"
    bridge = f"{PREFIX}b{os.getpid()}"
    names: list[str] = []
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    names += [line.split()[0] for line in listing.stdout.splitlines() if line.startswith(tag)]
    links = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=False
    )
    names += [bridge for line in links.stdout.splitlines() if f" {bridge}:" in line]
    return names


@pytest.fixture(autouse=True)
def fault_network_guard() -> Iterator[None]:
    yield
    gc.collect()  # sockets a hurt client dropped surface here, under this test's filters
    if os.geteuid() != 0:
        return
    leftovers = _ours()
    for name in leftovers:
        if name.startswith(f"{PREFIX}b"):
            subprocess.run(["ip", "link", "delete", name], check=False)
        else:
            subprocess.run(["ip", "netns", "delete", name], check=False)
    assert not leftovers, f"the fault network was not cleaned up: {leftovers}"
