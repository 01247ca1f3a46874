"""Benchmark statistics on hand-made request records: percentiles, per-request latencies,
SLO checks, throughput and goodput, the summary table."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.records import OK, RequestRecord
from pdserve.bench.report import format_summary
from pdserve.bench.stats import Slo, latency_summary, percentile, summarize


def _record(
    offsets: list[float],
    sizes: list[int] | None = None,
    *,
    send_s: float = 0.0,
    status: str = OK,
    kind: str = "main",
    num_completion_tokens: int | None = None,
) -> RequestRecord:
    """A record sent at `send_s` whose token messages came `offsets` later, ending with the
    last message."""
    sizes = sizes if sizes is not None else [1] * len(offsets)
    record = RequestRecord(index=0, kind=kind, max_tokens=sum(sizes), scheduled_s=send_s)
    record.send_s = send_s
    for offset, size in zip(offsets, sizes):
        record.add_message(offset, size)
    record.end_s = send_s + (offsets[-1] if offsets else 0.5)
    record.status = status
    record.error = "" if status == OK else f"{status} details"
    record.num_completion_tokens = (
        num_completion_tokens if num_completion_tokens is not None else sum(sizes)
    )
    return record


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)  # rank 2.7 -> 3 + 0.7 * (4 - 3)
    assert percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("values, q", [([], 50), ([1.0], -1), ([1.0], 100.5)])
def test_percentile_rejects_bad_input(values: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        percentile(values, q)


def test_latency_summary_of_nothing_has_none_figures() -> None:
    assert latency_summary([]) == {
        "count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None
    }  # fmt: skip
    figures = latency_summary([1.0, 2.0, 3.0])
    assert figures["mean"] == pytest.approx(2.0) and figures["max"] == 3.0
    assert figures["p50"] <= figures["p90"] <= figures["p99"] <= figures["max"]


def test_record_splits_multi_token_messages_into_even_gaps() -> None:
    # tokens: 1 at 0.1 s, 1 at 0.2 s, 2 at 0.5 s (gap 0.3 s over 2 tokens)
    record = _record([0.1, 0.2, 0.5], [1, 1, 2], send_s=10.0)
    assert record.ttft_s == pytest.approx(0.1)
    assert record.itl_gaps_s() == pytest.approx([0.1, 0.15, 0.15])
    assert record.tpot_s == pytest.approx(0.4 / 3)
    assert sum(record.itl_gaps_s()) == pytest.approx(0.5 - 0.1)
    assert record.gap_end_times_s() == pytest.approx([10.2, 10.5, 10.5])
    assert record.e2e_s == pytest.approx(0.5)


def test_extra_tokens_of_the_first_message_are_zero_gaps() -> None:
    record = _record([0.2, 0.4], [3, 1])
    assert record.itl_gaps_s() == pytest.approx([0.0, 0.0, 0.2])
    assert len(record.itl_gaps_s()) == record.num_tokens_received - 1
    assert record.tpot_s == pytest.approx(0.2 / 3)


def test_one_token_has_no_gaps_or_tpot() -> None:
    record = _record([0.3])
    assert record.itl_gaps_s() == [] and record.tpot_s is None and record.itl_p99_s() is None


def test_to_dict_is_json_with_derived_latencies() -> None:
    record = _record([0.1, 0.3], send_s=1.0)
    data = json.loads(json.dumps(record.to_dict()))
    assert data["ttft_s"] == pytest.approx(0.1) and data["itl_s"] == pytest.approx([0.2])
    assert data["message_num_tokens"] == [1, 1] and data["status"] == OK


def test_slo_checks_ttft_and_the_requests_own_itl_p99() -> None:
    fast = _record([0.1, 0.2, 0.3])  # ttft 0.1, gaps 0.1
    slow_start = _record([0.9, 1.0])  # ttft 0.9
    one_stall = _record([0.1, 0.2, 0.8])  # gaps 0.1 and 0.6: own p99 ~0.595
    failed = _record([0.1, 0.2], status="UNAVAILABLE")
    slo = Slo(ttft_s=0.5, itl_p99_s=0.2)
    assert slo.met_by(fast)
    assert not slo.met_by(slow_start)
    assert not slo.met_by(one_stall)
    assert not slo.met_by(failed)
    assert Slo().met_by(slow_start) and Slo().met_by(one_stall) and not Slo().met_by(failed)
    assert Slo(itl_p99_s=0.01).met_by(_record([0.2]))  # no gaps: the ITL bound holds


def test_summary_counts_throughput_goodput_and_failures() -> None:
    records = [
        _record([0.1, 0.2, 0.3]),
        _record([0.2, 0.3, 0.4]),
        _record([0.9, 1.0, 1.1]),
        _record([], status="RESOURCE_EXHAUSTED", num_completion_tokens=0),
        _record([], status="RESOURCE_EXHAUSTED", num_completion_tokens=0),
    ]
    summary = summarize(records, elapsed_s=2.0, slo=Slo(ttft_s=0.5))
    assert (summary["num_requests"], summary["num_ok"], summary["num_failed"]) == (5, 3, 2)
    assert summary["request_throughput_per_s"] == pytest.approx(3 / 2)
    assert summary["output_token_throughput_per_s"] == pytest.approx(9 / 2)
    assert summary["num_slo_met"] == 2
    assert summary["goodput_per_s"] == pytest.approx(2 / 2)
    assert summary["failures"] == {
        "RESOURCE_EXHAUSTED": {"count": 2, "example": "RESOURCE_EXHAUSTED details"}
    }
    assert summary["ttft_s"]["count"] == 3  # failed requests are not in the latencies
    assert summary["ttft_s"]["p50"] == pytest.approx(0.2)
    assert summary["itl_s"]["count"] == 6 and summary["itl_s"]["max"] == pytest.approx(0.1)
    assert summary["e2e_s"]["p50"] == pytest.approx(0.4)


def test_summary_splits_by_kind() -> None:
    records = [_record([0.1, 0.2]), _record([0.1, 0.2]), _record([2.0, 2.1], kind="long")]
    by_kind = summarize(records, elapsed_s=3.0, slo=Slo())["by_kind"]
    assert by_kind["main"]["num_requests"] == 2 and by_kind["long"]["num_requests"] == 1
    assert by_kind["main"]["ttft_s"]["max"] == pytest.approx(0.1)
    assert by_kind["long"]["ttft_s"]["p50"] == pytest.approx(2.0)


def test_summary_rejects_an_empty_window() -> None:
    with pytest.raises(ValueError):
        summarize([_record([0.1])], elapsed_s=0.0, slo=Slo())


def test_summary_table_shows_figures_kinds_and_failures() -> None:
    records = [
        _record([0.1, 0.2]),
        _record([0.5, 0.6], kind="long"),
        _record([], status="UNAVAILABLE", num_completion_tokens=0),
    ]
    summary = summarize(records, elapsed_s=1.0, slo=Slo(ttft_s=0.25))
    table = format_summary(summary, "closed loop, concurrency 2")
    assert "3 sent, 2 ok, 1 failed" in table
    assert "1/3 ok within SLO: TTFT <= 250 ms" in table
    ttft_main = next(line for line in table.splitlines() if line.startswith("TTFT main"))
    assert "100.0" in ttft_main
    assert any(line.startswith("E2E long") for line in table.splitlines())
    assert "UNAVAILABLE x1: UNAVAILABLE details" in table
