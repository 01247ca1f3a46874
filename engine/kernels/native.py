"""Builds, loads and describes pdserve's C++ kernels (`panel_gemm.cpp`: matrix
products; `vnni_gemm.cpp`: int8 x int8 products; `decode_attention.cpp`: attention over the
paged cache; `layer_ops.cpp`: norms, rotary embedding, SiLU; `decode_stack.cpp`: a decode-only
pass through every layer in one call; `bindings.cpp`).

The source is compiled with `torch.utils.cpp_extension` on first use into
`~/.cache/pdserve/kernels/<torch version>-<source digest>` (`PDSERVE_KERNEL_CACHE` overrides
the root), once per machine: later replicas load the built module (the build directory's lock
serializes concurrent first builds). The kernels need AVX-512 (fp32) and AVX512-BF16 (bf16),
and `model.quantization: w8a8` AVX512-VNNI, checked at run time on the CPU the replica runs on.

`model.kernels` chooses: `auto` uses them where they build and the CPU has the features, else
torch's own kernels with a WARNING that says why; `native` refuses to start without them;
`torch` never builds them. Either way `KernelStatus.describe()` says what serves the model's
matrix products, in the replica's `Info` entry and its `pdserve_replica_native_kernels` gauge:
the fallback is never silent.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from pdserve.errors import ConfigError

logger = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in (
        "bindings.cpp", "panel_gemm.cpp", "vnni_gemm.cpp", "decode_attention.cpp",
        "layer_ops.cpp", "decode_stack.cpp", "kernels.h", "panel_common.h",
    )
)
# What each dtype's kernel needs of the CPU (names as `supported_features` reports them).
REQUIRED_FEATURES = {"float32": "avx512", "bfloat16": "avx512bf16"}
# OpenMP: torch's own runtime (same soname, already loaded) runs the kernels' parallel loops.
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)
# A build lock older than this was left by a builder that died (a build takes about a minute).
STALE_LOCK_S = 600.0


@dataclass(frozen=True)
class KernelStatus:
    """Whether the native kernels serve a model of one dtype, and why not."""

    dtype: str
    # The built module when it serves this dtype; None = torch's kernels.
    module: ModuleType | None
    # The CPU features the module found ("" when it was not loaded).
    features: str = ""
    # Why torch's kernels serve ("" when the native ones do).
    reason: str = ""

    @property
    def native(self) -> bool:
        return self.module is not None

    def describe(self) -> str:
        """One line for `Info` and logs, e.g. `native (avx512,avx512bf16; bfloat16)`."""
        if self.module is not None:
            return f"native ({self.features}; {self.dtype})"
        return f"torch ({self.reason})"


def kernel_status(mode: str, dtype: str) -> KernelStatus:
    """The kernels a replica serving `dtype` uses under `model.kernels: mode`. Builds on first
    use. Raises ConfigError when `mode` is `native` and they cannot serve; logs a WARNING when
    `auto` falls back to torch."""
    if mode == "torch":
        return KernelStatus(dtype, None, reason="model.kernels is torch")
    try:
        module = _load_module()
    except Exception as exc:  # noqa: BLE001 - any build or load failure means torch's kernels
        status = KernelStatus(dtype, None, reason=f"the build failed: {_first_line(exc)}")
    else:
        status = _status_of(module, dtype)
    if status.native:
        logger.info("matrix products and layer operations: %s", status.describe())
    elif mode == "native":
        raise ConfigError(f"model.kernels is native, but {status.reason}")
    else:
        logger.warning(
            "native kernels NOT in use, the model runs on torch's kernels: %s", status.reason
        )
    return status


def _status_of(module: ModuleType, dtype: str) -> KernelStatus:
    features = str(module.supported_features())
    needed = REQUIRED_FEATURES.get(dtype)
    if needed is None:
        return KernelStatus(dtype, None, features, f"no native kernel for {dtype}")
    if needed not in features.split(","):
        has = features or "none"
        return KernelStatus(dtype, None, features, f"this CPU lacks {needed} (has: {has})")
    return KernelStatus(dtype, module, features)


_loaded: ModuleType | None = None


def _load_module() -> ModuleType:
    """The built extension, compiled on first use (once per process)."""
    global _loaded
    if _loaded is None:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        recipe = b"".join(path.read_bytes() for path in SOURCES) + repr((CFLAGS, LDFLAGS)).encode()
        digest = hashlib.sha256(recipe).hexdigest()[:16]
        name = f"pdserve_kernels_{digest}"
        build_dir = _cache_root() / f"{torch.__version__}-{digest}"
        build_dir.mkdir(parents=True, exist_ok=True)
        _drop_stale_lock(build_dir)
        logger.info("loading native kernels from %s (built on first use)", build_dir)
        _loaded = cpp_extension.load(
            name=name, sources=[str(path) for path in SOURCES if path.suffix == ".cpp"],
            build_directory=str(build_dir),
            extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), verbose=False,
        )
    return _loaded


def _drop_stale_lock(build_dir: Path) -> None:
    """torch's build lock is a file that a killed builder leaves behind, and every later build
    would wait for it forever; a build takes about a minute, so one older than
    `STALE_LOCK_S` is dropped (logged)."""
    lock = build_dir / "lock"
    try:
        age_s = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age_s > STALE_LOCK_S:
        logger.warning("dropping a build lock left %.0f s ago in %s", age_s, build_dir)
        lock.unlink(missing_ok=True)


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the `ninja` wheel's copy serves where the system has none."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def _cache_root() -> Path:
    root = os.environ.get("PDSERVE_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "pdserve" / "kernels"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
