"""The three servers of the peers benchmark, each one an OpenAI-compatible subprocess.

Life cycle of one server: a `ServerSpec` (its command line, environment, port and readiness
URL) is built by `llama_spec`, `transformers_spec` or `pdserve_spec`; `RunningServer.start()`
launches it under `nice -n 19` in a session of its own, with stdout and stderr in a log file;
`wait_ready()` polls its readiness URL until it answers 200 (failing early if the process
exits) and then sends one short warm-up chat completion, so lazy loading, first-call kernel
builds and allocator growth are not measured; `stop()` sends SIGTERM to the server itself
(pdserve then drains and shuts its Ray instance down), waits, and only then SIGKILLs whatever
is left of the session.

Every server gets the same CPU thread count: llama.cpp `-t/-tb`; transformers the OpenMP and
torch intra-op threads; pdserve `torch_threads` split over its prefill and decode replica
(1 + 1 for 2 threads, the defaults of configs/local.yaml).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

READY_POLL_S = 0.5
STOP_GRACE_S = 90.0
WARMUP_TIMEOUT_S = 300.0
NICE = ("nice", "-n", "19")
LLAMA_ALIAS = "peers-model"
PDSERVE_EOS = "ignore_eos: true in the request body (EOS neither masked nor stopping)"


class ServerError(RuntimeError):
    """A server exited, never became ready or failed its warm-up; the message says which and
    where its log is."""


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server, how to reach it and how it is made to ignore EOS."""

    name: str
    command: tuple[str, ...]
    port: int
    eos_handling: str
    send_ignore_eos: bool = True  # False: the server rejects the field (it ignores EOS another way)
    notes: str = ""  # what a reader of the results should know about this server
    ready_path: str = "/health"
    model: str | None = None  # the `model` to request; None = the first of GET /v1/models
    env: dict[str, str] = field(default_factory=dict)
    start_timeout_s: float = 600.0

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI API root the load generator is pointed at."""
        return f"{self.root_url}/v1"


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def llama_spec(
    binary: Path, gguf: Path, threads: int, parallel: int, slot_ctx: int, port: int
) -> ServerSpec:
    """llama-server with `parallel` slots (one per concurrent request) and continuous batching.
    `-c` is the context of all slots together, so each slot gets `slot_ctx` tokens."""
    flags = f"-t {threads} -tb {threads} --host 127.0.0.1 --port {port} -c {slot_ctx * parallel}"
    flags += f" -np {parallel} --cont-batching --no-webui --alias {LLAMA_ALIAS}"
    command = (*NICE, str(binary), "-m", str(gguf), *flags.split())
    eos = "ignore_eos: true in the request body (a llama.cpp extension: EOS logits masked)"
    return ServerSpec(
        "llama.cpp", command, port, eos_handling=eos, model=LLAMA_ALIAS, notes=LLAMA_NOTES
    )


def transformers_spec(
    executable: Path, model_dir: Path, dtype: str, threads: int, port: int, batching: bool
) -> ServerSpec:
    """`transformers serve` with `model_dir` (see `eos_free_model_dir`) preloaded, on the CPU,
    in `dtype`, with continuous batching unless `batching` is False."""
    flags = f"--device cpu --dtype {dtype} --host 127.0.0.1 --port {port} --log-level warning"
    flags += " --continuous-batching" if batching else " --no-continuous-batching"
    command = (*NICE, str(executable), "serve", str(model_dir), *flags.split())
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    eos = (
        "the request field ignore_eos is rejected (HTTP 422), so it is not sent; the served "
        "folder's generation_config.json has eos_token_id -1 (EOS disabled), so every request "
        "runs to max_tokens"
    )
    return ServerSpec(
        "transformers", command, port, eos, send_ignore_eos=False, model=str(model_dir), env=env
    )


def eos_free_model_dir(hf_dir: Path, dest: Path) -> Path:
    """A copy of the HF folder for `transformers serve` (files symlinked: same weights,
    tokenizer and chat template) whose generation_config.json has `eos_token_id` -1.

    transformers serve takes a request's EOS from the model's generation config (or from a
    `generation_config` JSON field the load generator does not send), and -1 disables it."""
    dest.mkdir(parents=True, exist_ok=True)
    for source in hf_dir.iterdir():
        target = dest / source.name
        if source.name == "generation_config.json" or target.is_symlink():
            continue
        target.symlink_to(source.resolve())
    original = hf_dir / "generation_config.json"
    config = json.loads(original.read_text()) if original.is_file() else {}
    (dest / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": -1}))
    return dest


LLAMA_NOTES = (
    "this llama-server closes the connection after every streamed response despite its "
    "Keep-Alive header (its chunked content provider returns false after sink.done(), which "
    "cpp-httplib takes as a cancel); a request the client sends on that connection before it "
    "sees the close fails at once as UNAVAILABLE 'Server disconnected' (counted as failed)"
)
PDSERVE_NOTES = "threads = prefill torch_threads + decode torch_threads (1 + 1 for 2)"


def pdserve_config(
    base: Path, dtype: str, threads: int, http_port: int, colocated: bool = False
) -> dict[str, Any]:
    """configs/local.yaml with `model.dtype` (int8, w8a8: that quantization, bf16 activations), the
    thread split (disaggregated: prefill + decode replicas; colocated: one replica with every
    thread) and free ports set; every other engine setting stays at that file's values."""
    config = yaml.safe_load(base.read_text())
    quantized = dtype in ("int8", "w8a8")
    config["model"]["dtype"] = "bfloat16" if quantized else dtype
    config["model"]["quantization"] = dtype if quantized else "none"
    if colocated:
        config["mode"] = "colocated"
        config["colocated"]["replicas"] = 1
        config["colocated"]["resources"].update(torch_threads=threads, num_cpus=threads)
        used = threads
    else:
        prefill_threads = max(1, threads // 2)
        decode_threads = max(1, threads - prefill_threads)
        config["prefill"]["resources"]["torch_threads"] = prefill_threads
        config["decode"]["resources"]["torch_threads"] = decode_threads
        used = prefill_threads + decode_threads
    config["ray"]["num_cpus"] = max(config["ray"]["num_cpus"], used + 2)
    config["router"].update(port=0, http_port=http_port)
    config["metrics"]["router_port"] = 0
    return config


def pdserve_spec(
    executable: Path, config_path: Path, port: int, name: str = "pdserve"
) -> ServerSpec:
    """`pdserve serve` on a config written by `pdserve_config` (its HTTP port is `port`)."""
    command = (*NICE, str(executable), "serve", "--config", str(config_path))
    notes = PDSERVE_NOTES if name == "pdserve" else "one colocated replica with every thread"
    return ServerSpec(name, command, port, eos_handling=PDSERVE_EOS, notes=notes)


class RunningServer:
    """One started server process (and its session's children). Not thread-safe."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None
        self._started_at = 0.0

    def start(self) -> None:
        """Launches the command; returns at once. Raises OSError if it cannot be executed."""
        env = {**os.environ, **self.spec.env}
        env.pop("RAY_ADDRESS", None)  # pdserve must start its own local Ray instance
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                self.spec.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._started_at = time.monotonic()

    def wait_ready(self) -> float:
        """Polls the readiness URL, then warms up; returns the seconds from start to ready.
        Raises ServerError when the process exits or the deadline passes first."""
        deadline = self._started_at + self.spec.start_timeout_s
        url = self.spec.root_url + self.spec.ready_path
        while not _answers_ok(url):
            self._check_alive()
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{self.spec.name}: {url} not ready after "
                    f"{self.spec.start_timeout_s:.0f} s (log: {self.log_path})"
                )
            time.sleep(READY_POLL_S)
        self.ready_s = time.monotonic() - self._started_at
        self._warm_up()
        return self.ready_s

    def stop(self) -> None:
        """SIGTERM to the server, up to STOP_GRACE_S for it to exit, then SIGKILL to its whole
        session (helpers it left behind included). Safe to call twice."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=STOP_GRACE_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its own session: pgid == pid
        process.wait()

    def __enter__(self) -> RunningServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _check_alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            raise ServerError(
                f"{self.spec.name} exited with {self._process.returncode} before "
                f"it was ready; last log lines:\n{self.log_tail()}"
            )

    def _warm_up(self) -> None:
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "temperature": 0.0,
        }
        if self.spec.model is not None:
            body["model"] = self.spec.model
        else:
            body["model"] = _first_model(self.spec.base_url)
        request = urllib.request.Request(
            self.spec.base_url + "/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=WARMUP_TIMEOUT_S) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            raise ServerError(
                f"{self.spec.name}: warm-up request failed: {exc} (log: {self.log_path})"
            ) from None

    def log_tail(self, num_lines: int = 20) -> str:
        """The last lines of the server's log."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-num_lines:])


def _answers_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _first_model(base_url: str) -> str:
    with urllib.request.urlopen(base_url + "/models", timeout=30) as response:
        return str(json.load(response)["data"][0]["id"])
