"""Chat templates: the tokenizer's own (tokenizer_config.json's `chat_template`, as Hugging Face ships
it), rendered with jinja2's sandbox the way transformers renders it. A tokenizer without one (the
byte tokenizer, a tokenizer.json alone) has no chat endpoint."""
from __future__ import annotations

import json
import os
from typing import Optional


def template_of(engine) -> Optional[str]:
    """The chat template next to the engine's tokenizer file, or None."""
    file = getattr(engine.tokenizer, "file", None)
    if not file:
        return None
    p = os.path.join(os.path.dirname(os.path.abspath(file)), "tokenizer_config.json")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        try:
            t = json.load(f).get("chat_template")
        except json.JSONDecodeError:
            return None
    if isinstance(t, list):  # named templates: take the default one
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) and t else None


def render(template: str, messages: list, tok) -> str:
    """The prompt text of a conversation, ending with the assistant's turn opened."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    special = lambda i: tok.decode([i]) if i is not None and i >= 0 else ""
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token=special(tok.bos_id), eos_token=special(tok.eos_id))
