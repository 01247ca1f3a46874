"""Prometheus metrics of the router and of each replica (torch-free).

Each process owns its metrics object (never the global default registry, so several services
in one test process do not collide): the router a `RouterMetrics`, each replica a
`ReplicaMetrics`. Code that records calls small methods on the object it was handed; `serve()`
exposes the object's registry at `http://host:port/metrics` (config section `metrics`).
"""

from __future__ import annotations

from pdserve.metrics.endpoint import MetricsEndpoint
from pdserve.metrics.replica_metrics import ReplicaMetrics
from pdserve.metrics.router_metrics import RouterMetrics
from pdserve.metrics.stream_timer import StreamTimer

__all__ = ["MetricsEndpoint", "ReplicaMetrics", "RouterMetrics", "StreamTimer"]
