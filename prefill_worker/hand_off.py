"""Starting and finishing the KV sends of a prefill replica.

Each send runs `KVSender.send` on a thread of this replica's own send pool: with layer
pipelining a send starts before its prefill pass and waits for the pass's layers, so sends must
never wait for the thread that runs the pass (which has a pool of its own). A send reads its
job's blocks until it returns, so only its completion clears `job.sending`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from engine.kv_cache import PagedKVCache
from engine.kv_io import PagedKVSource
from engine.layer_progress import LayerProgress
from kvtransfer import KVLayout, KVSender, TransferStats, make_sender
from kvtransfer.base import FirstToken
from pdserve.config import PdserveConfig
from pdserve.errors import DeadlineExceeded, FailedPrecondition, PdserveError, StatusCode
from pdserve.faults import FaultInjector
from pdserve.messages import PrefillEvent
from pdserve.metrics import ReplicaMetrics
from prefill_worker.job import PrefillJob


class KVHandOff:
    def __init__(
        self,
        layout: KVLayout,
        kv_cache: PagedKVCache,
        config: PdserveConfig,
        on_send_done: Callable[[PrefillJob], None],
        faults: FaultInjector,
        metrics: ReplicaMetrics,
    ) -> None:
        self._senders: dict[str, KVSender] = {}
        self._metrics = metrics
        self._faults = faults
        self._layout = layout
        self._kv_cache = kv_cache
        self._config = config
        self._on_send_done = on_send_done
        # Every job of a pipelined batch sends at once; a few more for stragglers.
        self._pool = ThreadPoolExecutor(
            max_workers=2 * config.prefill.max_batch_size + 2, thread_name_prefix="kv-send"
        )
        self.total_kv_bytes = 0

    def start(
        self, job: PrefillJob, first_token: FirstToken, progress: LayerProgress | None
    ) -> None:
        """Starts streaming `job`'s KV to its decode replica. With `progress`, the pass that
        computes it may still run: chunks go out as their layers land. Raises
        DEADLINE_EXCEEDED when the request has no time left."""
        assert job.block_table is not None, "blocks are allocated before a send starts"
        timeout_s = self._timeout_s(job)
        # The whole prompt's KV goes out: the cached prefix's blocks are read like the rest.
        source = PagedKVSource(
            self._kv_cache, job.block_table, job.num_prompt_tokens, progress,
            num_ready_tokens=job.num_computed_tokens,
        )
        send = functools.partial(
            self._sender(job.request.kv_target.transport).send,
            address=job.request.kv_target.address,
            transfer_id=job.transfer_id, layout=self._layout, num_tokens=job.num_prompt_tokens,
            source=source, first_token_id=first_token, cancel=job.cancel, timeout_s=timeout_s,
            fault=self._faults.kv_chunk_fault(job.request.prompt_token_ids),
        )
        job.sending = True
        job.send_started_at = time.monotonic()
        job.send_task = asyncio.get_running_loop().run_in_executor(self._pool, send)
        job.send_task.add_done_callback(lambda task: self._send_done(job, task))

    async def finish(self, job: PrefillJob, first_token_id: int) -> PrefillEvent:
        """Waits for `job`'s send (starting it now if it was not pipelined)."""
        if job.send_task is None:
            self.start(job, first_token_id, None)
        assert job.send_task is not None, "start() set the task"
        # Shielded: cancelling this coroutine must not orphan the thread reading the blocks.
        stats = await asyncio.shield(job.send_task)
        done_at = time.monotonic()
        self.total_kv_bytes += stats.num_bytes
        # What the hand-off adds after the pass: pipelined sends overlap the pass.
        exposed_s = done_at - max(job.forward_done_at, job.send_started_at)
        return PrefillEvent(
            kind="transferred", transfer_s=exposed_s, num_bytes=stats.num_bytes,
            transport=stats.transport,
        )

    def _send_done(self, job: PrefillJob, task: asyncio.Future[TransferStats]) -> None:
        self._count_send(task)
        self._on_send_done(job)

    def _count_send(self, task: asyncio.Future[TransferStats]) -> None:
        """Counts the send's bytes or its failure. Retrieving the exception matters too:
        finish() may never await an aborted job's send."""
        if task.cancelled():
            self._metrics.count_kv_transfer_failure(StatusCode.CANCELLED.value)
            return
        error = task.exception()
        if error is None:
            stats = task.result()
            self._metrics.count_kv_sent(stats.transport, stats.num_bytes)
            return
        code = error.code if isinstance(error, PdserveError) else StatusCode.INTERNAL
        self._metrics.count_kv_transfer_failure(code.value)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for sender in self._senders.values():
            sender.close()

    def _sender(self, transport: str) -> KVSender:
        """The sender of the transport the router chose for this request (created once)."""
        configured = self._config.kv_transfer.transport
        allowed = ("grpc", "shm") if configured == "auto" else (configured,)
        if transport not in allowed:
            raise FailedPrecondition(
                f"kv transport {transport!r} is not enabled here (kv_transfer.transport: "
                f"{configured})"
            )
        if transport not in self._senders:
            sender = make_sender(transport, self._config.kv_transfer)
            staging = getattr(sender, "shm_staging", None)
            if staging is not None:  # the shm pool's use and fallbacks show in the metrics
                self._metrics.watch_shm_staging(staging.stats)
            self._senders[transport] = sender
        return self._senders[transport]

    def _timeout_s(self, job: PrefillJob) -> float:
        # The lease: KV waits for the decode side no longer than this, then is freed.
        timeout_s = min(
            self._config.kv_transfer.timeout_s,
            self._config.prefill.lease_ttl_s,
            job.seconds_left(),
        )
        if timeout_s <= 0:
            raise DeadlineExceeded("deadline passed before the KV hand-off")
        return timeout_s
