"""Event time: when to score, and when a partition is still catching up on a backlog (pure).

Scores use event time. An account is scored at its own newest event time (never beyond the
wall clock), so replaying history scores it as it stood then, instead of calling every account
inactive because its old events are old by the wall clock. Alerts are real-time signals: an
account whose newest event is older than the catch-up lag is scored but does not alert; the
re-score timer alerts on it at the wall clock once its partition has caught up, so silence
still counts and a back-fill never floods the alert topic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CATCH_UP_LAG_S = 3600.0  # events older than this (by the wall clock) are back-fill
IDLE_AFTER_S = 10.0  # a source silent this long is no longer catching up


def scoring_time(wall: float, newest_event: float) -> float:
    return min(wall, newest_event) if newest_event else wall


def is_live(wall: float, scored_at: float, lag: float = CATCH_UP_LAG_S) -> bool:
    return wall - scored_at <= lag


@dataclass(slots=True)
class PartitionClock:
    # source "topic/partition" -> [newest event time, wall time it was last seen]
    sources: dict[str, list[float]] = field(default_factory=dict)

    def on_pack(self, wall: float, newest: dict[str, float]) -> None:
        for source, ts in newest.items():
            seen = self.sources.setdefault(source, [ts, wall])
            seen[0], seen[1] = max(seen[0], ts), wall

    def catching_up(self, wall: float) -> bool:
        """Some source of this partition is still delivering back-fill."""
        return any(wall - seen[1] < IDLE_AFTER_S and wall - seen[0] > CATCH_UP_LAG_S
                   for seen in self.sources.values())
