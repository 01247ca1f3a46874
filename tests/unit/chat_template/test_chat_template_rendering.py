"""ChatTemplate: prompts identical to transformers' `apply_chat_template`, in a sandbox.

The golden reference is transformers itself: every rendered string, and the token ids the
router would encode from it, must equal what `apply_chat_template` gives for the same template,
special tokens and keyword arguments. Refusals must be the ones transformers gives, typed.
"""

from __future__ import annotations

from typing import Any

import pytest
from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from pdserve.errors import InvalidArgument
from tests.factories.chat_templates import (
    CONVERSATIONS,
    Messages,
    assert_same_as_transformers,
    ours,
)

# Hand-written templates, each exercising an environment feature templates on the Hub rely on.
TOJSON = (
    "{% for m in messages %}{{ m | tojson }}|{{ m | tojson(indent=2) }}|"
    "{{ m | tojson(sort_keys=true, separators=(',', ':')) }}|"
    "{{ m.content | tojson(ensure_ascii=true) }}\n{% endfor %}"
)
NAMESPACE_LOOP = """{% set ns = namespace(system='', shown=0) %}
{% for m in messages %}
    {% if m.role == 'system' %}
        {% set ns.system = m.content %}
    {% endif %}
{% endfor %}
{% if ns.system %}
<<SYS>>{{ ns.system }}<</SYS>>
{% endif %}
{% for m in messages if m.role != 'system' %}
    {% if m.content == 'STOP' %}{% break %}{% endif %}
    {% if m.content == 'SKIP' %}{% continue %}{% endif %}
    {% set ns.shown = ns.shown + 1 %}
  [{{ m.role }}{% if m.name %} ({{ m.name }}){% endif %}] {{ m.content }}
    {%- if not loop.last %} | {% endif %}
{% endfor %}
({{ ns.shown }} shown)
{%+ if add_generation_prompt %}  >>> {% endif %}
"""
ALTERNATING = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
DATED = (
    "{{ bos_token }}Today is year {{ strftime_now('%Y') }}.\n"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
)
THINKING = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
GENERATION = (
    "{% for m in messages %}{% if m.role == 'assistant' %}"
    "{% generation %}{% set inner = 'x' %}<a>{{ m.content }}</a>{% endgeneration %}"
    "{% else %}<u>{{ m.content }}</u>{% endif %}[{{ inner }}]{% endfor %}"
    "{% set d = dict(n=messages | length) %}{{ d | tojson }}\n"
)
WHITESPACE = "  {% for m in messages %}\n    {{- m.content -}}\n  {% endfor %}\n\n{{ '#' }}\n"
TEMPLATES = {
    "tojson": TOJSON,
    "namespace_loop": NAMESPACE_LOOP,
    "alternating": ALTERNATING,
    "dated": DATED,
    "thinking": THINKING,
    "generation": GENERATION,
    "whitespace": WHITESPACE,
}
LOOP_CONTROL_CONVERSATION: Messages = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "a", "name": "bob"},
    {"role": "assistant", "content": "SKIP"},
    {"role": "user", "content": "b <tag> & 'quote' ü"},
    {"role": "assistant", "content": "STOP"},
    {"role": "user", "content": "never shown"},
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_smollm2_template_matches_transformers(
    hf_tokenizer: PreTrainedTokenizerBase,
    router_tokenizer: Tokenizer,
    name: str,
    add_generation_prompt: bool,
) -> None:
    assert_same_as_transformers(
        hf_tokenizer,
        router_tokenizer,
        CONVERSATIONS[name],
        add_generation_prompt=add_generation_prompt,
    )


def test_special_token_text_in_content_becomes_special_tokens(
    hf_tokenizer: PreTrainedTokenizerBase, router_tokenizer: Tokenizer
) -> None:
    # transformers does not sanitize content by default, so neither do we: a user can write
    # the turn markers themselves. This pins that (shared) behaviour.
    text = assert_same_as_transformers(
        hf_tokenizer, router_tokenizer, CONVERSATIONS["special_token_text"]
    )
    ids = router_tokenizer.encode(text, add_special_tokens=False).ids
    im_end = router_tokenizer.token_to_id("<|im_end|>")
    assert ids.count(im_end) == 3


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", ["tojson", "namespace_loop", "dated", "generation", "whitespace"])
def test_hand_written_templates_match_transformers(
    hf_tokenizer: PreTrainedTokenizerBase,
    router_tokenizer: Tokenizer,
    name: str,
    add_generation_prompt: bool,
) -> None:
    for messages in [LOOP_CONTROL_CONVERSATION, *CONVERSATIONS.values()]:
        assert_same_as_transformers(
            hf_tokenizer,
            router_tokenizer,
            messages,
            template=TEMPLATES[name],
            add_generation_prompt=add_generation_prompt,
        )


def test_namespace_loop_controls_and_block_trimming(
    hf_tokenizer: PreTrainedTokenizerBase, router_tokenizer: Tokenizer
) -> None:
    text = assert_same_as_transformers(
        hf_tokenizer, router_tokenizer, LOOP_CONTROL_CONVERSATION, template=NAMESPACE_LOOP
    )
    # lstrip_blocks strips indentation before block tags only; text lines keep theirs.
    shown = "  [user (bob)] a |   [user] b <tag> & 'quote' ü | (2 shown)"
    assert text == f"<<SYS>>sys<</SYS>>\n{shown}\n  >>> "


def test_tojson_does_not_escape_html_and_takes_options(
    hf_tokenizer: PreTrainedTokenizerBase,
) -> None:
    messages = [{"role": "user", "content": "<b>&'ü"}]
    text = ours(hf_tokenizer, TOJSON).render(messages)
    assert text.startswith('{"role": "user", "content": "<b>&\'ü"}|{\n  "role": "user",')
    assert '{"content":"<b>&\'ü","role":"user"}|"<b>&\'\\u00fc"' in text


def test_generation_block_renders_its_body_in_its_own_scope(
    hf_tokenizer: PreTrainedTokenizerBase,
) -> None:
    messages = CONVERSATIONS["multi_turn"][1:3]
    text = ours(hf_tokenizer, GENERATION).render(messages)
    assert text == '<u>Hi!</u>[]<a>Hello. How can I help?</a>[]{"n": 2}'


def test_alternating_roles_match_transformers(
    hf_tokenizer: PreTrainedTokenizerBase, router_tokenizer: Tokenizer
) -> None:
    text = assert_same_as_transformers(
        hf_tokenizer,
        router_tokenizer,
        CONVERSATIONS["multi_turn"][1:],
        template=ALTERNATING,
    )
    assert text.startswith("<|im_start|>[user] Hi!<|im_end|>")


def test_raise_exception_is_invalid_argument_naming_messages(
    hf_tokenizer: PreTrainedTokenizerBase,
) -> None:
    messages = CONVERSATIONS["system_user"]
    with pytest.raises(TemplateError) as theirs:
        hf_tokenizer.apply_chat_template(messages, chat_template=ALTERNATING, tokenize=False)
    with pytest.raises(InvalidArgument) as refused:
        ours(hf_tokenizer, ALTERNATING).render(messages)
    assert refused.value.field == "messages"
    assert str(refused.value) == f"messages: {theirs.value.message}"
    assert "roles must alternate" in str(refused.value)


def test_strftime_now(hf_tokenizer: PreTrainedTokenizerBase) -> None:
    from datetime import datetime

    text = ours(hf_tokenizer, DATED).render(CONVERSATIONS["single_user"])
    assert f"Today is year {datetime.now().year}." in text


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": True}, {"enable_thinking": False}])
def test_template_kwargs_match_transformers(
    hf_tokenizer: PreTrainedTokenizerBase, router_tokenizer: Tokenizer, kwargs: dict[str, Any]
) -> None:
    text = assert_same_as_transformers(
        hf_tokenizer, router_tokenizer, CONVERSATIONS["system_user"], template=THINKING, **kwargs
    )
    assert text.endswith("<think>\n\n</think>\n\n") == (kwargs.get("enable_thinking") is False)


def test_template_kwargs_override_special_tokens(
    hf_tokenizer: PreTrainedTokenizerBase, router_tokenizer: Tokenizer
) -> None:
    text = assert_same_as_transformers(
        hf_tokenizer,
        router_tokenizer,
        CONVERSATIONS["single_user"],
        template=ALTERNATING,
        bos_token="[BOS]",
        extra={"nested": [1, 2.5, None, True]},
    )
    assert text.startswith("[BOS][user]")
