"""The decode benchmark's workload: equal-length prompts cut from varied text, and how many
tokens each stream generates. Equal lengths let transformers' static batch run without padding,
so both sides compute exactly the same tokens."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

_TEXTS = (
    "The history of the printing press begins in the fifteenth century, when",
    "def merge_sorted(left, right):\n    result = []\n    while left and right:",
    "Photosynthesis is the process by which green plants turn light into",
    "Once upon a time, in a village at the edge of a great forest, there lived",
    "The three laws of thermodynamics can be summarised as follows:",
    "A good cup of coffee starts with freshly ground beans and water at",
    "In distributed systems, consensus protocols such as Raft ensure that",
    "The recipe calls for two cups of flour, one egg, a pinch of salt and",
    "Mount Everest, the highest mountain on Earth, was first climbed in",
    "SELECT name, COUNT(*) FROM orders JOIN customers ON orders.customer_id",
    "The French Revolution changed European politics because it",
    "To train a neural network, one first chooses a loss function and then",
)


# A fixed text for perplexity: the prompts' sources.
FIXED_TEXT = "\n".join(_TEXTS)


@dataclass(frozen=True)
class Workload:
    num_streams: int
    num_prompt_tokens: int
    num_new_tokens: int

    def __post_init__(self) -> None:
        if self.num_streams < 1 or self.num_prompt_tokens < 1 or self.num_new_tokens < 2:
            raise ValueError(
                "need >= 1 stream, >= 1 prompt token and >= 2 new tokens (one prefill + decode)"
            )

    @property
    def num_decode_steps(self) -> int:
        """Forward passes after the prefill: the first new token comes from the prefill."""
        return self.num_new_tokens - 1


def make_prompts(tokenizer: PreTrainedTokenizerBase, workload: Workload) -> list[list[int]]:
    """`num_streams` different prompts of exactly `num_prompt_tokens` token ids each."""
    prompts = []
    for index in range(workload.num_streams):
        # Rotating through the texts and starting each at another one keeps prompts distinct.
        text = " ".join(_TEXTS[(index + k) % len(_TEXTS)] for k in range(len(_TEXTS)))
        token_ids = tokenizer(f"{index}. {text}")["input_ids"]
        while len(token_ids) < workload.num_prompt_tokens:
            token_ids = token_ids + token_ids
        prompts.append(list(token_ids[: workload.num_prompt_tokens]))
    return prompts
