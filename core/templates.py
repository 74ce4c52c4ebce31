"""Prompt templates: parsing, validation, rendering, matching one request, and the bare query.

A template is text with `{slot}` placeholders; `{{` and `}}` stand for literal braces. A chat
template is a list of messages (role + text), a completion template one string. The bare query
(`bare_query_messages`) is the single function that trainer and router share, so the adapter
is always trained on exactly what it is later served.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

TemplateKind = Literal["chat", "completion"]
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant"})
COMPLETION_ROLE = "prompt"
SLOT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_MESSAGES = 256
MAX_SLOTS = 32


class TemplateError(ValueError):
    """A template that cannot be registered; the message says why and `param` where."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def normalize(text: str) -> str:
    """The only normalisation applied before matching: CRLF to LF, trailing whitespace dropped."""
    return text.replace("\r\n", "\n").rstrip()


@dataclass(frozen=True)
class Slot:
    name: str


Part = str | Slot


_BRACE = re.compile(r"\{\{|\}\}|[{}]")  # an escaped brace pair first, then a lone brace


def parse_text(text: str, param: str) -> tuple[Part, ...]:
    """Split template text into static strings and slots; raises TemplateError on bad braces.

    Jumps from brace to brace (a regex search), so a long template costs its number of braces, not of
    characters, in Python: start-up parses every registered template."""
    parts: list[Part] = []
    buf: list[str] = []
    pos = 0
    while (found := _BRACE.search(text, pos)) is not None:
        i = found.start()
        buf.append(text[pos:i])
        token = found.group()
        if token in ("{{", "}}"):
            buf.append(token[0])
            pos = found.end()
            continue
        if token == "}":
            raise TemplateError(f"unbalanced '}}' at character {i}", param)
        end = text.find("}", i + 1)
        if end == -1:
            raise TemplateError(f"unbalanced '{{' at character {i}", param)
        name = text[i + 1 : end]
        if not SLOT_NAME.fullmatch(name):
            raise TemplateError(
                f"invalid slot name {name!r} at character {i}: use letters, digits and '_' "
                "(write '{{' and '}}' for literal braces)",
                param,
            )
        static = "".join(buf)
        buf = []
        if static:
            parts.append(static)
        elif parts and isinstance(parts[-1], Slot):
            raise TemplateError(
                f"slots {{{parts[-1].name}}} and {{{name}}} touch: put static text between them",
                param,
            )
        parts.append(Slot(name))
        pos = end + 1
    static = "".join(buf) + text[pos:]
    if static:
        parts.append(static)
    return tuple(parts)


def escape(text: str) -> str:
    """Static text as template source (braces doubled)."""
    return text.replace("{", "{{").replace("}", "}}")


@dataclass(frozen=True)
class MessageTemplate:
    role: str
    parts: tuple[Part, ...]

    @classmethod
    def build(cls, role: str, text: str, param: str) -> MessageTemplate:
        return cls(role=role, parts=parse_text(normalize(text), param))

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        """The template as a regex (same answers as `match`, which avoids its backtracking)."""
        regex = "".join("(.+?)" if isinstance(p, Slot) else re.escape(p) for p in self.parts)
        return re.compile(regex, re.DOTALL)

    @property
    def slots(self) -> list[str]:
        return [p.name for p in self.parts if isinstance(p, Slot)]

    @property
    def static_prefix(self) -> str:
        return self.parts[0] if self.parts and isinstance(self.parts[0], str) else ""

    @property
    def static_suffix(self) -> str:
        return self.parts[-1] if self.parts and isinstance(self.parts[-1], str) else ""

    @property
    def is_static(self) -> bool:
        return all(isinstance(p, str) for p in self.parts)

    @property
    def static_text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    def render(self, values: Mapping[str, str]) -> str:
        return "".join(values[p.name] if isinstance(p, Slot) else p for p in self.parts)

    def source(self) -> str:
        return "".join("{" + p.name + "}" if isinstance(p, Slot) else escape(p) for p in self.parts)

    def match(self, text: str) -> dict[str, str] | None:
        """Slot values if `text` is this message filled in, taking each slot as short as possible.

        Slots are separated by static text, so placing each separator at its leftmost occurrence
        finds a match whenever one exists, in linear time: a backtracking regex is cubic in the
        request's length for three slots, and the request is untrusted.
        """
        if self.is_static:
            return {} if text == self.static_text else None
        parts = self.parts
        prefix, suffix = self.static_prefix, self.static_suffix
        if not (text.startswith(prefix) and text.endswith(suffix)):
            return None
        pos, end = len(prefix), len(text) - len(suffix)
        values: dict[str, str] = {}
        pending = ""
        for part in parts[1 if prefix else 0 : len(parts) - 1 if suffix else len(parts)]:
            if isinstance(part, Slot):
                pending = part.name
                continue
            hit = text.find(part, pos + 1, end - 1)
            if hit == -1:
                return None
            values[pending] = text[pos:hit]
            pos = hit + len(part)
        if end - pos < 1:
            return None
        values[pending] = text[pos:end]
        return values


@dataclass(frozen=True)
class PromptTemplate:
    """A validated template; `messages` has one entry with role `prompt` for completions."""

    kind: TemplateKind
    messages: tuple[MessageTemplate, ...]
    slots: tuple[str, ...]

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(m.role for m in self.messages)

    @property
    def static_chars(self) -> int:
        return sum(len(m.static_text) for m in self.messages)

    def render(self, values: Mapping[str, str]) -> list[dict[str, str]] | str:
        """The full prompt with its slots filled: chat messages or a completion string."""
        missing = [s for s in self.slots if s not in values]
        if missing:
            raise TemplateError(f"missing value for slot(s) {', '.join(missing)}")
        if self.kind == "completion":
            return self.messages[0].render(values)
        return [{"role": m.role, "content": m.render(values)} for m in self.messages]

    def match(self, texts: Sequence[str]) -> dict[str, str] | None:
        """Slot values if the (already normalised) message texts are this template filled in."""
        if len(texts) != len(self.messages):
            return None
        values: dict[str, str] = {}
        for message, text in zip(self.messages, texts, strict=True):
            found = message.match(text)
            if found is None:
                return None
            values.update(found)
        return values

    def source(self) -> list[dict[str, str]] | str:
        if self.kind == "completion":
            return self.messages[0].source()
        return [{"role": m.role, "content": m.source()} for m in self.messages]

    def digest(self) -> str:
        """Stable hash of the template (kind, roles, text), recorded in adapter manifests."""
        blob = json.dumps({"kind": self.kind, "template": self.source()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def parse_template(
    *,
    messages: Sequence[Mapping[str, str]] | None = None,
    prompt: str | None = None,
    max_chars: int = 200_000,
) -> PromptTemplate:
    """Validate and compile a chat (`messages`) or completion (`prompt`) template."""
    if (messages is None) == (prompt is None):
        raise TemplateError("give exactly one of 'messages' (chat) or 'prompt' (completion)")
    built: list[MessageTemplate] = []
    if prompt is not None:
        kind: TemplateKind = "completion"
        if not isinstance(prompt, str):
            raise TemplateError("'prompt' must be a string", "prompt")
        total = len(prompt)
        built.append(MessageTemplate.build(COMPLETION_ROLE, prompt, "prompt"))
    else:
        kind = "chat"
        assert messages is not None
        if not messages:
            raise TemplateError("'messages' must not be empty", "messages")
        if len(messages) > MAX_MESSAGES:
            raise TemplateError(f"at most {MAX_MESSAGES} messages", "messages")
        total = 0
        for i, msg in enumerate(messages):
            role, content = msg.get("role"), msg.get("content")
            if role not in CHAT_ROLES:
                raise TemplateError(
                    f"role must be one of {sorted(CHAT_ROLES)}, got {role!r}", f"messages[{i}].role"
                )
            if not isinstance(content, str):
                raise TemplateError("content must be a string", f"messages[{i}].content")
            total += len(content)
            built.append(MessageTemplate.build(role, content, f"messages[{i}].content"))
    if total > max_chars:
        raise TemplateError(f"template has {total} characters; the limit is {max_chars}")
    slots: list[str] = []
    for message in built:
        for name in message.slots:
            if name in slots:
                raise TemplateError(f"slot {{{name}}} appears more than once; slot names must be unique")
            slots.append(name)
    if not slots:
        raise TemplateError("a template needs at least one {slot} for the part that changes per request")
    if len(slots) > MAX_SLOTS:
        raise TemplateError(f"at most {MAX_SLOTS} slots")
    return PromptTemplate(kind=kind, messages=tuple(built), slots=tuple(slots))


def bare_query_content(template: PromptTemplate, values: Mapping[str, str]) -> str:
    """The bare query's text: the slot value alone, or `name: value` lines in slot order."""
    if len(template.slots) == 1:
        return values[template.slots[0]]
    return "\n".join(f"{name}: {values[name]}" for name in template.slots)


def bare_query_messages(template: PromptTemplate, values: Mapping[str, str]) -> list[dict[str, str]]:
    """What the adapter receives: one user message, no system message (chat and completion alike)."""
    return [{"role": "user", "content": bare_query_content(template, values)}]
