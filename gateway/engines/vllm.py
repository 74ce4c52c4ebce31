"""vLLM engine: a vLLM OpenAI server started with `--enable-lora`, adapters loaded at run time.

The engine remembers every adapter the registry wants served. When vLLM forgets one (restart,
eviction) a request for it reloads it and retries once; a watcher reloads them all when vLLM
comes back. If the reload fails, the router falls back to the full prompt on the base model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from core.config import Settings
from core.adapter_store import read_adapter_config
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

log = logging.getLogger(__name__)
WATCH_INTERVAL_S = 2.0


class _AdapterUnknown(Exception):
    """vLLM answered 404 for a model name the gateway believes is loaded."""


class VLLMEngine:
    """Talks to vLLM over HTTP; safe for concurrent requests (httpx pools connections)."""

    name = "vllm"

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.base_url = settings.vllm_url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.base_url, transport=transport,
                                         timeout=httpx.Timeout(600.0, connect=5.0))
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
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._client.aclose()

    async def check_ready(self) -> None:
        try:
            response = await self._client.get("/health", timeout=5.0)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code != 200:
            raise EngineUnavailable(f"vLLM at {self.base_url} is not healthy ({response.status_code})",
                                    code="engine_unavailable")

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def loaded_adapters(self) -> set[str]:
        return set(self._wanted)

    async def _refresh_model_info(self) -> None:
        body = await self._get_json("/v1/models")
        for card in body.get("data", []):
            if card.get("id") == self.settings.served_model_name and card.get("max_model_len"):
                self._max_len = int(card["max_model_len"])
        served = {card.get("id") for card in body.get("data", [])}
        if self.settings.served_model_name not in served:
            raise EngineUnavailable(
                f"vLLM serves {sorted(str(s) for s in served)}, not '{self.settings.served_model_name}': "
                "start it with --served-model-name matching PROMPTINTERN_SERVED_MODEL_NAME",
                code="engine_misconfigured")
        self._loaded = {str(s) for s in served} - {self.settings.served_model_name}

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

    # -- HTTP helpers --------------------------------------------------------------------------

    def _unreachable(self, exc: Exception) -> EngineUnavailable:
        return EngineUnavailable(f"vLLM at {self.base_url} is unreachable: {exc}", code="engine_unavailable")

    async def _get_json(self, path: str) -> dict[str, Any]:
        try:
            response = await self._client.get(path, timeout=10.0)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code != 200:
            raise EngineUnavailable(f"vLLM answered {response.status_code} for {path}", code="engine_unavailable")
        data = response.json()
        return data if isinstance(data, dict) else {}

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return await self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    # -- adapters ------------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: Path) -> None:
        read_adapter_config(path, self.settings.max_lora_rank)
        self._wanted[name] = path.resolve()
        self._loaded.discard(name)
        try:
            await self._ensure_loaded(name)
        except AdapterLoadError:
            self._wanted.pop(name, None)
            raise

    async def _ensure_loaded(self, name: str) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self._loaded:
                return
            path = self._wanted.get(name)
            if path is None:
                raise AdapterNotLoaded(f"adapter '{name}' is not registered", code="adapter_not_loaded")
            response = await self._post("/v1/load_lora_adapter",
                                        {"lora_name": name, "lora_path": str(path), "load_inplace": True})
            if response.status_code != 200:
                message = _error_message(response)
                raise AdapterLoadError(f"vLLM refused the adapter: {message}", param="adapter_path",
                                       code="adapter_mismatch")
            self._loaded.add(name)

    async def unload_adapter(self, name: str) -> None:
        self._wanted.pop(name, None)
        self._loaded.discard(name)
        try:
            response = await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        except EngineUnavailable:
            return  # gone with vLLM anyway; nothing to unload
        if response.status_code not in (200, 404):
            log.warning("vLLM did not unload %s: %s", name, _error_message(response))

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        if request.adapter is not None:
            if request.adapter not in self._wanted:
                raise AdapterNotLoaded(f"adapter '{request.adapter}' is not loaded", code="adapter_not_loaded")
            if request.adapter not in self._loaded:
                await self._reload_or_fail(request.adapter)
        try:
            async for event in self._stream(request):
                yield event
            return
        except _AdapterUnknown:
            pass
        assert request.adapter is not None
        self._loaded.discard(request.adapter)
        await self._reload_or_fail(request.adapter)
        try:
            async for event in self._stream(request):
                yield event
        except _AdapterUnknown as exc:
            raise AdapterNotLoaded(f"vLLM does not know adapter '{request.adapter}'",
                                   code="adapter_not_loaded") from exc

    async def _reload_or_fail(self, name: str) -> None:
        try:
            await self._ensure_loaded(name)
        except AdapterLoadError as exc:
            raise AdapterNotLoaded(f"reloading adapter '{name}' into vLLM failed: {exc.message}",
                                   code="adapter_not_loaded") from exc

    def _payload(self, request: EngineRequest) -> tuple[str, dict[str, Any]]:
        p = request.params
        body: dict[str, Any] = {
            **request.extra,
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
        if request.kind == "chat":
            body["messages"] = request.messages
            return "/v1/chat/completions", body
        body["prompt"] = request.prompt
        return "/v1/completions", body

    async def _stream(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        path, body = self._payload(request)
        try:
            async with self._client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    self._raise_for(response, request)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    for event in _events(json.loads(data), request.kind):
                        yield event
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"vLLM at {self.base_url} failed mid-request: {exc}",
                                    code="engine_unavailable") from exc

    def _raise_for(self, response: httpx.Response, request: EngineRequest) -> None:
        message = _error_message(response)
        status = response.status_code
        if status == 404 and request.adapter is not None:
            raise _AdapterUnknown(message)
        if status == 400 and "context length" in message.lower():
            raise ContextLengthExceeded(message)
        if status == 400:
            raise BadRequest(f"vLLM refused the request: {message}", code="invalid_request")
        if status == 503:
            raise EngineUnavailable(f"vLLM is unavailable: {message}", code="engine_unavailable")
        raise EngineError(f"vLLM failed ({status}): {message}", code="engine_error")


def _events(chunk: dict[str, Any], kind: str) -> list[EngineEvent]:
    if "error" in chunk and not chunk.get("choices"):
        error = chunk["error"]
        raise EngineError(f"vLLM failed mid-stream: {error.get('message', error)}", code="engine_error")
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


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)
        return str(body.get("message") or body.get("detail") or error)
    return str(body)[:500]
