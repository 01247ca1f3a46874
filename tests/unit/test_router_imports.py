"""The router must never import torch (SmolLM2's tokenizer and the gRPC server need no tensors)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROUTER_MODULES = [
    "router",
    "router.tokenizer",
    "router.detokenizer",
    "router.stop_strings",
    "router.validation",
    "router.request_codec",
    "router.status",
    "router.ray_calls",
    "router.replica_pool",
    "router.text_output",
    "router.request_flow",
    "router.servicer",
    "router.server",
    "router.chat_template",
    "router.front_door",
    "router.proto_input",
    "router.wait_queue",
    "router.admission",
    "router.preemption",
    "router.refusals",
    "router.attempt",
    "router.colocated_attempt",
    "router.autoscale_loop",
    "router.http",
    "router.http.server",
    "router.http.endpoints",
    # The driver process (CLI, service bootstrap, actor shells) stays torch-free too: the
    # replicas import the engine inside their own processes.
    "pdserve.serve",
    "pdserve.pools",
    "pdserve.cli",
    "prefill_worker.actor",
    "decode_worker.actor",
]


def test_router_modules_do_not_import_torch() -> None:
    code = (
        f"import {', '.join(ROUTER_MODULES)}; import sys; "
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
