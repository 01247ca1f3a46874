"""A prefill replica's shared-memory KV staging ("shm" transport), read at each scrape.

The sender keeps its own counts (`kvtransfer.shm_staging.ShmStats`); this collector turns one
snapshot per scrape into series labelled `replica` and `role`, so that a transfer that fell
back from the pool to a fresh segment (slower: every page faults) shows up. Until a sender is
watched (decode replicas, other transports, no shm transfer yet) every series reads 0, which
is also what `ShmStats` reports for a replica without a pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from kvtransfer.shm_staging import ShmStats

_LABELS = ["replica", "role"]

# (series name, its value in a snapshot, help text)
_Series = tuple[str, Callable[["ShmStats"], int], str]

_GAUGES: tuple[_Series, ...] = (
    ("pdserve_replica_shm_pool_bytes", lambda s: s.pool_bytes,
     "Size of the replica's shared-memory KV pool; 0 without one (not sending over shm yet, "
     "kv_transfer.shm_pool_mb: 0, or it could not be created)."),
    ("pdserve_replica_shm_pool_free_bytes", lambda s: s.pool_free_bytes,
     "Bytes of the shared-memory KV pool no transfer holds."),
    ("pdserve_replica_shm_pool_active_leases", lambda s: s.num_active_leases,
     "Transfers staging their KV in the shared-memory pool now."),
    ("pdserve_replica_shm_pool_quarantined_regions", lambda s: s.num_quarantined_regions,
     "Pool regions whose transfer ended while a receiver still held them (reused once "
     "released)."),
)
_COUNTERS: tuple[_Series, ...] = (
    ("pdserve_replica_shm_pool_transfers", lambda s: s.num_pool_transfers,
     "Shm transfers staged in the replica's shared-memory pool."),
    ("pdserve_replica_shm_fallback_transfers", lambda s: s.num_fallback_transfers,
     "Shm transfers staged in a fresh segment although a pool was configured (pool full, "
     "too small for the transfer, or unavailable): slower, see the replica's WARNING."),
    ("pdserve_replica_shm_pool_deferred_reclaims", lambda s: s.num_deferred_reclaims,
     "Pool regions that had to wait for a receiver to release them when their transfer "
     "ended."),
)


class ShmStagingCollector:
    """Registered once in a `ReplicaMetrics` registry. `watch` is called on the replica's event
    loop, `collect` on the scrape thread (it calls the watched `stats`, which must not
    block)."""

    def __init__(self, replica_id: str, role: str) -> None:
        self._label_values = [replica_id, role]
        self._stats: Callable[[], ShmStats] | None = None

    def watch(self, stats: Callable[[], ShmStats]) -> None:
        """Reads the series from `stats` from now on (a later call replaces the earlier)."""
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        snapshot = stats() if stats is not None else None
        for name, read, doc in _GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=_LABELS)
            gauge.add_metric(self._label_values, 0 if snapshot is None else read(snapshot))
            yield gauge
        for name, read, doc in _COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=_LABELS)
            counter.add_metric(self._label_values, 0 if snapshot is None else read(snapshot))
            yield counter
