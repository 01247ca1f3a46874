"""ShareGPT-format conversation files as a source of real prompts and output lengths.

The format is a JSON list of `{"conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}, ...]}`. The first human turn is the prompt; the gpt turn that
answers it sets the output length, estimated as words x 1.3 (the server's tokenizer is not
available to the client). Entries without such a pair, or with non-text values, are skipped
and counted.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from pdserve.errors import InvalidArgument

# The public ShareGPT_V3 file is ~650 MB; a bigger file is probably not what was meant.
MAX_SHAREGPT_BYTES = 2 * 1024**3
TOKENS_PER_WORD = 1.3


@dataclass(frozen=True)
class Conversation:
    """One usable ShareGPT entry: the prompt text and the estimated reply length in tokens."""

    prompt: str
    num_prompt_tokens_estimate: int
    num_output_tokens_estimate: int


def estimate_tokens(text: str) -> int:
    """Token count estimated from whitespace-separated words (at least 1)."""
    return max(1, math.ceil(len(text.split()) * TOKENS_PER_WORD))


def load_sharegpt(path: str) -> tuple[list[Conversation], int]:
    """Reads and parses a ShareGPT file; returns (usable conversations, number skipped).

    Blocks on file I/O. Raises InvalidArgument("--sharegpt", ...) when the file cannot be read,
    is larger than MAX_SHAREGPT_BYTES, is not JSON, is not a list, or holds no usable entry.
    """
    try:
        num_bytes = os.path.getsize(path)
        if num_bytes > MAX_SHAREGPT_BYTES:
            raise InvalidArgument(
                "--sharegpt", f"{path} is {num_bytes} bytes, more than {MAX_SHAREGPT_BYTES}"
            )
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except OSError as exc:
        raise InvalidArgument("--sharegpt", f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument("--sharegpt", f"{path} is not UTF-8 JSON: {exc}") from None
    conversations, num_skipped = parse_sharegpt(data)
    if not conversations:
        raise InvalidArgument(
            "--sharegpt", f"{path} has no entry with a human turn answered by a gpt turn"
        )
    return conversations, num_skipped


def parse_sharegpt(data: object) -> tuple[list[Conversation], int]:
    """Usable conversations of already-decoded JSON, and how many entries were skipped.

    Raises InvalidArgument when `data` is not a list.
    """
    if not isinstance(data, list):
        raise InvalidArgument("--sharegpt", f"expected a JSON list, got {type(data).__name__}")
    conversations = []
    for entry in data:
        conversation = _parse_entry(entry)
        if conversation is not None:
            conversations.append(conversation)
    return conversations, len(data) - len(conversations)


def _parse_entry(entry: object) -> Conversation | None:
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list):
        return None
    prompt = None
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return None
        speaker = turn.get("from")
        if prompt is None and speaker == "human" and turn["value"].strip():
            prompt = turn["value"]
        elif prompt is not None and speaker == "gpt":
            reply = turn["value"]
            if not reply.strip():
                return None
            return Conversation(prompt, estimate_tokens(prompt), estimate_tokens(reply))
    return None
