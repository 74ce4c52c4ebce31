"""Synthetic traffic for prompt discovery: recurring templates (chat and completion, one to four slots, multi-line
values of every length) and one-off noise, from one seeded `random.Random`. The property tests draw the seeds and
shapes with hypothesis; `promptintern bench discovery` draws many and scores the miner (precision, recall)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["qua", "sch", "tra", "ple", "ion", "ent"]
LABELS = ["Input", "Question", "Text", "Document", "Context", "Customer", "Code", "Ticket", "Product", "Topic"]
PUNCT = [".", ",", ";", "!", "?", ":"]


def word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))


def sentence(rng: random.Random, words: int) -> str:
    out = [word(rng) for _ in range(words)]
    out[0] = out[0].capitalize()
    return " ".join(out) + rng.choice(PUNCT[:1] * 4 + PUNCT)


def static_text(rng: random.Random, words: int) -> str:
    """Instructions: sentences, sometimes lines, a bullet, literal braces."""
    pieces: list[str] = []
    left = words
    while left > 0:
        n = min(left, rng.randint(4, 14))
        left -= n
        text = sentence(rng, n)
        roll = rng.random()
        if roll < 0.1:
            text = "{" + text + "}"
        elif roll < 0.2:
            text = "- " + text
        pieces.append(text)
        pieces.append(rng.choice([" ", " ", "\n", "\n\n"]))
    return "".join(pieces).strip()


def value(rng: random.Random, max_words: int = 12) -> str:
    """A slot value: one to `max_words` words, on one to three lines."""
    lines = [" ".join(word(rng) for _ in range(rng.randint(1, max_words))) for _ in range(rng.choice([1, 1, 2, 3]))]
    return "\n".join(lines)


@dataclass(frozen=True)
class SyntheticTemplate:
    """A recurring prompt: per message, static strings and slot numbers in order."""

    kind: Literal["chat", "completion"]
    roles: tuple[str, ...]
    messages: tuple[tuple[str | int, ...], ...]
    slots: int

    def request(self, rng: random.Random) -> list[tuple[str, str]] | str:
        """One request of this template with fresh slot values: chat (role, text) pairs or a completion prompt."""
        values = [value(rng) for _ in range(self.slots)]
        texts = ["".join(values[p] if isinstance(p, int) else p for p in parts) for parts in self.messages]
        if self.kind == "completion":
            return texts[0]
        return list(zip(self.roles, texts, strict=True))


def make_template(rng: random.Random, kind: Literal["chat", "completion"], slots: int) -> SyntheticTemplate:
    """A template whose static text outweighs its slot values (at least 40 + 20 words a slot)."""
    if kind == "completion":
        roles: tuple[str, ...] = ("prompt",)
    else:
        roles = rng.choice([("system", "user"), ("user",), ("system", "user", "assistant", "user"),
                            ("developer", "user")])
    budget = 40 + 20 * slots + rng.randint(0, 60)
    # Slots go into the user-facing messages (the last one always has one); the first message may be all static.
    homes = [len(roles) - 1] + [rng.randrange(len(roles)) for _ in range(slots - 1)]
    per_message: list[list[str | int]] = [[] for _ in roles]
    counts = [homes.count(m) for m in range(len(roles))]
    slot = 0
    for m in range(len(roles)):
        parts: list[str | int] = []
        chunks = counts[m] + 1
        for c in range(chunks):
            words = max(3, budget // (len(roles) + slots))
            lead = static_text(rng, words) if c == 0 or rng.random() < 0.9 else word(rng) + " " + word(rng)
            if c < chunks - 1:
                label = rng.choice(LABELS)
                if c:
                    lead = rng.choice(["\n", "\n", "\n\n", " ", ""]) + lead
                parts.append(lead + rng.choice(["\n\n", "\n", " "]) + label + rng.choice([": ", ":\n", " = "]))
                parts.append(slot)
                slot += 1
            elif c > 0 and rng.random() < 0.3:
                continue  # the message ends with its slot
            else:
                parts.append((rng.choice(["\n", "\n", "\n\n", " ", ""]) if c else "") + lead)
        per_message[m] = parts
    return SyntheticTemplate(kind, roles, tuple(tuple(p) for p in per_message), slots)


def noise(rng: random.Random) -> tuple[Literal["chat", "completion"], list[tuple[str, str]] | str]:
    """A one-off request: unrelated text of any length, in any shape."""
    if rng.random() < 0.3:
        return "completion", static_text(rng, rng.randint(3, 150))
    roles = rng.choice([("user",), ("system", "user"), ("system", "user", "assistant", "user")])
    return "chat", [(role, static_text(rng, rng.randint(3, 120))) for role in roles]
