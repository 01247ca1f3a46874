"""The committed gRPC stubs are exactly what `make proto` generates from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ["pdserve/v1/pdserve.proto", "pdserve/internal/v1/kv_transfer.proto"]


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
            *(str(ROOT / "proto" / p) for p in PROTOS),
        ],
        check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc generated nothing"
    for relative in generated:
        committed = ROOT / relative
        assert committed.read_text() == (tmp_path / relative).read_text(), (
            f"{relative} is stale: run `make proto`"
        )
