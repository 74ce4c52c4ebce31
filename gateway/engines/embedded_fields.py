"""Which request fields beyond the sampling parameters the embedded engine honours (an allow-list).

A field the gateway does not interpret reaches the engine in `EngineRequest.extra`. The embedded
engine accepts it only when it is listed below, at a value that asks for what it does anyway (no
tools, no log probabilities, vLLM's defaults); anything else is a 400 naming the field, never
silently ignored.
"""

from __future__ import annotations

from typing import Any

from gateway.engines.base import EngineRequest, UnsupportedParameter

ANY_VALUE = object()

# field -> the values it may take here (ANY_VALUE: whatever it is, it changes nothing in the answer).
HONOURED: dict[str, tuple[Any, ...]] = {
    # OpenAI
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none", "auto"),  # with no tools both mean "answer in text"
    "function_call": ("none", "auto"),
    "parallel_tool_calls": (ANY_VALUE,),  # only about tool calls, which are refused by `tools`
    "modalities": (["text"],),
    "prediction": (ANY_VALUE,),  # predicted output only speeds decoding up; the answer is the same
    "echo": (False,),
    "suffix": ("",),
    # vLLM's extras at their defaults
    "top_k": (-1, 0),
    "min_p": (0.0,),
    "repetition_penalty": (1.0,),
    "length_penalty": (1.0,),
    "min_tokens": (0,),
    "ignore_eos": (False, True),  # honoured: decoding goes on past end-of-sequence to max_tokens
    "stop_token_ids": ([],),
    "bad_words": ([],),
    "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "use_beam_search": (False,),
    "return_tokens_as_token_ids": (False,),
    "priority": (0,),
    "cache_salt": (ANY_VALUE,),  # no prefix cache here to isolate
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "chat_template_kwargs": ({},),
}


def _same(value: Any, allowed: Any) -> bool:
    """JSON equality where `false` is not `0` and `1` is `1.0`."""
    if allowed is ANY_VALUE:
        return True
    if isinstance(value, bool) or isinstance(allowed, bool):
        return value is allowed
    return bool(value == allowed)


def honoured(key: str, value: Any, request: EngineRequest) -> bool:
    if key == "best_of":  # best_of = n returns every candidate: nothing to choose among
        return _same(value, request.params.n)
    if key == "add_special_tokens":  # what the engine does: chat templates bring their own, completions get BOS
        return _same(value, request.kind == "completion")
    return any(_same(value, allowed) for allowed in HONOURED.get(key, ()))


def refuse_unhonoured_fields(request: EngineRequest, engine: str) -> None:
    """Raise UnsupportedParameter (400) for the first extra field the embedded engine would not honour,
    or for message content that is not text (images, audio, files: this engine reads text only)."""
    for number, message in enumerate(request.messages or ()):
        if not isinstance(message.get("content"), str | None):
            raise UnsupportedParameter(f"messages.{number}.content", engine,
                                       what="content parts other than text")
    for key, value in sorted(request.extra.items()):
        if value is not None and not honoured(key, value, request):
            raise UnsupportedParameter(key, engine)
