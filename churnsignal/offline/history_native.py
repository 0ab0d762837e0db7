"""Native payloads as history (Stripe Events, Segment messages, Zendesk tickets, canonical
events), from JSONL files or a Kafka topic range, through the worker's own decoder.

Payloads arrive in any order; the replay needs event-time order. They are sorted with bounded
memory: sorted runs of canonical events are spilled to disk and merged on read, so memory is
one run, not the history.
"""

from __future__ import annotations

import heapq
import tempfile
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from churnsignal.offline.history import HistoryError, Subscriptions, load_jsonl_subscriptions
from churnsignal.schemas.decode import DecodeOptions, Source, decode
from churnsignal.schemas.events import EVENT_ADAPTER, family_of
from churnsignal.schemas.identity import fallback_account, is_identity
from churnsignal.schemas.results import Accepted

RUN_EVENTS = 200_000  # events held in memory before a sorted run goes to disk
# Distinct usage names counted per day for calibrate's tracked event types: a history with
# more (ids in names, say) is not a product's vocabulary; names first seen past it are not
# counted, which can only leave out names rarer than those seen before.
MAX_NAMES = 10_000
DAY = 86_400


class Spool:
    """Canonical events sorted by time: in memory up to ``run_events``, then merged runs."""

    def __init__(self, run_events: int = RUN_EVENTS) -> None:
        self.run_events = run_events
        self._buffer: list[tuple[float, int, bytes]] = []
        self._runs: list[Path] = []
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._seq = 0  # ties keep arrival order, as a stable sort would
        self.count = 0

    def add(self, ts: float, data: bytes) -> None:
        self._buffer.append((ts, self._seq, data))
        self._seq += 1
        self.count += 1
        if len(self._buffer) >= self.run_events:
            self._spill()

    def _spill(self) -> None:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="churnsignal-spool-")
        path = Path(self._dir.name) / f"run-{len(self._runs)}"
        self._buffer.sort()
        with path.open("wb") as fh:
            # orjson never writes a raw newline, so a line is a record.
            fh.writelines(b"%r\t%d\t%b\n" % (ts, seq, data) for ts, seq, data in self._buffer)
        self._runs.append(path)
        self._buffer = []

    @staticmethod
    def _read(fh: IO[bytes]) -> Iterator[tuple[float, int, bytes]]:
        for line in fh:
            ts, seq, data = line.rstrip(b"\n").split(b"\t", 2)
            yield float(ts), int(seq), data

    def events(self) -> Iterator[Any]:
        """Every event, validated again, in event-time order (readable more than once)."""
        self._buffer.sort()
        handles = [path.open("rb") for path in self._runs]
        try:
            merged = heapq.merge(self._buffer, *(self._read(fh) for fh in handles))
            for _, _, data in merged:
                yield EVENT_ADAPTER.validate_json(data)
        finally:
            for fh in handles:
                fh.close()

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


class NativeHistory:
    """Payloads decoded as the worker decodes them; history is old by definition, so no age
    or future limit applies. A Stripe event that names only its customer is that customer's;
    events that name no account at all cannot be attributed offline and are counted in
    ``skipped``."""

    def __init__(self, account_key: str = "account_id", run_events: int = RUN_EVENTS) -> None:
        self.options = DecodeOptions(max_age_s=float("inf"), max_future_s=float("inf"),
                                     account_key=account_key)
        self.spool = Spool(run_events)
        self.billing: list[Any] = []  # subscription events: a few per account
        self.skipped: Counter[str] = Counter()
        self.last: float | None = None
        # (day, lower-case usage name) -> actions: the names the state's per-type columns
        # match first, counted while reading so calibrate needs no second pass
        self.usage_names: Counter[tuple[int, str]] = Counter()
        self._names: set[str] = set()
        self._now = datetime.now(UTC).timestamp()

    def add(self, payload: bytes, pinned: Source = "auto") -> None:
        result = decode(payload, self.options, self._now, pinned)
        if not isinstance(result, Accepted):
            self.skipped[getattr(result, "reason", "skipped")] += 1
            return
        event = result.event
        if is_identity(event.account_id):
            account = fallback_account(event.account_id)
            if account is None:
                self.skipped["unattributed"] += 1
                return
            event = event.model_copy(update={"account_id": account})
        ts = event.occurred_at.timestamp()
        self.last = ts if self.last is None else max(self.last, ts)
        if event.type.startswith("subscription_"):
            self.billing.append(event)
        elif family_of(event.type) == "usage":
            self._count_name(event, ts)
        self.spool.add(ts, orjson.dumps(event.model_dump(mode="json", exclude_none=True)))

    def _count_name(self, event: Any, ts: float) -> None:
        # As the fold names usage (state._use_event): its name, else its type.
        name = (getattr(event.data, "name", None) or event.type).lower()
        if name not in self._names:
            if len(self._names) >= MAX_NAMES:
                return
            self._names.add(name)
        self.usage_names[(int(ts // DAY), name)] += getattr(event.data, "count", None) or 1

    def top_usage_names(self, until: float, limit: int) -> list[str]:
        """The ``limit`` most used usage names (lower-case) of the days begun before ``until``."""
        totals: Counter[str] = Counter()
        for (day, name), n in self.usage_names.items():
            if day * DAY < until:
                totals[name] += n
        return [name for name, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))
                [:limit]]

    def add_jsonl(self, path: Path) -> NativeHistory:
        if not path.is_file():
            raise HistoryError(f"{path}: no such file")
        with path.open("rb") as fh:
            for line in fh:
                if line.strip():
                    self.add(line)
        return self

    def events(self) -> Iterator[Any]:
        return self.spool.events()

    def subscriptions(self) -> Subscriptions:
        """Subscription periods implied by the billing events (when no subscriptions file)."""
        return load_jsonl_subscriptions(sorted(self.billing, key=lambda e: e.occurred_at))

    def close(self) -> None:
        self.spool.close()


def native_events(path: Path, account_key: str = "account_id",
                  skipped: Counter[str] | None = None) -> list[Any]:
    """All events of a JSONL file in event-time order, as a list (small histories, tests)."""
    history = NativeHistory(account_key).add_jsonl(path)
    try:
        if skipped is not None:
            skipped.update(history.skipped)
        return list(history.events())
    finally:
        history.close()

