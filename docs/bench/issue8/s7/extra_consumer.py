"""An extra consumer group for groups3_run.sh: polls the topic and drops the records."""

import sys

from tidemq import Consumer
from tidemq.cli.control import resolve_target

data_dir, topic, group = sys.argv[1:4]
kw = resolve_target(data_dir).client_kwargs()
with Consumer(topic, group=group, auto_offset_reset="latest", **kw) as c:
    n = 0
    while True:
        n += len(c.poll(timeout=0.5, max_records=10_000) or ())
