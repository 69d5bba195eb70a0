"""Chat templates: a model's own Jinja template, rendered exactly as transformers' ``apply_chat_template``.

The same environment transformers builds (sandboxed, ``trim_blocks``/``lstrip_blocks``, loop
controls, its ``tojson``, ``raise_exception``, ``strftime_now``, the ``{% generation %}`` tag) and
the same variables (the special tokens, ``tools=None``, ``documents=None``), so a conversation
trained on renders token for token as the model's authors meant, and as a chat app renders it.
``jinja2`` is imported only when a template is rendered (the training extra and llama-cpp-python
bring it; the device runtime does not need it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from edge_lora.errors import EdgeLoraError

if TYPE_CHECKING:
    import jinja2
    import jinja2.nodes
    import jinja2.parser

TEMPLATE_FILE = "chat_template.jinja"
# ChatML, for models that ship no template
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SENTINEL = "\u2063EDGE_LORA_REPLY\u2063"  # an assistant reply that no template writes by itself


@dataclass
class ChatTemplate:
    source: str
    special: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... as text
    origin: str = "model"  # "model" or "default" (ChatML, the model has none)
    where: Path | None = None  # the file it came from, for error messages

    @classmethod
    def find(cls, tokenizer_config: dict, folder: Path) -> ChatTemplate:
        """The template of a model directory or bundle: ``chat_template`` in tokenizer_config.json
        (a string, or a list of named ones: "default" wins), else ``chat_template.jinja``, else ChatML."""
        folder = Path(folder)
        special = {
            k: text
            for k, v in tokenizer_config.items()
            if k.endswith("_token") and (text := token_text(v)) is not None
        }
        source = tokenizer_config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        where = folder / "tokenizer_config.json"
        if not source and (folder / TEMPLATE_FILE).is_file():
            source, where = (folder / TEMPLATE_FILE).read_text(encoding="utf-8"), folder / TEMPLATE_FILE
        if not source:
            return cls(DEFAULT_CHAT_TEMPLATE, special, "default", None)
        return cls(source, special, "model", where)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return _compiled(self.source, self.where).render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special,
            )
        except EdgeLoraError:
            raise
        except Exception as err:  # the template's own raise_exception, or a runtime error inside it
            raise EdgeLoraError(
                f"chat template failed: {' '.join(str(err).split())}", path=self.where
            ) from None

    def end_of_turn(self) -> str | None:
        """What the template writes right after an assistant reply (``<|im_end|>``, ``<|eot_id|>``,
        ``</s>``, ...): where generation of a reply should stop. None when it writes nothing."""
        try:
            text = self.render(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
            )
        except EdgeLoraError:
            return None
        after = text.partition(_SENTINEL)[2].strip()
        return after.split()[0] if after else None


def token_text(value: object) -> str | None:
    """A tokenizer_config.json token: a string, or an AddedToken dict with its text under "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


_CACHE: dict[str, jinja2.Template] = {}


def _compiled(source: str, where: Path | None) -> jinja2.Template:
    if source not in _CACHE:
        _CACHE[source] = _compile(source, where)
    return _CACHE[source]


def _compile(source: str, where: Path | None) -> jinja2.Template:
    try:
        import jinja2
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise EdgeLoraError(
            "chat templates need jinja2", hint="pip install jinja2 (or 'edge-lora[train]')"
        ) from None

    class Generation(Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` (it marks assistant text for
        masks): renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    def raise_exception(message: str) -> NoReturn:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: object,
        ensure_ascii: bool = False,
        indent: int | str | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise EdgeLoraError(f"chat template does not parse: {err}", path=where) from None
