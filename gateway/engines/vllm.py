"""vLLM engine: a vLLM OpenAI server started with `--enable-lora`, adapters loaded at run time.

It talks to vLLM with the official `openai` async client (connection pooling, SSE framing, errors
by status and inside the stream), also for vLLM's own routes (`/health`, `/v1/load_lora_adapter`,
...) through the client's documented custom-request methods. The engine remembers every adapter the registry
wants served. When vLLM forgets one (restart, eviction) a request for it reloads it and retries
once; a watcher reloads them all when vLLM comes back. If the reload fails, the router falls back
to the full prompt on the base model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
from openai import AsyncStream

from core.adapter_store import check_target_modules, read_adapter_config
from core.config import Settings
from gateway.engines.base import (
    AdapterLoadError,
    AdapterNotLoaded,
    ContextLengthExceeded,
    EngineError,
    EngineEvent,
    EngineRequest,
    EngineUnavailable,
    Finished,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from gateway.errors import BadRequest
from gateway.tasks import stop_task

log = logging.getLogger(__name__)
WATCH_INTERVAL_S = 2.0
# vLLM without --api-key ignores the key; the client needs one to build its headers.
PLACEHOLDER_API_KEY = "EMPTY"
Chunk = dict[str, Any]  # one SSE data object of vLLM's stream, as JSON


class _AdapterUnknown(Exception):
    """vLLM answered 404 for a model name the gateway believes is loaded."""


class VLLMEngine:
    """Talks to vLLM over HTTP; safe for concurrent requests (the client pools connections)."""

    name = "vllm"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base_url = settings.vllm_url.rstrip("/")
        # No client-side retries: a generation that failed or timed out must not run twice behind the
        # caller's back, and a vLLM that is down should be a prompt 503. The one retry we want (reload
        # an adapter vLLM forgot, then try again) is ours, in `generate`.
        self._client = openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=PLACEHOLDER_API_KEY,
                                          max_retries=0, timeout=openai.Timeout(600.0, connect=5.0))
        self._wanted: dict[str, Path] = {}  # adapters vLLM should hold: name -> folder
        self._loaded: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._max_len = settings.max_model_len or 0
        self._watcher: asyncio.Task[None] | None = None
        self._up = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._refresh_model_info()
            self._up = True
        except EngineUnavailable as exc:
            log.warning("vLLM is not reachable at %s yet (%s); serving 503s until it is", self.base_url,
                        exc.message)
        self._watcher = asyncio.create_task(self._watch(), name="vllm-watcher")

    async def close(self) -> None:
        await stop_task(self._watcher)
        await self._client.close()

    async def check_ready(self) -> None:
        try:
            await self._client.get(f"{self.base_url}/health", cast_to=str, options={"timeout": 5.0})
        except openai.APIConnectionError as exc:
            raise self._unreachable(exc) from exc
        except openai.APIStatusError as exc:
            raise EngineUnavailable(f"vLLM at {self.base_url} is not healthy ({exc.status_code})",
                                    code="engine_unavailable") from exc

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def loaded_adapters(self) -> set[str]:
        return set(self._wanted)

    async def _refresh_model_info(self) -> None:
        try:
            cards = (await self._client.models.list(timeout=10.0)).data
        except openai.APIConnectionError as exc:
            raise self._unreachable(exc) from exc
        except openai.APIStatusError as exc:
            raise EngineUnavailable(f"vLLM answered {exc.status_code} for /v1/models",
                                    code="engine_unavailable") from exc
        served = {card.id for card in cards}
        if self.settings.served_model_name not in served:
            raise EngineUnavailable(
                f"vLLM serves {sorted(served)}, not '{self.settings.served_model_name}': "
                "start it with --served-model-name matching PROMPTINTERN_SERVED_MODEL_NAME",
                code="engine_misconfigured")
        for card in cards:
            max_len = (card.model_extra or {}).get("max_model_len")
            if card.id == self.settings.served_model_name and max_len:
                self._max_len = int(max_len)
        self._loaded = served - {self.settings.served_model_name}

    async def _watch(self) -> None:
        """Notice vLLM going away and coming back; on return, load every wanted adapter again."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                await self.check_ready()
            except EngineUnavailable:
                if self._up:
                    log.error("vLLM at %s went away", self.base_url)
                self._up = False
                self._loaded.clear()
                continue
            if not self._up:
                log.info("vLLM at %s is back; reloading %d adapter(s)", self.base_url, len(self._wanted))
                try:
                    await self._refresh_model_info()
                    for name in list(self._wanted):
                        await self._ensure_loaded(name)
                    self._up = True
                except (EngineUnavailable, EngineError, AdapterLoadError) as exc:
                    log.warning("re-syncing vLLM failed, will retry: %s", exc.message)

    def _unreachable(self, exc: Exception) -> EngineUnavailable:
        return EngineUnavailable(f"vLLM at {self.base_url} is unreachable: {exc.__cause__ or exc}",
                                 code="engine_unavailable")

    # -- adapters ------------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: Path) -> None:
        await asyncio.to_thread(self._check_adapter, path)  # file reads: off the loop
        self._wanted[name] = await asyncio.to_thread(path.resolve)
        self._loaded.discard(name)
        try:
            await self._ensure_loaded(name)
        except AdapterLoadError:
            self._wanted.pop(name, None)
            raise

    def _check_adapter(self, path: Path) -> None:
        read_adapter_config(path, self.settings.max_lora_rank)
        check_target_modules(path, self.settings.vllm_lora_target_modules)

    async def _ensure_loaded(self, name: str) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self._loaded:
                return
            path = self._wanted.get(name)
            if path is None:
                raise AdapterNotLoaded(f"adapter '{name}' is not registered", code="adapter_not_loaded")
            body = {"lora_name": name, "lora_path": str(path), "load_inplace": True}
            try:
                await self._client.post("/load_lora_adapter", cast_to=str, body=body)
            except openai.APIConnectionError as exc:
                raise self._unreachable(exc) from exc
            except openai.APIStatusError as exc:
                raise AdapterLoadError(f"vLLM refused the adapter: {_error_message(exc)}", param="adapter_path",
                                       code="adapter_mismatch") from exc
            self._loaded.add(name)

    async def unload_adapter(self, name: str) -> None:
        self._wanted.pop(name, None)
        self._loaded.discard(name)
        try:
            await self._client.post("/unload_lora_adapter", cast_to=str, body={"lora_name": name})
        except openai.APIConnectionError:
            return  # gone with vLLM anyway; nothing to unload
        except openai.NotFoundError:
            return
        except openai.APIStatusError as exc:
            log.warning("vLLM did not unload %s: %s", name, _error_message(exc))

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        if request.adapter is not None:
            if request.adapter not in self._wanted:
                raise AdapterNotLoaded(f"adapter '{request.adapter}' is not loaded", code="adapter_not_loaded")
            if request.adapter not in self._loaded:
                await self._reload_or_fail(request.adapter)
        try:
            stream = await self._open(request)
        except _AdapterUnknown:
            assert request.adapter is not None
            self._loaded.discard(request.adapter)
            await self._reload_or_fail(request.adapter)
            try:
                stream = await self._open(request)
            except _AdapterUnknown as exc:
                raise AdapterNotLoaded(f"vLLM does not know adapter '{request.adapter}'",
                                       code="adapter_not_loaded") from exc
        try:
            async with stream:
                async for chunk in stream:
                    for event in chunk_events(chunk, request.kind):
                        yield event
        except openai.APIConnectionError as exc:
            raise EngineUnavailable(f"vLLM at {self.base_url} failed mid-request: {exc}",
                                    code="engine_unavailable") from exc
        except openai.APIError as exc:  # an error event inside the stream
            raise EngineError(f"vLLM failed mid-stream: {exc.message}", code="engine_error") from exc

    async def _reload_or_fail(self, name: str) -> None:
        try:
            await self._ensure_loaded(name)
        except AdapterLoadError as exc:
            raise AdapterNotLoaded(f"reloading adapter '{name}' into vLLM failed: {exc.message}",
                                   code="adapter_not_loaded") from exc

    async def _open(self, request: EngineRequest) -> AsyncStream[Chunk]:
        """Send the request; the stream is open once vLLM has answered 200.

        The body is built here, as vLLM reads it, and sent with the client's documented `post`; chunks
        come back as vLLM's JSON (`cast_to=object`). The typed `create()` and chunk models cost about
        half again the client's CPU per short answer (measured), and the relay needs JSON anyway.
        """
        p = request.params
        body: dict[str, Any] = {
            **request.extra,  # fields the gateway forwards as they came
            "model": request.adapter or self.settings.served_model_name,
            "max_tokens": p.max_tokens or self.settings.default_max_tokens,
            "temperature": p.temperature, "top_p": p.top_p, "n": p.n,
            "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
            "stream": True, "stream_options": {"include_usage": True},
        }
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        try:
            if request.kind == "chat":
                return await self._client.post("/chat/completions", body={**body, "messages": request.messages},
                                               cast_to=object, stream=True, stream_cls=AsyncStream[Chunk])
            return await self._client.post("/completions", body={**body, "prompt": request.prompt},
                                           cast_to=object, stream=True, stream_cls=AsyncStream[Chunk])
        except openai.APIConnectionError as exc:
            raise self._unreachable(exc) from exc
        except openai.APIStatusError as exc:
            raise _refusal(exc, request) from exc


def _refusal(exc: openai.APIStatusError, request: EngineRequest) -> Exception:
    """vLLM's refusal of a request, as the gateway's error (or `_AdapterUnknown` for a forgotten adapter)."""
    message = _error_message(exc)
    status = exc.status_code
    if status == 404 and request.adapter is not None:
        return _AdapterUnknown(message)
    if status == 400 and "context length" in message.lower():
        return ContextLengthExceeded(message)
    if status == 400:
        return BadRequest(f"vLLM refused the request: {message}", code="invalid_request")
    if status == 503:
        return EngineUnavailable(f"vLLM is unavailable: {message}", code="engine_unavailable")
    return EngineError(f"vLLM failed ({status}): {message}", code="engine_error")


def chunk_events(chunk: Chunk, kind: str) -> list[EngineEvent]:
    """One streamed chunk as engine events: text with its logprobs, tool-call pieces, finish reasons, usage."""
    events: list[EngineEvent] = []
    for choice in chunk.get("choices") or []:
        index = int(choice.get("index", 0))
        delta = choice.get("delta") or {}
        text = delta.get("content") if kind == "chat" else choice.get("text")
        logprobs = choice.get("logprobs") or None
        if text or logprobs:
            events.append(TextDelta(index, text or "", logprobs))
        if kind == "chat" and delta.get("tool_calls"):
            events.append(ToolCallDelta(index, list(delta["tool_calls"])))
        if choice.get("finish_reason"):
            events.append(Finished(index, str(choice["finish_reason"])))
    usage = chunk.get("usage")
    if usage:
        events.append(Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)))
    return events


def _error_message(exc: openai.APIStatusError) -> str:
    """vLLM's own words: `error.message` (recent) or `message` (older), else the raw body."""
    body = exc.body
    if isinstance(body, dict):
        return str(body.get("message") or body.get("detail") or body)
    return str(body or exc.response.text)[:500]
