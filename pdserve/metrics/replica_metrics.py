"""What one replica measures: its load, its forward passes, and the KV it moves.

Created by the replica's actor (which serves it when `metrics.enabled`) and handed to the
worker, which passes it on to its batch loop and KV hand-off. Every series carries the
replica's `replica` and `role` labels; the KV counters add `transport` or `status`. A prefill
replica's shm sender is read at each scrape (`watch_shm_staging`, pdserve/metrics/shm_metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from pdserve.config import MetricsConfig
from pdserve.messages import LoadReport
from pdserve.metrics.buckets import BATCH_SIZES, BATCH_TOKENS, REQUEST_SECONDS, TOKEN_SECONDS
from pdserve.metrics.endpoint import MetricsEndpoint
from pdserve.metrics.shm_metrics import ShmStagingCollector

if TYPE_CHECKING:
    from kvtransfer.shm_staging import ShmStats

_REPLICA = ["replica", "role"]


class ReplicaMetrics(MetricsEndpoint):
    """One replica's metrics. Recording methods never block and are thread-safe; the worker's
    event loop calls them (a replica built without one, as in unit tests, gets an unserved
    instance)."""

    def __init__(self, replica_id: str, role: str) -> None:
        super().__init__()
        self._labels = (replica_id, role)
        registry = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, _REPLICA, registry=registry)

        self.active_requests = gauge(
            "pdserve_replica_active_requests", "Requests on the replica, at any stage."
        )
        self.waiting_requests = gauge(
            "pdserve_replica_waiting_requests",
            "Prefill: prompts queued for a pass. Decode: reservations waiting for their KV.",
        )
        self.running_sequences = gauge(
            "pdserve_replica_running_sequences",
            "Requests past waiting. Decode: in the running batch. Prefill: in a pass or "
            "handing off KV.",
        )
        self.kv_blocks_used = gauge("pdserve_replica_kv_blocks_used", "KV cache blocks in use.")
        self.kv_blocks_total = gauge("pdserve_replica_kv_blocks_total", "KV cache blocks.")
        self.kv_transfers_in_flight = gauge(
            "pdserve_replica_kv_transfers_in_flight",
            "KV transfers in progress (sending on prefill, receiving on decode).",
        )
        self.prefill_batch_size = Histogram(
            "pdserve_prefill_batch_size", "Prompts in one prefill pass.",
            _REPLICA, registry=registry, buckets=BATCH_SIZES,
        )
        self.prefill_batch_tokens = Histogram(
            "pdserve_prefill_batch_tokens",
            "Prompt tokens one prefill pass computed (prefix-cache hits excluded).",
            _REPLICA, registry=registry, buckets=BATCH_TOKENS,
        )
        self.prefill_pass_duration = Histogram(
            "pdserve_prefill_pass_duration_seconds",
            "One batched prefill forward pass, sampling included.",
            _REPLICA, registry=registry, buckets=REQUEST_SECONDS,
        )
        self.decode_batch_size = Histogram(
            "pdserve_decode_batch_size", "Sequences in one decode step.",
            _REPLICA, registry=registry, buckets=BATCH_SIZES,
        )
        self.decode_step_duration = Histogram(
            "pdserve_decode_step_duration_seconds",
            "One batched decode step (forward and sampling).",
            _REPLICA, registry=registry, buckets=TOKEN_SECONDS,
        )
        self.kv_sent_bytes = Counter(
            "pdserve_replica_kv_sent_bytes_total",
            "KV bytes of acknowledged sends (prefill), by the transport that carried them.",
            [*_REPLICA, "transport"], registry=registry,
        )
        self.kv_received_bytes = Counter(
            "pdserve_replica_kv_received_bytes_total",
            "KV bytes of completed receives (decode), by the receiver's transport; `auto` "
            "receivers take grpc and shm pushes alike (the prefill side and the router say "
            "which one ran).",
            [*_REPLICA, "transport"], registry=registry,
        )
        self.kv_transfer_failures = Counter(
            "pdserve_replica_kv_transfer_failures_total",
            "KV sends (prefill) or receives (decode) that failed, by status code name.",
            [*_REPLICA, "status"], registry=registry,
        )
        self.prefix_cache_hits = Counter(
            "pdserve_prefix_cache_hits_total",
            "Prompt tokens whose KV a prefill replica took from its prefix cache instead of "
            "computing it (hit rate: divide by pdserve_prefix_cache_prompt_tokens_total).",
            _REPLICA, registry=registry,
        )
        self.prefix_cache_prompt_tokens = Counter(
            "pdserve_prefix_cache_prompt_tokens_total",
            "Prompt tokens of the requests a prefill replica batched, cached or not.",
            _REPLICA, registry=registry,
        )
        self.prefix_cache_blocks = gauge(
            "pdserve_prefix_cache_blocks",
            "KV blocks a prefill replica keeps in its prefix cache, referenced or not.",
        )
        self.preemptions = Counter(
            "pdserve_replica_preemptions_total",
            "Sequences a decode or colocated replica preempted by recompute: their KV blocks "
            "were freed for older sequences to grow and the router re-prefills them.",
            _REPLICA, registry=registry,
        )
        self.stalled_readers = gauge(
            "pdserve_replica_stalled_readers",
            "Requests on a decode or colocated replica whose client is not reading its stream "
            "(timeouts.reader_slow_s): the first preemption victims.",
        )
        self.native_kernels = gauge(
            "pdserve_replica_native_kernels",
            "1 when pdserve's native kernels run the linear layers of decode steps, 0 when "
            "torch's do (model.kernels; the replica's log and Info say why).",
        )
        self.pinned_cpus = gauge(
            "pdserve_replica_pinned_cpus",
            "Cores the replica process is pinned to (resources.pin_cpus); 0 = unpinned.",
        )
        # Exported at 0 (decode replicas included) so dashboards find them.
        for metric in (self.prefix_cache_hits, self.prefix_cache_prompt_tokens,
                       self.prefix_cache_blocks, self.pinned_cpus, self.preemptions,
                       self.stalled_readers, self.native_kernels):
            metric.labels(*self._labels)
        self._shm_staging = ShmStagingCollector(replica_id, role)
        registry.register(self._shm_staging)

    @classmethod
    def start(
        cls, config: MetricsConfig, replica_id: str, role: str, node_ip: str
    ) -> ReplicaMetrics:
        """The replica's metrics, served on `config.replica_port` when `config.enabled`.
        Called once by the actor; raises FailedPrecondition when the port is taken."""
        metrics = cls(replica_id, role)
        if config.enabled:
            metrics.serve(config.host, config.replica_port, "metrics.replica_port", node_ip)
        return metrics

    def observe_load(self, report: LoadReport) -> None:
        """Sets the gauges from the load report the router polls (so they lag by at most
        one poll interval). Called on the replica's event loop."""
        labels = self._labels
        self.active_requests.labels(*labels).set(report.num_active_requests)
        self.waiting_requests.labels(*labels).set(report.num_waiting_requests)
        self.running_sequences.labels(*labels).set(
            report.num_active_requests - report.num_waiting_requests
        )
        self.kv_blocks_used.labels(*labels).set(report.num_total_blocks - report.num_free_blocks)
        self.kv_blocks_total.labels(*labels).set(report.num_total_blocks)
        self.kv_transfers_in_flight.labels(*labels).set(report.num_transfers)
        self.prefix_cache_blocks.labels(*labels).set(report.num_cached_blocks)
        self.stalled_readers.labels(*labels).set(report.num_stalled_readers)

    def set_native_kernels(self, native: bool) -> None:
        self.native_kernels.labels(*self._labels).set(int(native))

    def set_pinned_cpus(self, num_cpus: int) -> None:
        """The number of cores the actor pinned its process to (`pdserve.cpu_pinning`)."""
        self.pinned_cpus.labels(*self._labels).set(num_cpus)

    def observe_prefill_pass(self, num_requests: int, num_tokens: int, seconds: float) -> None:
        self.prefill_batch_size.labels(*self._labels).observe(num_requests)
        self.prefill_batch_tokens.labels(*self._labels).observe(num_tokens)
        self.prefill_pass_duration.labels(*self._labels).observe(seconds)

    def count_prefix_cache(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        """Prompt tokens of one prefill pass and how many of them the prefix cache served."""
        self.prefix_cache_prompt_tokens.labels(*self._labels).inc(num_prompt_tokens)
        self.prefix_cache_hits.labels(*self._labels).inc(num_cached_tokens)

    def observe_decode_step(self, num_seqs: int, seconds: float) -> None:
        self.decode_batch_size.labels(*self._labels).observe(num_seqs)
        self.decode_step_duration.labels(*self._labels).observe(seconds)

    def count_preemption(self) -> None:
        """One sequence preempted (its blocks freed, its stream handed back to the router)."""
        self.preemptions.labels(*self._labels).inc()

    def count_kv_sent(self, transport: str, num_bytes: int) -> None:
        self.kv_sent_bytes.labels(*self._labels, transport).inc(num_bytes)

    def count_kv_received(self, transport: str, num_bytes: int) -> None:
        self.kv_received_bytes.labels(*self._labels, transport).inc(num_bytes)

    def count_kv_transfer_failure(self, status: str) -> None:
        self.kv_transfer_failures.labels(*self._labels, status).inc()

    def watch_shm_staging(self, stats: Callable[[], ShmStats]) -> None:
        """Reads the pool and fallback series from `stats` (`ShmStaging.stats` of the replica's
        shm sender) at each scrape. Called once the sender exists; `stats` must not block."""
        self._shm_staging.watch(stats)
