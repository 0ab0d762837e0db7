"""100,000 identities wait for a link: memory stays bounded by count and time, and is released."""

from __future__ import annotations

import gc
import tracemalloc

import orjson

from churnsignal.schemas import identity
from churnsignal.stream.identity import IdentityState, Resolution, link_item, resolve, sweep

NOW = 1_764_000_000.0
TTL = 7 * 86_400.0
N = 100_000
BOUND = 10_000
JOINED = 1_000
# A Segment track call as the ingest packs it; each identity gets its own decoded copy.
TEMPLATE = orjson.dumps({"event_id": "m-{i}", "account_id": "{key}", "type": "feature_used",
                         "user_id": "user-{i}", "occurred_at": "2025-11-24T00:00:00+00:00",
                         "data": {"feature": "reports", "name": "Report Viewed", "count": 1}})


class Store:
    """The agent's state store in miniature: decoded copies, and the bytes last written
    (a tombstone deletes both, as the null record deletes the key from the state topic)."""

    def __init__(self) -> None:
        self.cache: dict[str, IdentityState] = {}
        self.data: dict[bytes, bytes] = {}

    def put(self, state: IdentityState) -> None:
        self.cache[state.key] = state
        self.data[state.key.encode()] = state.to_bytes()

    def apply(self, resolutions: list[Resolution]) -> int:
        expired = 0
        for res in resolutions:
            expired += len(res.expired)  # dead-lettered as unattributed_expired
            if res.tombstone:
                del self.cache[res.key]
                del self.data[res.key.encode()]
            elif res.changed:
                self.put(self.cache[res.key])
        return expired

    def waiting(self) -> list[str]:
        return [k for k, s in self.cache.items() if s.link is None and s.parked]


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def _park(store: Store, i: int) -> None:
    key = identity.segment_user(f"user-{i:06d}")
    raw = TEMPLATE.replace(b"{i}", str(i).encode()).replace(b"{key}", key.encode())
    state = IdentityState(key)
    resolve(state, [(f"usage.events/{i % 4}", i, orjson.loads(raw))], 1000, NOW + i)
    store.put(state)


def test_parking_100k_identities_is_bounded_in_count_and_time_and_released() -> None:
    store = Store()
    for j in range(JOINED):  # joined identities are kept (compact) and never count
        key = identity.segment_user(f"joined-{j}")
        state = IdentityState(key)
        resolve(state, [("usage.events/0", j, link_item(key, "acme"))], 1000, NOW)
        store.put(state)
    tracemalloc.start()
    try:
        base = _traced()
        for i in range(N):
            _park(store, i)
        parked = _traced() - base
        per_identity = parked / N

        # The count: one re-score tick leaves the newest BOUND waiting, the rest expire.
        tick = sweep(store.cache.values(), NOW + N, grace_s=60, ttl_s=TTL, max_identities=BOUND)
        assert tick.waiting == BOUND and len(tick.resolutions) == N - BOUND
        assert all(r.tombstone and r.expired_by == "count" for r in tick.resolutions)
        assert store.apply(tick.resolutions) == N - BOUND
        del tick
        assert sorted(store.waiting()) == [identity.segment_user(f"user-{i:06d}")
                                           for i in range(N - BOUND, N)]
        bounded = _traced() - base

        # The time: a week later every event still waiting has expired, every key is gone.
        tick = sweep(store.cache.values(), NOW + N + TTL, grace_s=60, ttl_s=TTL,
                     max_identities=BOUND)
        assert (tick.waiting, len(tick.resolutions)) == (0, BOUND)
        assert all(r.tombstone and r.expired_by == "ttl" for r in tick.resolutions)
        assert store.apply(tick.resolutions) == BOUND
        del tick
        released = _traced() - base
        # Python never shrinks a dict's table; a copy (a partition read back) does.
        store.cache, store.data = dict(store.cache), dict(store.data)
        rebuilt = _traced() - base
    finally:
        tracemalloc.stop()

    assert len(store.cache) == len(store.data) == JOINED  # joined identities stay
    print(f"\n{N:,} identities parked: {parked / 2**20:.1f} MiB ({per_identity:.0f} B each); "
          f"after the count bound ({BOUND:,}): {bounded / 2**20:.1f} MiB; after the TTL: "
          f"{released / 2**20:.1f} MiB, {rebuilt / 2**10:.0f} KiB once the dicts are rebuilt")
    # One waiting identity with one event costs under 2.5 KB, bytes in the store included
    # (orjson's 4 KiB buffers, kept as they came, would be 4 KB more each).
    assert per_identity < 2_500
    # What stays is the BOUND identities, plus the two dicts' tables, which Python does not
    # shrink (about 90 bytes per key they once held), then nothing.
    assert bounded < BOUND * per_identity + 128 * N
    assert released < 128 * N
    assert rebuilt < 2**20
