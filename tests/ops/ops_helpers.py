"""Helpers for the ops tests: the repository root and external tools."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    """The path of a command-line tool that scripts/test installs; fails (never skips)
    when it is missing, so CI cannot pass without running the check."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found on PATH: scripts/test installs it (see docs/OPERATIONS.md)")
    return found
