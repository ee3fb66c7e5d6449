"""Consumer lag in seconds, from a timeline of each partition's high watermark.

Owns: per partition, a short history of ``(high_watermark, time_ms)`` points, taken
whenever the coordinator sees a partition's high watermark move (brokers report it
in every heartbeat, about once a second).

Lag in seconds of a group on a partition is the age of the oldest message the group
has not committed: the message at the committed offset ``C``. That message became
visible when the high watermark first passed ``C``, which is the first point of the
timeline with ``high_watermark > C``; its age is ``now - that point's time``. This
is how kafka-lag-exporter estimates lag in time, and it needs nothing from clients
or brokers beyond what heartbeats already carry. Accuracy: one heartbeat interval
(the resolution of the timeline), plus the time between a produce and its leader's
next heartbeat.

Must always hold: a partition keeps at most ``points_max`` points (the oldest are
dropped; an offset older than every kept point is then reported with the age of the
oldest point, a lower bound); points are strictly increasing in high watermark and
non-decreasing in time. Pure: time comes in as an argument.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

TopicPartition = tuple[str, int]
POINTS_MAX_DEFAULT = 120


class HighWatermarkTimeline:
    def __init__(self, points_max: int = POINTS_MAX_DEFAULT) -> None:
        if points_max < 1:
            raise ValueError("points_max must be >= 1")
        self.points_max = points_max
        self._watermarks: dict[TopicPartition, list[int]] = {}
        self._times_ms: dict[TopicPartition, list[int]] = {}

    def record(self, key: TopicPartition, high_watermark: int, now_ms: int) -> None:
        """Notes that ``key``'s high watermark is ``high_watermark`` at ``now_ms``."""
        watermarks = self._watermarks.setdefault(key, [])
        times = self._times_ms.setdefault(key, [])
        if watermarks and high_watermark <= watermarks[-1]:
            if high_watermark < watermarks[-1]:  # a truncation or a re-created topic
                watermarks.clear()
                times.clear()
            else:
                return
        watermarks.append(high_watermark)
        times.append(max(now_ms, times[-1]) if times else now_ms)
        if len(watermarks) > self.points_max:
            # Thin instead of forgetting the oldest point (which capped every age at
            # points_max heartbeats): drop the interior point whose removal widens a
            # gap the least relative to its age, so the error stays proportional to age.
            now = times[-1]
            drop = min(
                range(1, len(times) - 1),
                key=lambda i: (times[i + 1] - times[i - 1]) / max(1, now - times[i - 1]),
            )
            del watermarks[drop]
            del times[drop]

    def age_ms(self, key: TopicPartition, committed: int, now_ms: int) -> int | None:
        """Age of the message at offset ``committed``; 0 when nothing is uncommitted,
        None when the partition was never seen."""
        watermarks = self._watermarks.get(key)
        if not watermarks:
            return None
        if committed >= watermarks[-1]:
            return 0
        index = bisect.bisect_right(watermarks, committed)
        return max(0, now_ms - self._times_ms[key][index])

    def retain(self, keys: Iterable[TopicPartition]) -> None:
        """Forgets every partition not in ``keys`` (deleted topics)."""
        wanted = set(keys)
        for key in [k for k in self._watermarks if k not in wanted]:
            del self._watermarks[key]
            del self._times_ms[key]
