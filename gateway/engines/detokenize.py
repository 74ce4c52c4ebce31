"""Streamed text of one generated sequence: incremental detokenisation and the stop-string holdback.

Detokenisation uses the `tokenizers` library's `DecodeStream` (the same incremental decoder vLLM uses),
which holds back a token until it completes a UTF-8 character. The stop-string holdback is ours: the
maintained stop-string tools (transformers' `StopStringCriteria`) decide *when* to stop inside
`generate`, on token ids, but neither cut the text at the stop string nor say which text is safe to
stream, which is what an OpenAI `stop` needs.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Turns one sequence's tokens into text pieces as they arrive, equal in sum to `tokenizer.decode`."""

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream

        backend = getattr(tokenizer, "backend_tokenizer", None)
        # `decode` cleans spaces up after decoding when asked to; a stream cannot, so decode whole instead.
        cleans_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self._backend = backend if isinstance(backend, Tokenizer) and not cleans_up else None
        self._stream = DecodeStream(skip_special_tokens=True)
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._text = ""

    def add(self, token: int) -> str:
        """The text this token completes ("" while it is part of an unfinished character)."""
        if self._backend is not None:
            return self._stream.step(self._backend, token) or ""
        self._ids.append(token)
        text = str(self._tokenizer.decode(self._ids, skip_special_tokens=True))
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        piece, self._text = text[len(self._text):], text
        return piece


def stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start (not the whole) of a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class StopStringHoldback:
    """One choice's text, cut before its first stop string; streams only what cannot become one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, piece: str) -> str:
        """Take new text; return what may be streamed now. After a stop string, `stopped` is set."""
        if self.stopped:
            return ""
        self.text += piece
        # A stop string cannot start in text already streamed: that text never ends in a stop's prefix.
        found = [i for stop in self.stops if (i := self.text.find(stop, self.emitted)) != -1]
        if found:
            self.stopped = True
            self.text = self.text[:min(found)]
            return self._release(len(self.text))
        return self._release(len(self.text) - stop_prefix_length(self.text, self.stops))

    def flush(self) -> str:
        """The held-back rest, once the sequence has ended without a stop string."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        piece = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece
