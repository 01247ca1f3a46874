"""Facts about the machine and software a benchmark ran on, for results.json."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from typing import Any

_PACKAGES = ("pdserve", "grpcio", "protobuf", "aiohttp")


def machine_facts() -> dict[str, Any]:
    """Date, CPU count, platform, Python and package versions and the load average now
    (the caller adds `loadavg_end` when the run is over). Does not block."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in _PACKAGES},
        "loadavg_start": list(os.getloadavg()),
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
