"""Histogram bucket bounds shared by the router's and the replicas' metrics."""

from __future__ import annotations

# Request-scale latencies: TTFT, queueing, prefill, KV hand-off, whole decode.
REQUEST_SECONDS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)
# Token-scale latencies: inter-token gaps, time per output token, one decode step.
TOKEN_SECONDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
# Requests or sequences in one batched forward pass.
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Prompt tokens in one prefill pass.
BATCH_TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536)
