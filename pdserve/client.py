"""A small synchronous client of the public `pdserve.v1.Generation` and `pdserve.v1.Admin`
gRPC services.

A prompt is text (str), token ids (a sequence of ints) or a conversation (a sequence of
`{"role": ..., "content": ...}` mappings, optionally with "name"), which the server renders with
the model's chat template. Used by the `pdserve` CLI, the demo and tests. gRPC failures surface
as `grpc.RpcError` with the server's status code and details; this module adds no error types
of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import grpc

from pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc

# A CA bundle is a few KiB; a bigger file is a wrong path, refused before it is read whole.
MAX_CA_FILE_BYTES = 1024 * 1024
CHAT_MESSAGE_KEYS = frozenset({"role", "content", "name"})

ChatPrompt = Sequence[Mapping[str, str]]
Prompt = str | Sequence[int] | ChatPrompt


def make_request(
    prompt: Prompt,
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    min_tokens: int = 0,
    logprobs: bool = False,
    top_logprobs: int = 0,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    priority: int = 0,
) -> pdserve_pb2.GenerateRequest:
    """Builds a GenerateRequest: a str prompt is sent as text, a sequence of ints (or an empty
    one) as token ids, a sequence of mappings as chat messages.

    `chat_template_kwargs` (JSON-like values) go with a conversation only. `priority` orders
    the request in the router's queue (lower first; ties by arrival) and, reversed, which
    sequences a full decode replica preempts. The server validates the values (`top_logprobs`
    counts only with `logprobs`). Raises ValueError for a malformed conversation or
    `chat_template_kwargs` without one, TypeError for a value of a wrong type.
    """
    sampling = pdserve_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
        min_tokens=min_tokens,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    if seed is not None:
        sampling.seed = seed
    request = pdserve_pb2.GenerateRequest(sampling=sampling, priority=priority)
    if isinstance(prompt, str):
        request.text = prompt
    elif _is_token_ids(prompt):
        request.token_ids.SetInParent()  # selects the variant even for an empty list
        request.token_ids.ids.extend(prompt)
    else:
        request.messages.CopyFrom(_chat_messages(prompt, chat_template_kwargs))
    if chat_template_kwargs is not None and not request.HasField("messages"):
        raise ValueError("chat_template_kwargs: only a conversation prompt has a chat template")
    return request


def _is_token_ids(prompt: Sequence[int] | ChatPrompt) -> TypeGuard[Sequence[int]]:
    # An empty sequence stays token ids, as before conversations existed: the server rejects it
    # naming `prompt.token_ids`.
    return not any(isinstance(item, Mapping) for item in prompt)


def _chat_messages(
    conversation: Sequence[object], chat_template_kwargs: Mapping[str, Any] | None
) -> pdserve_pb2.ChatMessages:
    messages = pdserve_pb2.ChatMessages()
    for index, turn in enumerate(conversation):
        if not isinstance(turn, Mapping) or not {"role", "content"} <= turn.keys():
            raise ValueError(f"prompt[{index}]: a chat message is a mapping with role and content")
        # The proto has no field for anything else: refuse it rather than drop it silently.
        unknown = sorted(set(turn.keys()) - CHAT_MESSAGE_KEYS)
        if unknown:
            raise ValueError(f"prompt[{index}]: unknown chat message keys {unknown}")
        messages.messages.add(role=turn["role"], content=turn["content"], name=turn.get("name"))
    if chat_template_kwargs is not None:
        messages.chat_template_kwargs.update(dict(chat_template_kwargs))
    return messages


class GenerationClient:
    """One channel to a pdserve router at `address` ("host:port").

    `timeout_s` is the deadline of every call (None: no client deadline, the server's default
    applies). `token` is sent as `authorization: Bearer <token>` metadata on every call (None:
    no token, for a service without `security.api_tokens_file`). `tls_ca_file` is a PEM file of
    the CA (or self-signed certificate) that signed the server's certificate: given, the
    channel uses TLS and checks the server against it and `address`'s host; None: plaintext.
    Raises OSError if `tls_ca_file` cannot be read. Not thread-safe to close while calls run;
    otherwise calls may run concurrently.
    """

    def __init__(
        self,
        address: str,
        timeout_s: float | None = None,
        token: str | None = None,
        tls_ca_file: str | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        self._channel = _open_channel(address, tls_ca_file)
        self._stub = pdserve_pb2_grpc.GenerationStub(self._channel)
        self._admin = pdserve_pb2_grpc.AdminStub(self._channel)

    def generate(
        self,
        prompt: Prompt,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        min_tokens: int = 0,
        logprobs: bool = False,
        top_logprobs: int = 0,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        priority: int = 0,
    ) -> Generator[pdserve_pb2.GenerateResponse, None, None]:
        """Streams the responses of one Generate call (arguments as in `make_request`, which
        raises before any call is made).

        The call starts on the first `next()` and is cancelled if the iterator is closed or
        dropped before the stream ends. Iterating raises `grpc.RpcError` on a failed call.
        """
        request = make_request(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            min_tokens=min_tokens,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            chat_template_kwargs=chat_template_kwargs,
            priority=priority,
        )
        return self._stream(request)

    def _stream(
        self, request: pdserve_pb2.GenerateRequest
    ) -> Generator[pdserve_pb2.GenerateResponse, None, None]:
        call = self._stub.Generate(request, timeout=self.timeout_s, metadata=self._metadata)
        try:
            yield from call
        finally:
            call.cancel()

    def info(self) -> pdserve_pb2.InfoResponse:
        """Describes the service (blocks; raises `grpc.RpcError`)."""
        return self._stub.Info(
            pdserve_pb2.InfoRequest(), timeout=self.timeout_s, metadata=self._metadata
        )

    def scale(self, target_replicas: Mapping[str, int]) -> pdserve_pb2.ScaleResponse:
        """Sets new pool sizes ({"prefill": 2, "decode": 3}); returns once the service accepted
        them, before replicas started or drained (follow with `info()`). Blocks; raises
        `grpc.RpcError` (INVALID_ARGUMENT names the bad pool or size)."""
        return self._admin.Scale(
            pdserve_pb2.ScaleRequest(target_replicas=dict(target_replicas)),
            timeout=self.timeout_s, metadata=self._metadata,
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _open_channel(address: str, tls_ca_file: str | None) -> grpc.Channel:
    if tls_ca_file is None:
        return grpc.insecure_channel(address)
    with open(tls_ca_file, "rb") as file:
        root_certificates = file.read(MAX_CA_FILE_BYTES + 1)
    if len(root_certificates) > MAX_CA_FILE_BYTES:
        raise OSError(f"{tls_ca_file}: larger than {MAX_CA_FILE_BYTES} bytes")
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return grpc.secure_channel(address, credentials)


@dataclass
class GenerationResult:
    """One finished Generate stream, with what the client measured."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    # One entry per token id, when the request asked for logprobs.
    logprobs: list[pdserve_pb2.TokenLogprobs] = field(default_factory=list)
    # The final message's summary; None if the stream ended without one (a server bug).
    final: pdserve_pb2.FinalInfo | None = None
    # From the call's start until the first message carrying a token.
    ttft_s: float = 0.0
    # From the call's start until the stream ended.
    total_s: float = 0.0
    # Time between the first and the last token-carrying message.
    decode_s: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        """Streaming rate after the first token (0 when fewer than two tokens arrived)."""
        if self.num_tokens < 2 or self.decode_s <= 0:
            return 0.0
        return (self.num_tokens - 1) / self.decode_s

    def summary(self) -> str:
        """One line: finish reason, token counts, timings and which path served it."""
        parts = [f"ttft={self.ttft_s:.3f}s", f"tokens/s={self.tokens_per_s:.1f}"]
        final = self.final
        if final is None:
            return " ".join(["finish=NONE (stream ended without a final message)", *parts])
        reason = pdserve_pb2.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_")
        served = final.served_by
        usage = final.usage
        cached = usage.cached_prompt_tokens
        return " ".join(
            [
                f"finish={reason}",
                f"prompt_tokens={usage.prompt_tokens}",
                *([f"cached_prompt_tokens={cached}"] if cached else []),
                f"completion_tokens={usage.completion_tokens}",
                *parts,
                f"mode={served.mode}",
                f"transport={served.kv_transport}",
                f"replicas={served.prefill_replica}->{served.decode_replica}",
                f"kv_bytes={served.kv_bytes}",
                f"request_id={final.request_id}",
            ]
        )


def collect(
    stream: Iterable[pdserve_pb2.GenerateResponse],
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Drains a Generate stream into a GenerationResult, timing it from the first `next()`.

    `on_text` is called with each non-empty text piece as it arrives (for live printing).
    Raises `grpc.RpcError` if the call fails.
    """
    result = GenerationResult()
    start = time.perf_counter()
    first_token_at = last_token_at = start
    for response in stream:
        now = time.perf_counter()
        if response.token_ids:
            if not result.token_ids:
                first_token_at = now
            last_token_at = now
            result.token_ids.extend(response.token_ids)
        result.logprobs.extend(response.logprobs)
        if response.text:
            result.text += response.text
            if on_text is not None:
                on_text(response.text)
        if response.HasField("final"):
            result.final = response.final
    result.total_s = time.perf_counter() - start
    result.ttft_s = first_token_at - start if result.token_ids else 0.0
    result.decode_s = last_token_at - first_token_at
    return result
