"""Check a fault run's history again: ``python -m tests.fault.check HISTORY.jsonl``.

Prints the checker's verdict as one JSON line; exits 1 on a safety violation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.fault.harness.checker import check, violations
from tests.fault.harness.history import read_history


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_file():
        print("usage: python -m tests.fault.check HISTORY.jsonl", file=sys.stderr)
        return 2
    verdict = check(read_history(Path(argv[0])))
    print(json.dumps(verdict))
    return 1 if violations(verdict) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
