"""A scripted stand-in for `router.request_flow.RequestFlow`, for front-door and HTTP unit tests.

Every request is answered with the tokens of `reply_text` (up to max_tokens), run through the
real `TextOutput` (detokenizer and stop strings), with made-up logprobs when asked. It records
what it was asked (admission included) and how each run ended, and can fail or hold a run at
chosen points. Like the real flow it owns the router queue the front door waits in.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from pdserve.errors import PdserveError
from pdserve.messages import ModelInfo, NamedToken, TokenLogprobs
from router.admission import Admission
from router.request_flow import Completion, StreamChunk
from router.text_output import TextOutput
from router.tokenizer import RouterTokenizer
from router.validation import ValidatedRequest
from router.wait_queue import WaitQueue
from tests.factories.tokenizer import EOS_TOKEN, train_byte_level_tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tokenizer_model_info(
    tokenizer: Tokenizer, max_context_tokens: int = 256, chat_template: str = CHATML_TEMPLATE
) -> ModelInfo:
    """The `ModelInfo` a replica would report for the factory tokenizer `tokenizer`."""
    return ModelInfo(
        model="tiny", dtype="float32", model_type="llama", vocab_size=tokenizer.get_vocab_size(),
        max_context_tokens=max_context_tokens, eos_token_ids=[0],
        tokenizer_json=tokenizer.to_str(), kv_fingerprint="fp", chat_template=chat_template,
        special_tokens=[NamedToken("eos_token", EOS_TOKEN)],
    )


def router_tokenizer(chat_template: str = CHATML_TEMPLATE) -> RouterTokenizer:
    """The factory byte-level tokenizer with a ChatML template (or none: "")."""
    info = tokenizer_model_info(train_byte_level_tokenizer(), chat_template=chat_template)
    return RouterTokenizer.from_model_info(info)


@dataclass
class RunRecord:
    request: ValidatedRequest
    request_id: str
    # "finished", "failed", "closed" (cancelled or closed by the consumer) or "running".
    outcome: str = "running"
    admission: Admission | None = None


@dataclass
class ScriptedFlow:
    tokenizer: RouterTokenizer
    reply_text: str = "Hello, world! How are you today?"
    # Raised before the first token of every run.
    fail_before_first: PdserveError | None = None
    # Raised after this many tokens were streamed (None: never).
    fail_after_tokens: int | None = None
    fail_error: PdserveError | None = None
    # When set, each run waits for it after its first token (a stream that stays open).
    hold_after_first: asyncio.Event | None = None
    runs: list[RunRecord] = field(default_factory=list)
    # Set once a run has sent its first token.
    first_token_sent: asyncio.Event = field(default_factory=asyncio.Event)
    # The router queue (the front door waits for in-flight slots in it).
    wait_queue: WaitQueue = field(default_factory=lambda: WaitQueue(1024, 0.05))
    # What every completion reports as the request's preemptions.
    num_preemptions: int = 0

    @property
    def num_running(self) -> int:
        return sum(1 for run in self.runs if run.outcome == "running")

    async def run(
        self,
        request: ValidatedRequest,
        deadline: float,
        request_id: str | None = None,
        admission: Admission | None = None,
    ) -> AsyncIterator[StreamChunk]:
        record = RunRecord(request, request_id or "", admission=admission)
        self.runs.append(record)
        try:
            async for chunk in self._chunks(request, record.request_id):
                yield chunk
        except PdserveError:
            record.outcome = "failed"
            raise
        except (GeneratorExit, asyncio.CancelledError):
            record.outcome = "closed"
            raise
        else:
            record.outcome = "finished"
        finally:
            if record.outcome == "running":
                record.outcome = "closed"

    async def _chunks(
        self, request: ValidatedRequest, request_id: str
    ) -> AsyncIterator[StreamChunk]:
        if self.fail_before_first is not None:
            raise self.fail_before_first
        reply = self.tokenizer.encode(self.reply_text, add_special_tokens=False)
        tokens = reply[: request.sampling.max_tokens]
        text = TextOutput(
            self.tokenizer, request.prompt_token_ids, request.stop, request.sampling.min_tokens
        )
        for position, token in enumerate(tokens):
            if self.fail_after_tokens is not None and position == self.fail_after_tokens:
                assert self.fail_error is not None, "fail_after_tokens needs fail_error"
                raise self.fail_error
            logprobs = [_logprobs(token, request)] if request.sampling.logprobs else []
            yield StreamChunk([token], text.push([token]), logprobs=logprobs)
            if position == 0:
                self.first_token_sent.set()
                if self.hold_after_first is not None:
                    await self.hold_after_first.wait()
            if text.stopped:
                break
        finish_reason = "stop" if text.stopped or len(tokens) == len(reply) else "length"
        completion = _completion(request, request_id, finish_reason, text.num_tokens)
        completion.num_preemptions = self.num_preemptions
        yield StreamChunk([], text.finish(), completion)


def _logprobs(token: int, request: ValidatedRequest) -> TokenLogprobs:
    num_top = request.sampling.top_logprobs
    return TokenLogprobs(
        token_id=token, logprob=-0.25,
        top_token_ids=[token + i for i in range(num_top)],
        top_logprobs=[-0.25 - i for i in range(num_top)],
    )


def _completion(
    request: ValidatedRequest, request_id: str, finish_reason: str, num_tokens: int
) -> Completion:
    return Completion(
        request_id=request_id, finish_reason=finish_reason,
        num_prompt_tokens=request.num_prompt_tokens, num_completion_tokens=num_tokens,
        timings={"time_to_first_token_s": 0.01, "total_s": 0.02}, mode="disaggregated",
        kv_transport="grpc", prefill_replica="prefill-0", decode_replica="decode-0",
        kv_bytes=1024, num_cached_tokens=3,
    )
