"""Conversations for supervised fine-tuning: read, render with a chat template, tokenize, and mark the tokens the
loss is taken on (the assistant's), from the template's own output.

A record of a JSONL file is either ``{"prompt": ..., "response": ...}`` or ``{"messages": [{"role": ...,
"content": ...}, ...]}`` with roles system, user and assistant (multi-turn; a system message only first).

The template is the tokenizer's own (Jinja, applied as transformers applies it: ``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token``, in a sandbox) when its special-tokens record carries one,
else ``DEFAULT_TEMPLATE``. Where the assistant's text lies is found by rendering, never by searching the token
ids for a response string: for assistant message i, the conversation up to message i with the generation prompt
renders to a prefix P, and up to and including message i to a prefix Q; the assistant's span is characters
[len(P), len(Q)) of the whole rendering (a template whose renderings are not prefixes of one another is
refused). The whole conversation is then tokenized once, as a model sees it at inference, and a token is
trained on when its first character lies in an assistant span (``loss_on="all"``: every assistant turn;
``"last"``: the last one only). So a header that tokenizes differently in context than alone cannot shift the
mask: the offsets come from the very encoding that is trained on.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from megalm.data.errors import DataError

ROLES = ("system", "user", "assistant")
MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>|</?s>")
"""What a chat template writes as a special token (ChatML's <|im_start|>, Llama 3's <|eot_id|>, <s>, </s>): each must
be one token of the tokenizer. megalm's own default writes plain-text headers and is not held to it."""
DEFAULT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
"""megalm's template when the tokenizer has none: a role header line, the content, and after each assistant turn
the end-of-document token (so a fine-tuned model learns to stop). The headers are plain text, so any tokenizer
encodes them."""


@dataclass
class Counts:
    """What happened to each record: kept, or dropped and why (nothing is dropped silently)."""
    kept: int = 0
    truncated: int = 0
    dropped: dict = field(default_factory=dict)

    def drop(self, why: str) -> None:
        self.dropped[why] = self.dropped.get(why, 0) + 1

    def summary(self) -> str:
        parts = [f"{self.kept} kept"] + ([f"{self.truncated} truncated"] if self.truncated else [])
        parts += [f"{n} dropped: {why}" for why, n in sorted(self.dropped.items())]
        return ", ".join(parts)


class BadRecord(ValueError):
    """A record that cannot be a conversation; the message says why (counted, not fatal)."""


def messages_of(record) -> list[dict]:
    """The conversation a JSONL record holds, checked."""
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRecord("messages is not a non-empty list")
    elif "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]}]
    else:
        raise BadRecord("neither messages nor prompt/response")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
            raise BadRecord(f"message {i} is not a {{role, content}} object")
        if m["role"] not in ROLES:
            raise BadRecord(f"message {i} has role {m['role']!r}, not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise BadRecord(f"message {i}'s content is not a string")
        if m["role"] == "system" and i:
            raise BadRecord(f"message {i} is a system message after the first")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant message")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        raise BadRecord("an empty assistant response")
    return messages


class ChatRenderer:
    """A chat template with the tokenizer it renders for."""

    def __init__(self, tokenizer, template: str | None = None):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.tokenizer = tokenizer
        self.source = "the tokenizer's chat template" if template is None and tokenizer.special.chat_template \
            else "megalm's default chat template" if template is None else "the given chat template"
        text = template or tokenizer.special.chat_template or DEFAULT_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(text)
        except TemplateError as e:
            raise DataError(f"{self.source} does not parse as Jinja: {e}") from None
        if text is not DEFAULT_TEMPLATE:
            missing = sorted({m for m in MARKER.findall(text) if tokenizer.token_id(m) is None})
            if missing:
                raise DataError(f"{self.source} writes {', '.join(missing)}, which the tokenizer has no token for, "
                                f"so they would be split into pieces of text: use the tokenizer the template was "
                                f"written for, or a template of this tokenizer's own tokens")
        special = tokenizer.special
        self.variables = {"bos_token": special.bos or "", "eos_token": special.eod}
        added = json.loads(tokenizer.to_str()).get("added_tokens") or []
        self.special_texts = [t["content"] for t in added if t.get("special") and t.get("content")]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.variables)
        except TemplateError as e:
            raise DataError(f"{self.source} failed on a conversation: {e}") from None

    def assistant_spans(self, messages: list[dict], loss_on: str = "all") -> tuple[str, list[tuple[int, int]]]:
        """The whole rendering and the character spans of the assistant turns trained on."""
        whole = self.render(messages)
        spans = []
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for i in (turns if loss_on == "all" else turns[-1:]):
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[:i + 1])
            if not (whole.startswith(through) and through.startswith(before)):
                raise DataError(f"{self.source} renders a conversation's beginning differently from the whole "
                                f"conversation (at message {i}), so the assistant's tokens cannot be located from "
                                f"it; use a template whose output for the first k messages is a prefix of the "
                                f"output for all of them")
            spans.append((len(before), len(through)))
        return whole, spans

    def encode(self, messages: list[dict], loss_on: str = "all") -> tuple[list[int], list[int]]:
        """(token ids, loss mask 0/1 per token) of one conversation."""
        for i, m in enumerate(messages):
            for token in self.special_texts:
                if token in m["content"]:
                    raise BadRecord(f"message {i} contains the special token text {token!r}")
        text, spans = self.assistant_spans(messages, loss_on)
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        if self.tokenizer.special.add_bos and self.tokenizer.bos_id is not None and not text.startswith(
                self.tokenizer.special.bos or "\0"):
            ids, offsets = [self.tokenizer.bos_id] + ids, [(0, 0)] + offsets
        mask = [1 if any(lo <= start < hi for lo, hi in spans) and end > start else 0 for start, end in offsets]
        if not any(mask):
            raise BadRecord("no token of an assistant response survived tokenization")
        return ids, mask


def _raise(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def read_jsonl(path: str | Path):
    """(line number, record or BadRecord) for each non-empty line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, BadRecord(f"not JSON ({e.msg})")
