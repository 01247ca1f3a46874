"""`pdserve chat` fed a scripted stdin, against the in-process fake Generation server."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator

import pytest

from pdserve import chat_cli, cli
from pdserve.v1 import pdserve_pb2
from tests.unit.test_cli import (
    BAD_PROMPT,
    FakeGeneration,
    chat_roles,
    last_prompt_text,
    serving,
)

ANSWER = "Hello, world"  # what FakeGeneration streams
SLOW_QUESTION = "take your time"


class SlowFakeGeneration(FakeGeneration):
    """Like FakeGeneration, but answers SLOW_QUESTION with one piece, then waits for the call
    to end; `cancelled` is set once the client cancelled it."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = threading.Event()

    def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        if last_prompt_text(request) != SLOW_QUESTION:
            yield from super().Generate(request, context)
            return
        self.requests.append(request)
        answered = threading.Event()

        def on_end() -> None:
            # The call ended before this answer did: the client cancelled it. (The server may
            # never resume this generator after a cancel, so the callback decides.)
            if not answered.is_set():
                self.cancelled.set()

        context.add_callback(on_end)
        yield pdserve_pb2.GenerateResponse(token_ids=[17], text="Hel")
        self.cancelled.wait(30)
        answered.set()


@pytest.fixture
def fake() -> Iterator[tuple[str, SlowFakeGeneration]]:
    servicer = SlowFakeGeneration()
    with serving(servicer) as address:
        yield address, servicer


class ScriptedStdin(io.StringIO):
    """stdin holding `text`; a terminal when `tty`."""

    def __init__(self, text: str, tty: bool = False) -> None:
        super().__init__(text)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class InterruptingStdout(io.StringIO):
    """stdout where Ctrl-C is pressed (KeyboardInterrupt) right after `trigger` is first
    written, as while a slow answer streams."""

    def __init__(self, trigger: str) -> None:
        super().__init__()
        self.trigger = trigger
        self.fired = False

    def write(self, text: str) -> int:
        written = super().write(text)
        if text == self.trigger and not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        return written


def chat(monkeypatch, address: str, script: str, *flags: str, tty: bool = False) -> int:
    monkeypatch.setattr("sys.stdin", ScriptedStdin(script, tty))
    monkeypatch.setattr(chat_cli, "_enable_line_editing", lambda: None)
    return cli.main(["chat", "--address", address, "--timeout", "30", *flags])


def test_each_turn_sends_the_conversation_so_far(fake, monkeypatch, capsys) -> None:
    address, servicer = fake
    script = "What is KV?\nAnd prefill?\n/reset\nStart over\n"
    assert chat(monkeypatch, address, script, "--max-tokens", "9", "--seed", "3") == 0
    first, second, third = servicer.requests
    assert chat_roles(first) == [("user", "What is KV?")]
    assert chat_roles(second) == [
        ("user", "What is KV?"),
        ("assistant", ANSWER),
        ("user", "And prefill?"),
    ]
    assert chat_roles(third) == [("user", "Start over")]  # /reset forgot the turns
    assert {(r.sampling.max_tokens, r.sampling.seed) for r in servicer.requests} == {(9, 3)}
    out, err = capsys.readouterr()
    assert out == f"{ANSWER}\n" * 3  # no "> " prompt: stdin is not a terminal
    assert err == ""


def test_system_message_opens_every_request_and_survives_reset(fake, monkeypatch) -> None:
    address, servicer = fake
    assert chat(monkeypatch, address, "one\n/reset\ntwo\n", "--system", "Be brief.") == 0
    assert [chat_roles(request) for request in servicer.requests] == [
        [("system", "Be brief."), ("user", "one")],
        [("system", "Be brief."), ("user", "two")],
    ]


def test_exit_ends_the_session_and_blank_lines_are_skipped(fake, monkeypatch, capsys) -> None:
    address, servicer = fake
    assert chat(monkeypatch, address, "\n  \nhi\n/exit\nnever sent\n") == 0
    assert [chat_roles(request) for request in servicer.requests] == [[("user", "hi")]]
    assert capsys.readouterr().out == f"{ANSWER}\n"


def test_a_failed_call_is_reported_and_its_question_dropped(fake, monkeypatch, capsys) -> None:
    address, servicer = fake
    assert chat(monkeypatch, address, f"first\n{BAD_PROMPT}\nsecond\n") == 0
    assert len(servicer.requests) == 3
    assert chat_roles(servicer.requests[2]) == [
        ("user", "first"),
        ("assistant", ANSWER),
        ("user", "second"),
    ]
    out, err = capsys.readouterr()
    assert err.strip() == "error: INVALID_ARGUMENT: sampling.top_p: must be in (0, 1]"
    assert out == f"{ANSWER}\n" * 2  # the failed call left no empty line


def test_ctrl_c_cancels_the_answer_and_drops_its_question(fake, monkeypatch, capsys) -> None:
    address, servicer = fake
    stdout = InterruptingStdout(trigger="Hel")
    monkeypatch.setattr("sys.stdout", stdout)
    assert chat(monkeypatch, address, f"first\n{SLOW_QUESTION}\nsecond\n") == 0
    assert servicer.cancelled.wait(10), "the interrupted call was not cancelled"
    assert chat_roles(servicer.requests[2]) == [
        ("user", "first"),
        ("assistant", ANSWER),
        ("user", "second"),
    ]
    assert stdout.getvalue() == f"{ANSWER}\nHel\n{ANSWER}\n"  # the cut answer's line ended
    assert "(answer cancelled)" in capsys.readouterr().err


def test_show_stats_prints_a_summary_per_answer(fake, monkeypatch, capsys) -> None:
    address, _ = fake
    assert chat(monkeypatch, address, "one\ntwo\n", "--show-stats") == 0
    summaries = capsys.readouterr().err.splitlines()
    assert len(summaries) == 2
    assert all("finish=LENGTH" in line and "request_id=req-42" in line for line in summaries)


def test_a_terminal_gets_a_prompt_and_a_greeting(fake, monkeypatch, capsys) -> None:
    address, _ = fake
    assert chat(monkeypatch, address, "hi\n", tty=True) == 0
    out, err = capsys.readouterr()
    assert out == f"> {ANSWER}\n> \n"  # EOF ends the prompt's line
    assert "/reset" in err and "/exit" in err


def test_conversation_turns() -> None:
    conversation = chat_cli.Conversation(system="sys")
    assert conversation.ask("q1") == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q1"},
    ]
    conversation.withdraw()
    assert conversation.messages() == [{"role": "system", "content": "sys"}]
    conversation.ask("q2")
    conversation.answer("a2")
    conversation.reset()
    assert conversation.messages() == [{"role": "system", "content": "sys"}]
