"""Fail-stop: a broken invariant or a failed fsync ends the process, at once.

Not an exception to catch: by the time one of these is seen, the process's state
(memory or disk) is no longer known to be right, and anything it still did (answer a
request, sync again, write a checkpoint or a clean-shutdown marker) could turn the
unknown into a lie. So: one clear log line on stderr, then ``os._exit`` with
EXIT_CODE, skipping every cleanup handler. Restart recovers from the log on disk.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

log = logging.getLogger(__name__)

EXIT_CODE = 70  # EX_SOFTWARE


def fail_stop(reason: str) -> NoReturn:
    log.critical("FAIL-STOP: %s", reason)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    sys.stderr.flush()
    os._exit(EXIT_CODE)
