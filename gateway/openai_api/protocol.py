"""OpenAI request bodies, in OpenAI's field order, with vLLM's documented extras fenced apart.

A request may carry any field of OpenAI's documented request schema and vLLM's documented sampling
extras; any other field is refused with a 400 naming it (as OpenAI answers), never forwarded blindly.
Which of the accepted fields an engine can honour is the engine's call (`EngineRequest.extra`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, WithJsonSchema

INT64 = 2**63  # seeds are 64-bit signed integers, as in vLLM

CHAT_EXAMPLE: dict[str, Any] = {
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "messages": [{"role": "user", "content": "list files in /tmp"}],
    "max_tokens": 16,
    "temperature": 0,
}
COMPLETION_EXAMPLE: dict[str, Any] = {
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "prompt": "Input: list files in /tmp\nOutput:",
    "max_tokens": 16,
    "temperature": 0,
}


def _checked_part(part: dict[str, Any]) -> dict[str, Any]:
    """A content part names its `type` and a text part carries its `text`; other parts are for the engine to judge."""
    kind = part.get("type")
    if not isinstance(kind, str) or not kind:
        raise ValueError("a content part needs a 'type' (text, image_url, input_audio, file, ...)")
    if kind == "text" and not isinstance(part.get("text"), str):
        raise ValueError("a text content part needs 'text' as a string")
    return part


ContentPart = Annotated[dict[str, Any], AfterValidator(_checked_part), WithJsonSchema({
    "type": "object", "required": ["type"], "additionalProperties": True,
    "properties": {"type": {"type": "string", "minLength": 1}, "text": {"type": "string"}},
    "if": {"properties": {"type": {"const": "text"}}}, "then": {"required": ["text"]},
})]
# Text or a list of parts; the tags name the branch in an error's `param` (`messages.0.content.parts.1`).
MessageContent = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[ContentPart], Tag("parts")],
    Discriminator(lambda value: "parts" if isinstance(value, list) else "text"),
]


class OpenAIRequestModel(BaseModel):
    """Unknown fields are an error (`extra_forbidden`), answered as a 400 naming the field."""

    model_config = ConfigDict(extra="forbid")


class ChatMessage(BaseModel):
    """One message; each content part must name its type (text parts carry text), roles are the router's call."""

    model_config = ConfigDict(extra="allow")  # tool_call_id, tool_calls, refusal, audio ... belong to the message

    role: str = Field(min_length=1)
    content: MessageContent | None = None
    name: str | None = None


class StreamOptions(OpenAIRequestModel):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class VLLMSamplingExtras(OpenAIRequestModel):
    """vLLM's documented sampling extras (both endpoints); forwarded to vLLM, refused where not honoured."""

    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    use_beam_search: bool | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    add_special_tokens: bool | None = None
    priority: int | None = None
    request_id: str | None = None
    return_tokens_as_token_ids: bool | None = None
    cache_salt: str | None = None


class SamplingFields(VLLMSamplingExtras):
    """OpenAI fields chat and completion requests share."""

    model: str = Field(min_length=1,
                       description="The base model (or an alias): detection; `<prompt>@v<N>`: that adapter.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"examples": [CHAT_EXAMPLE]})

    messages: list[ChatMessage] = Field(min_length=1)
    audio: dict[str, Any] | None = None
    function_call: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    logprobs: bool | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None
    modalities: list[str] | None = None
    parallel_tool_calls: bool | None = None
    prediction: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    reasoning_effort: str | None = None
    response_format: dict[str, Any] | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    # vLLM's chat extras
    echo: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"examples": [COMPLETION_EXAMPLE]})

    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(None, ge=1)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    response_format: dict[str, Any] | None = None  # vLLM's extra on completions


# Fields the gateway interprets itself (never handed to the engine as extras).
HANDLED_FIELDS = frozenset({
    "model", "messages", "prompt", "frequency_penalty", "max_tokens", "max_completion_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "temperature", "top_p",
})
# Fields that only describe the request to a hosted API (billing, storage, tracing): nothing to honour locally.
DESCRIPTIVE_FIELDS = frozenset({
    "user", "metadata", "store", "safety_identifier", "prompt_cache_key", "service_tier",
})


def engine_extras(body: SamplingFields) -> dict[str, Any]:
    """The set fields the gateway does not interpret: the engine forwards them or refuses them by name."""
    skip = HANDLED_FIELDS | DESCRIPTIVE_FIELDS
    return {name: getattr(body, name) for name in body.model_fields_set - skip if getattr(body, name) is not None}
