"""Chat turns rendered with the model's own Jinja chat template, as transformers renders them.

The environment below is the one ``transformers.utils.chat_template_utils`` compiles templates in
(a sandbox with trim_blocks and lstrip_blocks, loop controls, a ``{% generation %}`` tag, and the
globals ``raise_exception``, ``strftime_now``, ``dict``, ``namespace`` and a ``tojson`` filter
that does not escape HTML), and templates see the same variables (``messages``,
``add_generation_prompt``, ``tools``, ``documents`` and the tokenizer's special tokens), so the
text, and so the tokens, equal ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``
(tests/test_chat_template.py checks this on every supported architecture's template).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import GenerationError, ManifestError

# The tokenizer's special tokens that transformers passes to every template (special_tokens_map).
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"
)  # fmt: skip
# Names a message's reasoning comes under; transformers fills the first two from any of them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

Message = Mapping[str, Any]


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    """The template compiled in transformers' environment (cached: a server renders it per request)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks;
        rendering keeps its body as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:  # json.dumps, where Jinja's own filter would escape HTML characters
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = dict
    env.globals["namespace"] = jinja2.utils.Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ManifestError(
            f"the artifact's chat template does not parse ({exc}): rebuild the artifact"
        ) from None


def special_tokens(folder: Path) -> dict[str, str]:
    """The special tokens templates see (``bos_token``...), from the artifact's tokenizer_config.json."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text(encoding="utf-8"))
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value  # an AddedToken's dict
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def check_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Plain dicts of ``messages`` with string roles: a GenerationError naming the first bad one."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise GenerationError(f"message {i} is not an object with a string 'role'")
        message = dict(message)
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:  # as transformers' _alias_reasoning_fields
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        plain.append(message)
    return plain


def render(
    template: str,
    messages: Sequence[Message],
    special: Mapping[str, str],
    add_generation_prompt: bool = True,
) -> str:
    """The conversation as the template writes it; a GenerationError where the template refuses
    or cannot render the messages."""
    import jinja2

    compiled = _compile(template)
    try:
        return compiled.render(
            messages=check_messages(messages),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **special,
        )
    except jinja2.TemplateError as exc:  # raise_exception, e.g. roles that do not alternate
        raise GenerationError(f"the model's chat template refused the messages: {exc}") from None
    except Exception as exc:  # e.g. a content of another type than the template adds to a string
        raise GenerationError(
            f"the model's chat template cannot render these messages ({type(exc).__name__}: {exc})"
        ) from None
