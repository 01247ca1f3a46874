"""Facts about the machine and software a benchmark ran on, for results.json."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from typing import Any

_PACKAGES = ("pdserve", "grpcio", "protobuf", "aiohttp")
# The CPU features the engine's kernels and torch's dispatch depend on.
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def machine_facts() -> dict[str, Any]:
    """Date, CPU count, platform, Python and package versions and the load average now
    (the caller adds `loadavg_end` when the run is over). Does not block."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        **_cpu_model_and_flags(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in _PACKAGES},
        "loadavg_start": list(os.getloadavg()),
    }


def _cpu_model_and_flags() -> dict[str, Any]:
    """The CPU's model name and which of `_CPU_FLAGS` it has (Linux `/proc/cpuinfo`; empty
    where that file is missing)."""
    model, flags = "", set[str]()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        return {"cpu_model": "", "cpu_flags": []}
    return {"cpu_model": model, "cpu_flags": [flag for flag in _CPU_FLAGS if flag in flags]}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
