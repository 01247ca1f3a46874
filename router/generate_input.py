"""One generation request in pdserve's own terms, as both public APIs hand it to validation.

The gRPC servicer (`router.proto_input`) and the OpenAI HTTP adapter (`router.http`) each turn
their wire format into a `GenerateInput`, applying their own defaults (gRPC: greedy unless a
temperature is set; OpenAI: temperature 1); `router.validation` then checks it once for both.
Field names in validation errors are the gRPC ones (`sampling.max_tokens`); the HTTP layer
renames them to its parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Roles a chat turn may have; "developer" (OpenAI's newer name for system) is read as system.
CHAT_ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}


@dataclass(frozen=True)
class ChatTurn:
    """One message of a conversation."""

    role: str
    content: str
    # The participant's name, passed to the chat template when set.
    name: str | None = None


@dataclass(frozen=True)
class GenerateInput:
    """Exactly one of `text`, `token_ids` and `messages` must be set (checked by validation).
    A gRPC request never sets two: its `prompt` oneof keeps the last of them on the wire."""

    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[ChatTurn] | None = None
    # Extra chat template variables (JSON-like values), with `messages` only.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # None: as many as fit the context, at most `limits.max_tokens`.
    max_tokens: int | None = None
    temperature: float = 0.0
    # 1 = no nucleus filter.
    top_p: float = 1.0
    # 0 = no top-k filter.
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: bool = False
    top_logprobs: int = 0
    # Independent sequences sampled for the same prompt (OpenAI's `n`).
    num_choices: int = 1
    # Scheduling priority, lower served first (gRPC `priority`; the OpenAI API's `priority`
    # extension, as in vLLM).
    priority: int = 0

    @property
    def num_prompt_chars(self) -> int:
        """Characters of the prompt as sent: the text, or the messages' contents and names (0
        for token ids). Rendering and tokenizing it costs CPU time in proportion."""
        if self.messages is not None:
            return sum(len(turn.content) + len(turn.name or "") for turn in self.messages)
        return len(self.text or "")

    @property
    def prompt_form(self) -> str | None:
        """"text", "token_ids" or "messages" when exactly one is set, else None."""
        forms = [
            name for name, value in (
                ("text", self.text), ("token_ids", self.token_ids), ("messages", self.messages)
            )
            if value is not None
        ]
        return forms[0] if len(forms) == 1 else None
