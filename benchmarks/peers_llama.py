"""llama.cpp for the peers benchmark: a cached `llama-server` build and GGUF copies of the weights.

Everything lives in one cache folder per llama-cpp-python version,
`~/.cache/pdserve/peers/llama.cpp-<version>/`:

    src/                 llama.cpp as vendored by the llama-cpp-python sdist
    build/bin/llama-server
    build.json           how long the one build took (kept so later runs can report it)
    <folder>-<type>.gguf an HF folder (by its name) converted by the vendored
                         convert_hf_to_gguf.py

Each step is skipped when its output already exists, so only the first run pays for the
compile (minutes) and the conversions (seconds). Compiles and conversions run under `nice`,
since the benchmark machine is shared.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VERSION = "0.3.36"
SDIST_SEARCH = (Path("/tmp/llsrc"),)
# pdserve precision -> the converter's outtype (int8: llama.cpp's Q8_0, 8-bit weights in
# blocks of 32 with one scale each).
GGUF_OUTTYPES = {
    "float32": "f32", "bfloat16": "bf16", "float16": "f16", "int8": "q8_0", "w8a8": "q8_0",
}
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # it would download the web UI from Hugging Face
)


class LlamaSetupError(RuntimeError):
    """The sdist could not be found, built or converted; the message says which step."""


@dataclass(frozen=True)
class LlamaCache:
    """Paths inside one version's cache folder."""

    version: str
    root: Path

    @classmethod
    def for_version(cls, version: str = DEFAULT_VERSION, base: Path | None = None) -> LlamaCache:
        base = base or Path.home() / ".cache" / "pdserve" / "peers"
        return cls(version=version, root=base / f"llama.cpp-{version}")

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def build_dir(self) -> Path:
        return self.root / "build"

    @property
    def server_bin(self) -> Path:
        return self.build_dir / "bin" / "llama-server"

    @property
    def build_record(self) -> Path:
        return self.root / "build.json"

    def gguf(self, hf_dir: Path, dtype: str) -> Path:
        """The GGUF of the HF folder `hf_dir` in `dtype` (named after the folder)."""
        return self.root / f"{hf_dir.name}-{GGUF_OUTTYPES[dtype]}.gguf"


def find_sdist(version: str, download_dir: Path) -> Path:
    """The llama-cpp-python sdist: a known folder, else `pip download` into `download_dir`."""
    name = f"llama_cpp_python-{version}.tar.gz"
    for folder in (*SDIST_SEARCH, download_dir):
        if (folder / name).is_file():
            return folder / name
    download_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--dest",
        str(download_dir),
        f"llama-cpp-python=={version}",
    ]
    _run(command, "pip download of the llama-cpp-python sdist")
    if not (download_dir / name).is_file():
        raise LlamaSetupError(f"pip download did not produce {download_dir / name}")
    return download_dir / name


def extract_vendored(sdist: Path, dest: Path) -> Path:
    """Unpack only `vendor/llama.cpp` of the sdist into `dest` (replaced if half-written)."""
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    staging = Path(tempfile.mkdtemp(prefix="llama-src-", dir=dest.parent))
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise LlamaSetupError(f"{sdist} has no {prefix}")
        archive.extractall(staging, members=members, filter="data")
    shutil.rmtree(dest, ignore_errors=True)
    (staging / prefix).rename(dest)
    shutil.rmtree(staging)
    return dest


def build_server(cache: LlamaCache, jobs: int = 2) -> float:
    """Configure and build only the `llama-server` target; returns the wall seconds it took."""
    started = time.perf_counter()
    configure = [
        "nice",
        "-n",
        "19",
        "cmake",
        "-S",
        str(cache.src),
        "-B",
        str(cache.build_dir),
        *CMAKE_OPTIONS,
    ]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    _run(configure, "cmake configure")
    _run(
        [
            "nice",
            "-n",
            "19",
            "cmake",
            "--build",
            str(cache.build_dir),
            "--target",
            "llama-server",
            "-j",
            str(jobs),
        ],
        "cmake build of llama-server",
    )
    if not cache.server_bin.is_file():
        raise LlamaSetupError(f"the build finished without {cache.server_bin}")
    return time.perf_counter() - started


def ensure_server(cache: LlamaCache, jobs: int = 2) -> dict[str, object]:
    """The cached `llama-server` (built on first use) and the record of its build."""
    if not cache.server_bin.is_file():
        cache.root.mkdir(parents=True, exist_ok=True)
        sdist = find_sdist(cache.version, cache.root)
        if not (cache.src / "CMakeLists.txt").is_file():
            extract_vendored(sdist, cache.src)
        seconds = build_server(cache, jobs)
        record = {
            "build_seconds": round(seconds, 1),
            "jobs": jobs,
            "cmake_options": list(CMAKE_OPTIONS),
            "llama_cpp_commit": vendored_commit(sdist),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        cache.build_record.write_text(json.dumps(record, indent=2) + "\n")
    record = json.loads(cache.build_record.read_text()) if cache.build_record.is_file() else {}
    return {
        "binary": str(cache.server_bin),
        "version": server_version(cache.server_bin),
        "sdist_version": cache.version,
        **record,
    }


def vendored_commit(sdist: Path) -> str | None:
    """The llama.cpp commit the sdist vendors (its git submodule HEAD), when the sdist says."""
    member = f"{sdist.name.removesuffix('.tar.gz')}/.git/modules/vendor/llama.cpp/HEAD"
    with tarfile.open(sdist) as archive:
        try:
            head = archive.extractfile(member)
        except KeyError:
            return None
        return head.read().decode().strip() if head is not None else None


def server_version(binary: Path) -> str:
    """The first line `llama-server --version` prints (e.g. `version: 1 (abc123)`)."""
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "version" in line]
    return lines[0].strip() if lines else "unknown"


def ensure_gguf(cache: LlamaCache, hf_dir: Path, dtype: str) -> Path:
    """The HF folder converted to a GGUF of `dtype` with the vendored converter (cached)."""
    if dtype not in GGUF_OUTTYPES:
        raise LlamaSetupError(f"no GGUF outtype for dtype {dtype!r}; valid: {list(GGUF_OUTTYPES)}")
    out = cache.gguf(hf_dir, dtype)
    if out.is_file():
        return out
    partial = out.with_suffix(".partial")
    command = [
        "nice",
        "-n",
        "19",
        sys.executable,
        str(cache.src / "convert_hf_to_gguf.py"),
        str(hf_dir),
        "--outtype",
        GGUF_OUTTYPES[dtype],
        "--outfile",
        str(partial),
    ]
    _run(command, f"convert_hf_to_gguf.py --outtype {GGUF_OUTTYPES[dtype]}")
    partial.rename(out)
    return out


def _run(command: list[str], what: str) -> None:
    """Run a setup step, its output passed through; a failure names the step."""
    print(f"[peers] {what}: {' '.join(command)}", file=sys.stderr, flush=True)
    if subprocess.run(command).returncode != 0:
        raise LlamaSetupError(f"{what} failed (command: {' '.join(command)})")
