"""The batched consumer: source topics -> decode, dead-letter, repartition by account -> packs.

Faust spends ~150 us of CPU per message before any agent code runs, so the high-volume
decode path does not go through it. This stage reads the source topics with aiokafka in large
batches, decodes each message once, and hands the Faust state agent one pack per internal
partition per batch. Order of one batch (a crash between two steps only repeats work):

1. decode every record; rejected ones become dead letters with the reason;
2. accepted events (and too-old billing/support history) are grouped by account partition;
3. dead letters and packs are produced and acknowledged (acks=all), one pack per internal
   partition at a time;
4. only then are the source offsets committed.

A crash after 3 and before 4 re-reads the batch and re-sends its packs; the state agent skips
them by (source partition, offset) high-water per account, so nothing is counted twice.

Nothing one record holds can stop this loop: an exception while decoding or routing a record
dead-letters that record alone (``processing_error``). Kafka failures are not data errors:
fetches, produces and commits are retried with capped, jittered back-off and never
dead-letter anything; offsets are never committed past a record whose pack is not
acknowledged. A record batch that cannot be read at all is skipped and its offsets
dead-lettered (``unreadable_batch``) without holding up other partitions (see ``Unreadable``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Hashable, Iterator
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.consumer import fetcher as aiokafka_fetcher
from aiokafka.errors import (
    CommitFailedError,
    ConsumerStoppedError,
    CorruptRecordException,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from churnsignal.app.kafka_client import connection_options
from churnsignal.app.metrics import Metrics
from churnsignal.app.settings import Settings
from churnsignal.schemas.decode import DecodeOptions, decode
from churnsignal.schemas.results import Accepted, Decoded, Rejected, Skipped
from churnsignal.stream import deadletter, packs
from churnsignal.stream.deadletter import DeadLetter
from churnsignal.stream.identity import link_item
from churnsignal.stream.policy import Policy

log = logging.getLogger(__name__)


def options_for(settings: Settings, policy: Policy) -> DecodeOptions:
    """What decoding takes from the settings and the policy (the worker's and its ingest
    process's alike)."""
    return DecodeOptions(
        max_bytes=settings.ingest.max_message_bytes,
        max_future_s=settings.ingest.max_future_skew_s,
        max_age_s=policy.windows.horizon_days * 86_400.0,
        activation_events=policy.onboarding.activation_events,
        trait_keys=policy.accounts.trait_keys,
    )

T = TypeVar("T")

RETRY_MAX_S = 15.0  # longest back-off between two attempts at a Kafka operation
LOG_PERIOD_S = 60.0  # one log line per kind of problem per minute, never one per record


class RateLimitedLog:
    """Logs each kind of problem at most once per ``period_s``, with how many were held back.

    A flood of one bad input must not become a flood of log lines; the metrics count each one.
    """

    def __init__(self, logger: logging.Logger, period_s: float = LOG_PERIOD_S,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 1000) -> None:
        self.logger = logger
        self.period_s = period_s
        self.clock = clock
        self.max_keys = max_keys
        self._seen: dict[Hashable, tuple[float, int]] = {}  # key -> (last logged, held back)

    def log(self, key: Hashable, level: int, msg: str, *args: Any,
            exc_info: BaseException | None = None) -> bool:
        """Log unless ``key`` was logged less than ``period_s`` ago; True if it was logged."""
        now = self.clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.period_s:
            self._seen[key] = (seen[0], seen[1] + 1)
            return False
        if seen is not None and seen[1]:
            msg += " (%d more like this since %.0f s ago)"
            args = (*args, seen[1], now - seen[0])
        if seen is None and len(self._seen) >= self.max_keys:
            self._seen.clear()  # bounded: forgetting only allows one early line
        self._seen[key] = (now, 0)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True


# --- Unreadable record batches --------------------------------------------------------------
#
# A record batch aiokafka cannot read (a codec it lacks a library for or does not know, a CRC
# mismatch, bytes that do not decompress) raises out of ``consumer.getmany()`` while the
# fetcher unpacks a fetch (``aiokafka.consumer.fetcher.PartitionRecords._unpack_records``).
# The exception names neither partition nor offsets (aio-libs/aiokafka#321: "all you can do is
# seek() 1 position forward"), and getmany drops the records it had already taken from other
# partitions in that call although their positions have moved on: later commits would pass
# records that were never processed. Seeking past the batch from outside needs its last
# offset, which only its header holds. So the ingest's consumer unpacks fetches through a
# PartitionRecords that turns such a batch into one placeholder record carrying the batch's
# offsets, in its place in its partition: getmany never raises for it, no other record is
# lost, and the consumer's position moves past the batch as past a readable one. The ingest
# dead-letters each of its offsets (``unreadable_batch``) and commits past it; other
# partitions never notice. When the batch's end is not trustworthy (an unparseable header, an
# impossible offset span) skipping could pass good records, so that partition alone is paused.
# Only the ingest's consumer is guarded (recognised by its key deserializer ``source_key``):
# Faust's consumers keep aiokafka's own behaviour.

MAX_BATCH_SPAN = 1_000_000  # more offsets than any readable batch holds: a corrupt header


@dataclasses.dataclass(frozen=True, slots=True)
class Unreadable:
    """Offsets ``[first, end)`` of a partition that could not be read; ``end`` None: unknown."""

    first: int
    end: int | None
    error: str  # exception class and message


class _Placeholder:
    """Stands for an unreadable batch where the fetcher expects a record."""

    __slots__ = ("headers", "offset")
    timestamp = None
    timestamp_type = 0
    key = None
    value = None
    checksum = None

    def __init__(self, mark: Unreadable) -> None:
        self.offset = mark.first
        # Kafka headers are (str, bytes) pairs: no producer can send a record that looks like this.
        self.headers = (mark,)


def _describe(exc: BaseException) -> str:
    """The exception's class and message (aiokafka's errors already start with their class)."""
    text, name = str(exc), type(exc).__name__
    if text.startswith((name, "[Error")) and name in text:
        return text
    return f"{name}: {text}" if text else name


class _GuardedBatch:
    """A batch of a guarded fetch: a failure to read it becomes one placeholder record."""

    def __init__(self, batch: Any, records: _GuardedRecords) -> None:
        self._batch = batch
        self._records = records
        self._crc_ok = True
        self._mark: Unreadable | None = None

    def __getattr__(self, name: str) -> Any:  # producer_id, is_control_batch, base_offset, ...
        return getattr(self._batch, name)

    def validate_crc(self) -> bool:
        self._crc_ok = bool(self._batch.validate_crc())
        return True  # a mismatch comes out of the iteration, as a placeholder

    @property
    def next_offset(self) -> int:
        mark = self._mark
        if mark is None:
            return int(self._batch.next_offset)
        return mark.end if mark.end is not None else mark.first + 1

    def __iter__(self) -> Iterator[Any]:
        if self._crc_ok:
            try:
                yield from self._batch
                return
            except Exception as exc:  # any failure to read this batch; the next one may be fine
                error: BaseException = exc
        else:
            error = CorruptRecordException("CRC mismatch")
        self._mark = self._records.unreadable(self._batch, error, trust_header=self._crc_ok)
        yield _Placeholder(self._mark)

    def __next__(self) -> Any:  # control batches are read with next() (read_committed only)
        return next(self._batch)


class _BrokenBatch:
    """Where a batch header could not be parsed: an unreadable span of unknown end."""

    producer_id = None
    is_control_batch = False
    is_transactional = False

    def __init__(self, mark: Unreadable) -> None:
        self._mark = mark
        self.base_offset = mark.first
        self.next_offset = mark.first + 1

    def validate_crc(self) -> bool:
        return True

    def __iter__(self) -> Iterator[Any]:
        yield _Placeholder(self._mark)


class _GuardedRecords:
    """A fetch's MemoryRecords, handing out guarded batches."""

    def __init__(self, records: Any, owner: Any) -> None:
        self._records = records
        self._owner = owner  # the PartitionRecords: its next_fetch_offset is the read position
        self._stopped = False

    def has_next(self) -> bool:
        return not self._stopped and bool(self._records.has_next())

    def next_batch(self) -> Any:
        try:
            return _GuardedBatch(self._records.next_batch(), self)
        except Exception as exc:  # the rest of this fetch cannot be cut into batches
            self._stopped = True
            return _BrokenBatch(Unreadable(int(self._owner.next_fetch_offset), None,
                                           _describe(exc)))

    def size_in_bytes(self) -> int:
        return int(self._records.size_in_bytes())

    def unreadable(self, batch: Any, error: BaseException, trust_header: bool) -> Unreadable:
        first = int(self._owner.next_fetch_offset)  # every offset before it was read
        base = getattr(batch, "base_offset", None)  # (legacy message sets have none)
        if trust_header and isinstance(base, int) and base > first:
            first = base  # offsets between batches were compacted away: they do not exist
        end: int | None = int(batch.next_offset)
        if not first < int(batch.next_offset) <= first + MAX_BATCH_SPAN:
            end = None
        if not trust_header or end is None:
            # A corrupt batch may also have a corrupt length: the rest of this fetch may be cut
            # at the wrong places. Stop here; the next fetch starts after this batch, at a
            # batch boundary the broker finds itself.
            self._stopped = True
        return Unreadable(first, end, _describe(error))


_PartitionRecords: Any = aiokafka_fetcher.PartitionRecords


def source_key(key: bytes | None) -> bytes | None:
    """The ingest consumer's key deserializer (the identity): marks its fetches as guarded."""
    return key


class _GuardedPartitionRecords(_PartitionRecords):
    """aiokafka's PartitionRecords; for the ingest's consumer, over guarded batches."""

    def __init__(self, tp: Any, records: Any, aborted_transactions: Any, fetch_offset: int,
                 key_deserializer: Any, value_deserializer: Any, check_crcs: bool,
                 isolation_level: Any) -> None:
        if key_deserializer is source_key:
            records = _GuardedRecords(records, self)
        super().__init__(tp, records, aborted_transactions, fetch_offset, key_deserializer,
                         value_deserializer, check_crcs, isolation_level)


GUARDED_PARAMETERS = ("self", "tp", "records", "aborted_transactions", "fetch_offset",
                      "key_deserializer", "value_deserializer", "check_crcs", "isolation_level")


def guard_problems() -> list[str]:
    """What of aiokafka's private fetcher the guard relies on has changed (empty: nothing)."""
    import inspect

    problems = []
    if not isinstance(_PartitionRecords, type):
        return ["aiokafka.consumer.fetcher.PartitionRecords is not a class"]
    params = tuple(inspect.signature(vars(_PartitionRecords)["__init__"]).parameters)
    if params != GUARDED_PARAMETERS:
        problems.append(f"PartitionRecords.__init__{params} != {GUARDED_PARAMETERS}")
    source = inspect.getsource(_PartitionRecords)
    for used in ("self._records", "records.has_next()", "records.next_batch()",
                 "next_batch.validate_crc()", "for record in next_batch",
                 "self.next_fetch_offset = next_batch.next_offset"):
        if used not in source:
            problems.append(f"PartitionRecords no longer uses {used!r}")
    fetcher_source = inspect.getsource(aiokafka_fetcher.Fetcher)
    if "PartitionRecords(" not in fetcher_source:
        problems.append("Fetcher no longer builds PartitionRecords")
    return problems


def install_guard() -> None:
    """Route aiokafka's fetcher through the guard (idempotent; other consumers unchanged)."""
    aiokafka_fetcher.PartitionRecords = _GuardedPartitionRecords


# --- Producing ------------------------------------------------------------------------------

_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)


@dataclasses.dataclass
class _Wave:
    """Dead letters and at most one pack per internal partition, produced together.

    One pack per partition at a time: if a later pack of a partition were acknowledged while an
    earlier one failed, the agent's per-account offset high-water would skip the earlier one
    when it is sent again.
    """

    letters: list[DeadLetter]
    packs: dict[int, list[list[Any]]]
    later: dict[int, list[list[list[Any]]]] = dataclasses.field(default_factory=dict)


def _kafka_error(exc: BaseException) -> bool:
    return isinstance(exc, KafkaError)


def _commit_retriable(exc: BaseException) -> bool:
    # CommitFailedError/IllegalStateError: the partitions moved to another worker, which
    # re-reads them (the packs sent here are skipped there by offset): nothing to retry.
    return isinstance(exc, KafkaError) and not isinstance(exc, CommitFailedError | IllegalStateError)


class _Stopping(Exception):
    """The worker stops while a batch waits on Kafka: it stays uncommitted, to be read again."""


class Ingestor:
    """Runs the batch loop until stopped; owned by the worker's lifecycle."""

    def __init__(self, settings: Settings, metrics: Metrics, options: DecodeOptions) -> None:
        self.settings = settings
        self.metrics = metrics
        self.options = options
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._stopping = asyncio.Event()
        self.assigned = False
        self.batches = 0
        self._lag: dict[Any, int] = {}  # source partition -> records behind, at its last batch
        # Links already sent (identity -> target): most calls repeat a known one.
        self._links_sent: dict[str, str] = {}
        self.problems = RateLimitedLog(log)
        # Told when Kafka calls start failing (True) and work again (False): the worker's
        # health check waits out an outage instead of calling it a stall.
        self.on_outage: Callable[[bool], None] = lambda failing: None
        self._failing = False

    async def start(self) -> None:
        s = self.settings
        conn = connection_options(s)
        install_guard()
        self.producer = AIOKafkaProducer(acks="all", linger_ms=5, max_request_size=4_000_000,
                                         **conn)
        self.consumer = AIOKafkaConsumer(
            *s.topics.sources(), s.topics.snapshots,  # snapshots: `churnsignal import`
            group_id=s.ingest_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_wait_ms=s.kafka.fetch_max_wait_ms,
            fetch_max_bytes=16 * 1024 * 1024,
            session_timeout_ms=int(s.kafka.session_timeout_s * 1000),
            rebalance_timeout_ms=int(s.kafka.rebalance_timeout_s * 1000),
            heartbeat_interval_ms=min(3000, int(s.kafka.session_timeout_s * 1000 / 3)),
            key_deserializer=source_key,  # unreadable batches become placeholders, see above
            **conn,
        )
        await self.producer.start()
        await self.consumer.start()

    async def stop(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        if self.producer is not None:
            await self.producer.stop()

    async def run(self) -> None:
        assert self.consumer is not None
        consumer = self.consumer
        wait_ms = int(self.settings.ingest.batch_max_wait_s * 1000)
        max_records = self.settings.ingest.batch_max_events
        while not self._stopping.is_set():
            try:
                batch = await self._retry("fetch", _kafka_error, functools.partial(
                    consumer.getmany, timeout_ms=wait_ms, max_records=max_records))
                self.assigned = bool(consumer.assignment())
                if batch:
                    await self.process(batch)
            except (_Stopping, ConsumerStoppedError):
                if self._stopping.is_set():
                    return
                raise

    async def _sleep(self, seconds: float) -> None:
        """Back-off that a stop cuts short."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _retry(self, operation: str, retriable: Callable[[BaseException], bool],
                     call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` until it succeeds, backing off on the errors ``retriable`` accepts."""

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            self.metrics.ingest_kafka_retries.labels(operation=operation).inc()
            if not self._failing:
                self._failing = True
                self.on_outage(True)
            self.problems.log(("kafka", operation, type(exc).__name__), logging.WARNING,
                              "Kafka %s failed, retrying (nothing is dead-lettered for it): %s",
                              operation, exc and _describe(exc))

        retrying = AsyncRetrying(
            retry=retry_if_exception(retriable),
            wait=wait_exponential_jitter(multiplier=0.1, max=RETRY_MAX_S, jitter=0.5),
            stop=lambda _: self._stopping.is_set(),
            sleep=self._sleep, before_sleep=before_sleep, reraise=True)
        try:
            return await retrying(call)
        except KafkaError:
            if self._stopping.is_set():
                raise _Stopping from None
            raise

    def _route(self, result: Decoded, source: str, offset: int,
               partitions: int) -> list[tuple[int, list[Any]]]:
        """Where one decoded record's pack items go. Computed before anything is changed, so a
        record that fails half way leaves nothing behind but its dead letter."""
        if isinstance(result, Rejected):
            return []
        routed: list[tuple[int, list[Any]]] = []
        for key, target in result.links:  # in source order, before the event they may unlock
            if self._links_sent.get(key) != target:
                routed.append((packs.partition_for(key, partitions),
                               [source, offset, link_item(key, target)]))
        event = result.event
        if event is not None:  # a Skipped carries one only as too-old billing/support history
            item = [source, offset, event.model_dump(mode="json", exclude_none=True)]
            if isinstance(result, Skipped):
                item.append(packs.HISTORY)
            routed.append((packs.partition_for(event.account_id, partitions), item))
        return routed

    def backlog(self) -> int:
        """Source records behind the newest, over the partitions this consumer holds (as of
        each partition's last batch): how far the ingest is from live."""
        if self.consumer is None:
            return 0
        # A paused partition (an unreadable record) keeps its last lag: not counted.
        held = self.consumer.assignment() - self.consumer.paused()
        return sum(lag for tp, lag in self._lag.items() if tp in held)

    def forget_links(self) -> None:
        """Forget which links were sent (``churnsignal forget`` deleted identity keys): the
        same link learned again, e.g. a user grouped with the account again, is sent again
        instead of being taken for one its identity already holds."""
        self._links_sent.clear()

    def _remember_links(self, links: tuple[tuple[str, str], ...]) -> None:
        for key, target in links:
            if len(self._links_sent) >= 200_000:  # bounded: forgetting only costs a resend
                self._links_sent.clear()
            self._links_sent[key] = target

    def _pause(self, tp: Any, mark: Unreadable) -> None:
        """Where the unreadable part ends is not known: skipping could pass good records, so
        this partition alone waits (until it is assigned again, e.g. after a restart)."""
        assert self.consumer is not None
        self.metrics.ingest_unreadable_batches.labels(topic=tp.topic).inc()
        with contextlib.suppress(IllegalStateError):
            self.consumer.pause(tp)
        log.error("topic %s partition %d: records from offset %d cannot be read (%s) and their "
                  "extent is unknown; this partition is paused, the others go on",
                  tp.topic, tp.partition, mark.first, mark.error)

    def _unreadable(self, tp: Any, first: int, end: int, error: str,
                    dead: list[DeadLetter]) -> None:
        """Dead-letter each offset of an unreadable batch (headers only: no bytes were read)."""
        self.metrics.ingest_unreadable_batches.labels(topic=tp.topic).inc()
        detail = f"record batch at offsets {first}..{end - 1} cannot be read: {error}"
        for offset in range(first, end):
            dead.append(DeadLetter("unreadable_batch", detail, "ingest", tp.topic, tp.partition,
                                   offset))
        self.metrics.events_dead_lettered.labels(topic=tp.topic, reason="unreadable_batch",
                                                 step="ingest").inc(end - first)
        self.problems.log(("unreadable", tp.topic, tp.partition), logging.ERROR,
                          "topic %s partition %d: %s; skipped, its %d offsets dead-lettered as "
                          "unreadable_batch", tp.topic, tp.partition, detail, end - first)

    async def process(self, batch: dict[Any, list[Any]]) -> None:
        """Decode, dead-letter and repartition one batch; commit its offsets after the acks."""
        assert self.producer is not None and self.consumer is not None
        s, m = self.settings, self.metrics
        now = time.time()
        partitions = s.partitions
        by_partition: dict[int, list[list[Any]]] = defaultdict(list)
        dead: list[DeadLetter] = []
        offsets: dict[Any, int] = {}
        # Counted per batch: a labelled metric lookup per event costs more than the decode.
        accepted: Counter[tuple[str, str]] = Counter()
        rejected: Counter[tuple[str, str]] = Counter()
        skipped: Counter[tuple[str, str]] = Counter()
        for tp, records in batch.items():
            topic = tp.topic
            source = f"{topic}/{tp.partition}"
            # The import writes canonical snapshots: anything else there is a mistake.
            pinned = s.ingest.sources.get(
                topic, "canonical" if topic == s.topics.snapshots else "auto")
            consumed = len(records)
            next_offset = records[-1].offset + 1
            for rec in records:
                if rec.headers and type(rec.headers[0]) is Unreadable:
                    mark: Unreadable = rec.headers[0]
                    if mark.end is None:
                        self._pause(tp, mark)
                        consumed = records.index(rec)  # the rest waits behind the pause
                        next_offset = mark.first
                        break
                    self._unreadable(tp, mark.first, mark.end, mark.error, dead)
                    consumed += mark.end - mark.first - 1  # one placeholder, n offsets
                    if rec is records[-1]:
                        next_offset = mark.end
                    continue
                try:
                    result = decode(rec.value, self.options, now, pinned)
                    routed = self._route(result, source, rec.offset, partitions)
                except Exception as exc:  # one record must never stop the loop
                    dead.append(DeadLetter("processing_error", _describe(exc), "ingest", topic,
                                           tp.partition, rec.offset, rec.timestamp, rec.key,
                                           rec.value))
                    rejected[topic, "processing_error"] += 1
                    self.problems.log(("record", type(exc).__name__), logging.ERROR,
                                      "%s/%d@%d could not be processed and was dead-lettered "
                                      "as processing_error: %s", topic, tp.partition,
                                      rec.offset, _describe(exc), exc_info=exc)
                    continue
                if isinstance(result, Rejected):
                    dead.append(deadletter.rejected(result, topic, tp.partition, rec.offset,
                                                    rec.timestamp, rec.key, rec.value))
                    rejected[topic, result.reason] += 1
                    continue
                for partition, item in routed:
                    by_partition[partition].append(item)
                if result.links:
                    self._remember_links(result.links)
                if isinstance(result, Accepted):
                    accepted[topic, result.event.type] += 1
                else:
                    skipped[topic, result.reason] += 1
            offsets[tp] = next_offset
            m.events_consumed.labels(topic=topic).inc(consumed)
        for (topic, kind), n in accepted.items():
            m.events_accepted.labels(topic=topic, type=kind).inc(n)
        for (topic, reason), n in rejected.items():
            m.events_dead_lettered.labels(topic=topic, reason=reason,
                                          step="ingest" if reason == "processing_error"
                                          else "decode").inc(n)
        for (topic, reason), n in skipped.items():
            m.events_skipped.labels(topic=topic, reason=reason).inc(n)
        await self._deliver(dead, by_partition, now)
        await self._commit(offsets)
        self.batches += 1
        if self._failing:
            self._failing = False
            self.on_outage(False)
        m.ingest_paused_partitions.set(len(self.consumer.paused()))
        for tp, offset in offsets.items():
            high = self.consumer.highwater(tp)
            if high is not None:
                self._lag[tp] = max(0, high - offset)
                m.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    self._lag[tp])

    async def _deliver(self, dead: list[DeadLetter], by_partition: dict[int, list[list[Any]]],
                       now: float) -> None:
        """Produce the dead letters and packs until Kafka acknowledges every one."""
        queues = {p: deque(packs.chunks(items)) for p, items in by_partition.items() if items}
        letters = dead
        while letters or queues:
            wave = _Wave(letters, {p: q.popleft() for p, q in queues.items()})
            await self._retry("produce", _kafka_error, functools.partial(self._send_wave, wave, now))
            for p, halves in wave.later.items():  # packs split because they were too large
                queues.setdefault(p, deque()).extendleft(reversed(halves))
            queues = {p: q for p, q in queues.items() if q}
            letters = []

    async def _send(self, topic: str, value: bytes | None, key: bytes | None = None,
                    headers: list[tuple[str, bytes]] | None = None,
                    partition: int | None = None) -> asyncio.Future[Any]:
        assert self.producer is not None
        try:
            fut: asyncio.Future[Any] = await self.producer.send(
                topic, value=value, key=key, headers=headers, partition=partition)
        except KafkaError as exc:
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(exc)
        return fut

    async def _send_wave(self, wave: _Wave, now: float) -> None:
        """Send what is left of ``wave``; what Kafka acknowledged leaves it. Raises the first
        Kafka error when something could not be delivered (the caller backs off, retries)."""
        s = self.settings
        while wave.letters or wave.packs:
            # A Kafka client refuses a record with neither key nor value (an unreadable batch's
            # dead letters have neither): an empty key then says the original is not known.
            sent_letters = [await self._send(s.topics.dlq, d.value,
                                             b"" if d.key is None and d.value is None else d.key,
                                             d.headers())
                            for d in wave.letters]
            sent_packs = {p: await self._send(s.ingested_topic, packs.encode(now, items),
                                              partition=p)
                          for p, items in wave.packs.items()}
            results = await asyncio.gather(*sent_letters, *sent_packs.values(),
                                           return_exceptions=True)
            error: BaseException | None = None
            letters: list[DeadLetter] = []
            for letter, result in zip(wave.letters, results, strict=False):
                if not isinstance(result, BaseException):
                    continue
                if isinstance(result, _TOO_LARGE) and letter.value is not None:
                    # The original bytes do not fit the DLQ topic: the headers still say all.
                    letters.append(dataclasses.replace(
                        letter, value=None,
                        detail=letter.detail + " [value dropped: too large for the DLQ topic]"))
                elif isinstance(result, KafkaError):
                    letters.append(letter)
                    error = error or result
                else:
                    raise result
            for (p, items), result in zip(list(wave.packs.items()), results[len(wave.letters):],
                                          strict=True):
                if not isinstance(result, BaseException):
                    del wave.packs[p]
                elif isinstance(result, _TOO_LARGE) and len(items) > 1:
                    half = len(items) // 2  # the first half now, the second next
                    wave.packs[p] = items[:half]
                    wave.later.setdefault(p, []).insert(0, items[half:])
                elif isinstance(result, _TOO_LARGE):
                    del wave.packs[p]
                    letters.append(self._oversized(items[0]))
                elif isinstance(result, KafkaError):
                    error = error or result
                else:
                    raise result
            wave.letters = letters
            if error is not None:
                raise error

    def _oversized(self, item: list[Any]) -> DeadLetter:
        """One pack item larger than the ingested topic takes (only if that topic's limit is
        below the decoder's max_message_bytes)."""
        topic, partition = deadletter.source_of(item[0])
        # (counted as accepted already: the one ingest dead letter of an accepted event)
        self.metrics.events_dead_lettered.labels(topic=topic, reason="processing_error",
                                                 step="ingest").inc()
        return DeadLetter("processing_error", "event too large for the ingested topic", "ingest",
                          topic, partition, item[1], value=orjson.dumps(item[2]))

    async def _commit(self, offsets: dict[Any, int]) -> None:
        assert self.consumer is not None
        try:
            await self._retry("commit", _commit_retriable,
                              functools.partial(self.consumer.commit, offsets))
        except (CommitFailedError, IllegalStateError) as exc:
            # Partitions moved to another worker mid-batch: it re-reads them, and the packs
            # sent here are skipped there by offset, so this is safe to drop.
            log.warning("offset commit after rebalance failed (safe, will re-read): %s", exc)
