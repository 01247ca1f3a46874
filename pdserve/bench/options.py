"""Everything one `pdserve bench serve` run is told: target, arrivals, workload, bounds, output.

Built from the command line by `pdserve.bench.arguments.options_from_args` (or directly by a
caller); read by the runner and the report. The token and the API key are kept out of `repr`
and out of `results.json`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pdserve.bench.lengths import LengthDistribution
from pdserve.errors import InvalidArgument

DEFAULT_NUM_REQUESTS = 100  # when neither --num-requests nor --duration bounds the run
GRPC = "grpc"  # pdserve.v1.Generation/Generate on the router (`address`)
OPENAI_CHAT = "openai-chat"  # POST {base_url}/chat/completions
OPENAI_COMPLETIONS = "openai-completions"  # POST {base_url}/completions
BACKENDS = (GRPC, OPENAI_CHAT, OPENAI_COMPLETIONS)


@dataclass(frozen=True)
class BenchOptions:
    """One benchmark run. Exactly one of `rate_per_s` (open-loop Poisson; may be inf) and
    `concurrency` (closed loop) is set. The run stops dispatching at `num_requests` main
    requests or after `duration_s`, whichever comes first, then waits for what is in flight.
    `long_every_s` set turns on the mix: one extra request of `long_prompt_len` prompt tokens
    every `long_every_s` seconds from `long_start_s`, while the main process dispatches.
    `backend` picks the protocol: gRPC to `address`, or an OpenAI-compatible HTTP API at
    `base_url` (see `pdserve.bench.openai_client`). Raises InvalidArgument (naming the flag)
    for an inconsistent combination."""

    address: str = ""
    rate_per_s: float | None = None
    concurrency: int | None = None
    prompt_len: LengthDistribution = LengthDistribution.parse("uniform:32:256")
    output_len: LengthDistribution = LengthDistribution.parse("fixed:32")
    sharegpt_file: str | None = None
    sharegpt_max_output_tokens: int = 1024
    vocab_low: int = 1000
    vocab_high: int = 20000
    long_every_s: float | None = None
    long_start_s: float | None = None
    long_prompt_len: int = 1024
    long_output_len: LengthDistribution | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    seed: int = 0
    slo_ttft_s: float | None = None
    slo_itl_p99_s: float | None = None
    timeout_s: float | None = None
    out_dir: str | None = None
    progress: bool = True
    token: str | None = field(default=None, repr=False)
    tls_ca_file: str | None = None
    backend: str = GRPC
    base_url: str | None = None
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    send_ignore_eos: bool = True
    tokenizer: str | None = None
    # openai-*: reuse connections across requests (False: one connection per request).
    keep_alive: bool = True

    def __post_init__(self) -> None:
        if (self.rate_per_s is None) == (self.concurrency is None):
            raise InvalidArgument("--rate", "give exactly one of --rate and --concurrency")
        if self.rate_per_s is not None and not self.rate_per_s > 0:
            raise InvalidArgument("--rate", f"must be > 0, got {self.rate_per_s}")
        if self.concurrency is not None and self.concurrency < 1:
            raise InvalidArgument("--concurrency", f"must be >= 1, got {self.concurrency}")
        if self.num_requests is not None and self.num_requests < 1:
            raise InvalidArgument("--num-requests", f"must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and not 0 < self.duration_s < math.inf:
            raise InvalidArgument("--duration", f"must be > 0 and finite, got {self.duration_s}")
        if not 0 <= self.vocab_low < self.vocab_high:
            raise InvalidArgument(
                "--vocab-low", f"need 0 <= low < high, got {self.vocab_low}..{self.vocab_high}"
            )
        if self.long_every_s is not None and not 0 < self.long_every_s < math.inf:
            raise InvalidArgument("--long-every", f"must be > 0, got {self.long_every_s}")
        if self.long_start_s is not None and not 0 <= self.long_start_s < math.inf:
            raise InvalidArgument("--long-start", f"must be >= 0, got {self.long_start_s}")
        if self.long_prompt_len < 1:
            raise InvalidArgument("--long-prompt-len", f"must be >= 1, got {self.long_prompt_len}")
        self._check_target()

    def _check_target(self) -> None:
        if self.backend not in BACKENDS:
            raise InvalidArgument("--backend", f"{self.backend!r} is not one of {BACKENDS}")
        if self.backend == GRPC:
            if not self.address:
                raise InvalidArgument("--address", "the grpc backend needs the router's host:port")
            openai_only = (
                ("--base-url", self.base_url),
                ("--model", self.model),
                ("--api-key", self.api_key),
                ("--tokenizer", self.tokenizer),
            )
            for flag, value in openai_only:
                if value is not None:
                    raise InvalidArgument(flag, "is for the openai-* backends, not grpc")
            if not self.send_ignore_eos:
                raise InvalidArgument("--no-ignore-eos-param", "is for the openai-* backends")
            if not self.keep_alive:
                raise InvalidArgument("--no-keep-alive", "is for the openai-* backends")
            return
        if not self.base_url or not self.base_url.startswith(("http://", "https://")):
            raise InvalidArgument(
                "--base-url", f"{self.backend} needs an http(s) URL such as http://host:8000/v1"
            )
        if self.backend != OPENAI_CHAT and self.tokenizer is not None:
            raise InvalidArgument("--tokenizer", "is for openai-chat (completions take token ids)")
        if self.backend == OPENAI_CHAT and self.tokenizer is None and self.has_token_prompts:
            raise InvalidArgument(
                "--tokenizer",
                "openai-chat sends text, and the synthetic and --mix prompts are token ids: "
                "pass --tokenizer (tokenizer.json or a Hugging Face folder) to decode them, "
                "or use --sharegpt without --mix, or --backend openai-completions",
            )

    @property
    def has_token_prompts(self) -> bool:
        """Whether some prompts are token ids (synthetic main or the mix's long prompts)."""
        return self.sharegpt_file is None or self.mix

    @property
    def bearer_token(self) -> str | None:
        """What goes in `Authorization: Bearer`: the API key, else the pdserve token."""
        return self.api_key if self.api_key is not None else self.token

    @property
    def target_url(self) -> str:
        """Where the requests go: the base URL (openai-*) or the router address (grpc)."""
        return self.base_url if self.base_url is not None else self.address

    @property
    def mix(self) -> bool:
        return self.long_every_s is not None

    @property
    def max_main_requests(self) -> int | None:
        """The request bound in force: the given one, else DEFAULT_NUM_REQUESTS when no
        duration bounds the run either, else None (the duration alone bounds it)."""
        if self.num_requests is None and self.duration_s is None:
            return DEFAULT_NUM_REQUESTS
        return self.num_requests

    @property
    def first_long_s(self) -> float:
        """When the first long prompt goes: `long_start_s`, by default one period in."""
        if self.long_start_s is not None:
            return self.long_start_s
        return self.long_every_s if self.long_every_s is not None else 0.0

    @property
    def long_output(self) -> LengthDistribution:
        return self.long_output_len if self.long_output_len is not None else self.output_len

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options for results.json; the token is replaced by whether one was set."""
        values: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, LengthDistribution):
                value = value.spec
            elif isinstance(value, float) and math.isinf(value):
                value = "inf"  # JSON has no infinity
            values[name] = value
        values["token"] = "<set>" if self.token is not None else None
        values["api_key"] = "<set>" if self.api_key is not None else None
        values["max_main_requests"] = self.max_main_requests
        return values
