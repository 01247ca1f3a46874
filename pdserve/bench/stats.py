"""Benchmark statistics: percentiles, throughput and goodput over request records.

Latency statistics cover requests that finished OK; failed requests are counted by status.
Throughput and goodput divide by the measured window (benchmark start to the last request's
end), so a run that queues work past its arrival window is charged for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdserve.bench.workload import ordered_kinds

if TYPE_CHECKING:
    from pdserve.bench.records import RequestRecord

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (the
    common "linear" definition). Raises ValueError for no values or q outside [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99 and max of `values` (None figures when there are none)."""
    summary: dict[str, float | int | None] = {"count": len(values)}
    summary["mean"] = sum(values) / len(values) if values else None
    for q in PERCENTILES:
        summary[f"p{q}"] = percentile(values, q) if values else None
    summary["max"] = max(values) if values else None
    return summary


@dataclass(frozen=True)
class Slo:
    """Service-level objective of goodput: TTFT bound and bound on a request's own p99
    inter-token gap, in seconds; None leaves that bound out."""

    ttft_s: float | None = None
    itl_p99_s: float | None = None

    def met_by(self, record: RequestRecord) -> bool:
        """True when the request finished OK and is within both bounds. A request without
        inter-token gaps (one token) meets the ITL bound."""
        if not record.ok:
            return False
        if self.ttft_s is not None and (record.ttft_s is None or record.ttft_s > self.ttft_s):
            return False
        itl_p99_s = record.itl_p99_s()
        return self.itl_p99_s is None or itl_p99_s is None or itl_p99_s <= self.itl_p99_s


def summarize(records: Sequence[RequestRecord], elapsed_s: float, slo: Slo) -> dict[str, Any]:
    """The run's summary: counts, failures by status, throughput, goodput and latency
    percentiles overall and per request kind. Raises ValueError if `elapsed_s` <= 0."""
    if not elapsed_s > 0:
        raise ValueError(f"elapsed_s must be > 0, got {elapsed_s}")
    ok = [record for record in records if record.ok]
    num_slo_met = sum(1 for record in records if slo.met_by(record))
    num_output_tokens = sum(record.num_completion_tokens for record in ok)
    summary: dict[str, Any] = {
        "num_requests": len(records),
        "num_ok": len(ok),
        "num_failed": len(records) - len(ok),
        "failures": _failures(records),
        "elapsed_s": elapsed_s,
        "request_throughput_per_s": len(ok) / elapsed_s,
        "output_token_throughput_per_s": num_output_tokens / elapsed_s,
        "num_output_tokens": num_output_tokens,
        "slo": {"ttft_s": slo.ttft_s, "itl_p99_s": slo.itl_p99_s},
        "num_slo_met": num_slo_met,
        "goodput_per_s": num_slo_met / elapsed_s,
        **_latencies(ok),
    }
    kinds = ordered_kinds({record.kind for record in records})
    summary["by_kind"] = {
        kind: {
            "num_requests": sum(1 for record in records if record.kind == kind),
            "num_ok": sum(1 for record in ok if record.kind == kind),
            **_latencies([record for record in ok if record.kind == kind]),
        }
        for kind in kinds
    }
    return summary


def _latencies(records: Iterable[RequestRecord]) -> dict[str, dict[str, float | int | None]]:
    records = list(records)
    ttfts = [record.ttft_s for record in records if record.ttft_s is not None]
    tpots = [record.tpot_s for record in records if record.tpot_s is not None]
    gaps = [gap for record in records for gap in record.itl_gaps_s()]
    return {
        "ttft_s": latency_summary(ttfts),
        "itl_s": latency_summary(gaps),
        "tpot_s": latency_summary(tpots),
        "e2e_s": latency_summary([record.e2e_s for record in records]),
    }


def _failures(records: Iterable[RequestRecord]) -> dict[str, dict[str, Any]]:
    """Per failed status: how many, and the first error message as an example."""
    failures: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.ok:
            continue
        entry = failures.setdefault(record.status, {"count": 0, "example": record.error})
        entry["count"] += 1
    return failures
