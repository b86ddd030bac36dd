"""Chat templates: the tokenizer's own (the jinja `chat_template` of tokenizer_config.json; a converted
GGUF model's comes from its `tokenizer.chat_template`), rendered as transformers renders it (a sandboxed jinja2 environment
with trim_blocks and lstrip_blocks); else the plain format

    user: CONTENT\\n              one line per message, "ROLE: CONTENT\\n"
    assistant: CONTENT\\n         the generation prompt is "assistant: "

`split(messages, template)` turns a conversation whose last message is the assistant's into (context,
response) texts: the context is every earlier message plus the generation prompt, the response is what
the full rendering adds after it (the assistant's content and the template's end-of-turn).
"""
from __future__ import annotations

import json
import os
from typing import Optional

PLAIN_PROMPT = "assistant: "


class ChatError(ValueError):
    """A conversation the template cannot split, or a template that fails to render."""


def template_of(tokenizer: str) -> Optional[str]:
    """The chat template of a tokenizer spec (a directory, or a tokenizer.json with tokenizer_config.json
    beside it; `a3jax convert` writes a GGUF file's template there); None when it has none (the byte
    tokenizer, a tokenizer.json alone)."""
    if not tokenizer or tokenizer in ("byte", "bytes"):
        return None
    path = os.path.expanduser(tokenizer)
    d = os.path.dirname(path) if path.endswith(".json") else path
    cfg = os.path.join(d, "tokenizer_config.json")
    if not os.path.isfile(cfg):
        return None
    with open(cfg) as f:
        t = json.load(f).get("chat_template")
    return t if isinstance(t, str) and t else None


def _raise(msg):
    raise ChatError(f"the chat template raised: {msg}")


def render(template: Optional[str], messages: list, add_generation_prompt: bool = False, **extra) -> str:
    """The text of a conversation ([{role, content}]) under `template` (None = the plain format)."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatError(f"message {i} must be {{role: str, content: str}}, got {m!r}")
    if template is None:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + (PLAIN_PROMPT if add_generation_prompt else "")
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **extra)
    except ChatError:
        raise
    except Exception as e:  # noqa: BLE001 - jinja's many error types, reported as one
        raise ChatError(f"the chat template failed to render ({type(e).__name__}: {e})") from e


def split(messages: list, template: Optional[str], **extra) -> tuple[str, str]:
    """(context, response) texts of a conversation ending with the assistant's message."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ChatError("the last message must be the assistant's (the response to train on)")
    context = render(template, messages[:-1], add_generation_prompt=True, **extra)
    full = render(template, messages, **extra)
    if not full.startswith(context):
        raise ChatError("the template's rendering of the whole conversation does not start with its rendering "
                        "of the context + generation prompt; it cannot be split into prompt and response")
    return context, full[len(context):]
