"""`pdserve chat`: an interactive chat with a running service that keeps the conversation.

Each line read from stdin is one user turn; the whole conversation so far (the system message
first, when given) goes out as `GenerateRequest.messages`, the answer streams to stdout and
becomes an assistant turn. `/reset` forgets the turns (not the system message); `/exit` or EOF
ends the session. Ctrl-C during an answer cancels the call; a failed call prints the error.
Either way the unanswered user turn is dropped and the session goes on.

`pdserve.cli` builds the subcommand from the shared flags, adds `add_chat_arguments` and calls
`run_chat`. `generate --chat` sends a one-question `Conversation` too.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from pdserve.client import GenerationClient, GenerationResult, collect

PROMPT = "> "
RESET_COMMAND = "/reset"
EXIT_COMMAND = "/exit"
GREETING = f"{RESET_COMMAND} forgets the conversation; {EXIT_COMMAND} or Ctrl-D ends the chat."
# The shell's convention for "ended by SIGINT".
INTERRUPTED_EXIT_CODE = 130


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the flags of `chat` beyond the address, security and generation flags."""
    parser.add_argument(
        "--system",
        default=None,
        metavar="TEXT",
        help="system message that starts the conversation (kept by /reset)",
    )
    parser.add_argument(
        "--show-stats", action="store_true", help="print each answer's summary line to stderr"
    )


@dataclass
class Conversation:
    """The chat messages sent with every question: the system message when there is one, then
    alternating user and assistant turns. Mutated by `ask`, `answer`, `withdraw`, `reset`."""

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def ask(self, question: str) -> list[dict[str, str]]:
        """Appends a user turn; returns the whole conversation to send."""
        self.turns.append({"role": "user", "content": question})
        return self.messages()

    def answer(self, text: str) -> None:
        """Appends the assistant turn answering the last question."""
        self.turns.append({"role": "assistant", "content": text})

    def withdraw(self) -> None:
        """Drops the last question, left unanswered."""
        assert self.turns and self.turns[-1]["role"] == "user", "no unanswered question"
        self.turns.pop()

    def reset(self) -> None:
        self.turns.clear()

    def messages(self) -> list[dict[str, str]]:
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        return system + list(self.turns)


def run_chat(
    client: GenerationClient,
    sampling: Mapping[str, Any],
    system: str | None = None,
    show_stats: bool = False,
) -> int:
    """Chats on stdin/stdout until `/exit` or EOF and returns the exit code: 0, or 130 when
    Ctrl-C interrupts a read of non-interactive input.

    `sampling` holds `GenerationClient.generate` keyword arguments. A `> ` prompt is shown only
    when stdin is a terminal, so the chat can be scripted through a pipe. Blocks; raises nothing
    for a failed call (it is printed to stderr).
    """
    interactive = sys.stdin.isatty()
    if interactive:
        _enable_line_editing()
        print(GREETING, file=sys.stderr)
    conversation = Conversation(system)
    while True:
        try:
            line = input(PROMPT if interactive else "").strip()
        except EOFError:
            if interactive:
                print()  # the shell's prompt starts on its own line
            return 0
        except KeyboardInterrupt:
            if not interactive:
                return INTERRUPTED_EXIT_CODE
            print(f"\n({EXIT_COMMAND} or Ctrl-D ends the chat)", file=sys.stderr)
            continue
        if line == EXIT_COMMAND:
            return 0
        if line == RESET_COMMAND:
            conversation.reset()
        elif line:
            _answer(client, conversation, line, sampling, show_stats)


def _answer(
    client: GenerationClient,
    conversation: Conversation,
    question: str,
    sampling: Mapping[str, Any],
    show_stats: bool,
) -> None:
    result = _stream_answer(client, conversation.ask(question), sampling)
    if result is None:
        conversation.withdraw()
        return
    conversation.answer(result.text)
    if show_stats:
        print(result.summary(), file=sys.stderr)


def _stream_answer(
    client: GenerationClient, messages: list[dict[str, str]], sampling: Mapping[str, Any]
) -> GenerationResult | None:
    # Streams one answer to stdout; None, once stderr says why, if it was cancelled or failed.
    echo = _Echo()
    stream = client.generate(messages, **sampling)
    try:
        return collect(stream, on_text=echo)
    except KeyboardInterrupt:
        problem = "(answer cancelled)"
    except grpc.RpcError as exc:
        problem = f"error: {exc.code().name}: {exc.details()}"
    finally:
        stream.close()  # cancels the call if it still runs (Ctrl-C)
        echo.end_line()
    print(problem, file=sys.stderr)
    return None


class _Echo:
    """Writes an answer's text to stdout as it arrives."""

    def __init__(self) -> None:
        self.printed = False

    def __call__(self, text: str) -> None:
        self.printed = True
        sys.stdout.write(text)
        sys.stdout.flush()

    def end_line(self) -> None:
        """Ends the answer's line; an answer that printed nothing leaves no empty line."""
        if self.printed:
            sys.stdout.write("\n")
            sys.stdout.flush()


def _enable_line_editing() -> None:
    # input() offers line editing and history only once the readline module is loaded; some
    # platforms have none, and the chat works without it.
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401
