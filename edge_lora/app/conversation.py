"""The turns of an `edge-lora chat`, rendered with the bundle's chat template as the model was trained.

A bundle whose model ships a template (``chat_template`` in tokenizer_config.json, or
chat_template.jinja) gets it, rendered as transformers renders it, tokenized without extra special
tokens (the template writes them), and each reply stops at the template's end-of-turn token (e.g.
``<|im_end|>``, ``<|eot_id|>``). A model without a template was not trained to chat: its turns are
plain text, one line each, and a reply stops at the end of its line.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from edge_lora.chat_template import ChatTemplate
from edge_lora.errors import EdgeLoraError

if TYPE_CHECKING:
    from runtime.engine import Engine


class Conversation:
    def __init__(self, engine: Engine, keep_history: bool = True) -> None:
        self.engine = engine
        self.keep_history = keep_history
        bundle = engine.bundle
        config_rel = bundle.tokenizer.get("config")
        config = json.loads(bundle.require(config_rel).read_text(encoding="utf-8")) if config_rel else {}
        template = ChatTemplate.find(config, bundle.root)
        self.template = template if template.origin == "model" else None
        self.why_plain = None if self.template else "the model ships no chat template"
        if self.template:
            try:
                end = self.template.end_of_turn()
            except EdgeLoraError as err:  # no jinja2 on this device
                self.template, self.why_plain = None, str(err)
                end = None
        self.stop_ids, self.stop_text = [], ["\n"]
        if self.template:
            end_id = engine.tokenizer.token_to_id(end) if end else None
            self.stop_ids = [end_id] if end_id is not None else []
            self.stop_text = [end] if end and end_id is None else []
        self.messages: list[dict] = []
        self._pending: list[dict] = []  # the messages of the prompt being answered
        self.plain = ""  # the plain-text history, without a template

    @property
    def mode(self) -> str:
        return "chat template" if self.template else f"plain text ({self.why_plain})"

    def prompt(self, user_text: str) -> list[int]:
        """Token ids of the conversation so far plus ``user_text``, ending where the reply begins."""
        tokenizer = self.engine.tokenizer_for()  # the active adapters' new tokens included
        if not self.template:
            text = user_text if not self.keep_history else self.plain + user_text
            return tokenizer.encode(text)
        messages = (self.messages if self.keep_history else []) + [{"role": "user", "content": user_text}]
        ids = tokenizer.encode(
            self.template.render(messages, add_generation_prompt=True), add_special_tokens=False
        )
        self._pending = messages
        return ids

    def record(self, user_text: str, reply: str) -> None:
        if self.template:
            self.messages = self._pending + [{"role": "assistant", "content": reply}]
        else:
            self.plain = (self.plain if self.keep_history else "") + user_text + reply + "\n"

    def reset(self) -> None:
        self.messages, self.plain = [], ""
