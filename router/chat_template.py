"""The model's chat template, rendered by the router as `transformers` renders it.

A chat request's prompt must be exactly the text `tokenizer.apply_chat_template(messages,
add_generation_prompt=True, tokenize=False, **kwargs)` gives, which the router then tokenizes
with `add_special_tokens=False` (the template writes BOS and friends itself). The replicas ship
the template and the tokenizer's named special tokens in `ModelInfo`; the router may not import
transformers, so this module rebuilds transformers' Jinja environment: templates on the Hub are
written against its settings, filters and globals, and any difference changes the prompt.

Templates come from the model repository and are untrusted code, so they run in Jinja's
immutable sandbox (no attribute starting with `_`, no mutating methods on lists or dicts) and
see only copies of plain JSON-like data.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.runtime
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pdserve.errors import InvalidArgument
from pdserve.messages import ModelInfo

logger = logging.getLogger(__name__)

# Variables the renderer sets itself; template kwargs may not replace them.
RESERVED_VARIABLES = frozenset({"messages", "add_generation_prompt", "tools", "documents"})
# JSON from a client nests far less; the bound keeps the recursive copy off the recursion limit.
_MAX_NESTING = 32


class ChatTemplate:
    """One model's compiled chat template.

    Built once at router start-up; compiling never raises: a template that does not compile
    leaves `available` False (and logs a warning), and every `render` then raises. Read-only
    after construction and safe to share between threads and request tasks. `render` runs the
    template synchronously (CPU time grows with the conversation; callers bound it first).
    """

    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        """`source` is the Jinja template ("" for none); `special_tokens` maps names such as
        `bos_token` to their text, as the tokenizer's `special_tokens_map` does."""
        self._special_tokens = dict(special_tokens)
        self._template: jinja2.Template | None = None
        self._problem = "the model has no chat template"
        if source:
            self._compile(source)

    @classmethod
    def from_model_info(cls, info: ModelInfo) -> ChatTemplate:
        """The template and special tokens a replica reported."""
        return cls(info.chat_template, {token.name: token.text for token in info.special_tokens})

    @property
    def available(self) -> bool:
        """False when the model has no chat template or it does not compile."""
        return self._template is not None

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text for `messages` (dicts with `role`, `content` and optionally `name`).

        `template_kwargs` are extra template variables; they override the special tokens, as
        `apply_chat_template`'s keyword arguments do. The caller's data is never mutated.
        Raises InvalidArgument naming `messages` when the template is missing or broken, when
        the messages are malformed, or when the template refuses them (its `raise_exception`
        message) or fails on them; naming `chat_template_kwargs` when those use a reserved
        name or are not plain JSON-like values.
        """
        if self._template is None:
            raise InvalidArgument("messages", f"chat is not supported: {self._problem}")
        variables = {**self._special_tokens, **_plain_kwargs(template_kwargs)}
        variables.update(
            messages=_plain_messages(messages),
            add_generation_prompt=bool(add_generation_prompt),
            tools=None,
            documents=None,
        )
        try:
            return self._template.render(variables)
        except Exception as exc:  # the template is untrusted code: any failure refuses the request
            raise InvalidArgument("messages", _render_problem(exc)) from None

    def _compile(self, source: str) -> None:
        try:
            self._template = _environment().from_string(source)
        except Exception as exc:  # syntax errors, unknown filters, recursion in the parser
            self._problem = f"the model's chat template does not compile: {_describe(exc)}"
            logger.warning("%s; chat requests will be refused", self._problem)


def _render_problem(exc: Exception) -> str:
    if isinstance(exc, _TemplateRaised):
        return _describe(exc)
    return f"the chat template failed: {_describe(exc)}"


def _describe(exc: Exception) -> str:
    if isinstance(exc, TemplateSyntaxError):
        return f"{exc.message} (line {exc.lineno})"
    if isinstance(exc, TemplateError) and exc.message:
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def _plain_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages", "must be a non-empty list of messages")
    copies = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidArgument("messages", f"message {index} is not an object")
        # transformers drops None-valued keys: templates test for a key's presence, not None.
        present = {key: value for key, value in message.items() if value is not None}
        copies.append(_plain(present, "messages", 0))
    return copies


def _plain_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if not kwargs:
        return {}
    reserved = sorted(RESERVED_VARIABLES.intersection(kwargs))
    if reserved:
        raise InvalidArgument(
            "chat_template_kwargs", f"cannot set {', '.join(reserved)} (set by the router)"
        )
    return _plain(dict(kwargs), "chat_template_kwargs", 0)


def _plain(value: Any, field: str, depth: int) -> Any:
    """A fresh copy of JSON-like `value`; anything else (objects with methods the sandbox
    would let a template call) raises InvalidArgument naming `field`."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if depth >= _MAX_NESTING:
        raise InvalidArgument(field, f"nested deeper than {_MAX_NESTING} levels")
    if type(value) is dict:
        if not all(type(key) is str for key in value):
            raise InvalidArgument(field, "object keys must be strings")
        return {key: _plain(item, field, depth + 1) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_plain(item, field, depth + 1) for item in value)
    raise InvalidArgument(field, f"{type(value).__name__} is not a JSON value")


class _TemplateRaised(TemplateError):
    """The template called `raise_exception`: its message is meant for the client."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own `tojson` escapes <, >, & and ' for HTML, which would change the prompt, and
    # takes no options; templates on the Hub rely on plain `json.dumps` with these keywords.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _DictFactory:
    """`dict(...)` for templates without handing them the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses `_`-prefixed names, which could shadow its internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Positional `self`, as in Jinja's Namespace, so that `namespace(self=...)` still works.
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace attribute may not start with '_': {name!r}")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks;
    serving only renders the body. The body is a call block (its own scope, so a `set` inside
    does not leak out), as in transformers."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: jinja2.runtime.Macro) -> str:
        return str(caller())


def _environment() -> ImmutableSandboxedEnvironment:
    # The settings transformers compiles chat templates with: whitespace control changes the
    # prompt, so these must match exactly.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _Namespace
    return env
