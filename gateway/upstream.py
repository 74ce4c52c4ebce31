"""The upstream provider: an OpenAI-compatible API (a hosted one, another vLLM or gateway) the gateway relays to.

It speaks plain HTTP through `httpx` (the request body goes as the client sent it; answers and stream chunks
come back as JSON text), with the gateway's own key and no retries: a generation must never run twice behind
the caller's back. Failures become the gateway's errors in OpenAI's shape: the upstream refusing the gateway's
key (401/403) or failing (5xx, unreachable, an answer that is not OpenAI's) is a 502, too slow a 504, and any
other 4xx is the upstream's own verdict on the request, relayed with its status and message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import httpx

from core.config import Settings
from gateway.errors import APIError

UpstreamEndpoint = Literal["chat", "completion"]
PATHS: dict[UpstreamEndpoint, str] = {"chat": "/chat/completions", "completion": "/completions"}
MAX_MESSAGE_CHARS = 500


class UpstreamFailed(APIError):
    """The upstream failed (5xx), refused the gateway's own key (401/403), or could not be reached."""

    status_code = 502
    error_type = "upstream_error"


class UpstreamTimeout(APIError):
    status_code = 504
    error_type = "upstream_timeout"


class UpstreamRefused(APIError):
    """A 4xx of the upstream about the request itself: its status, type, message, param and code, relayed."""

    def __init__(self, status: int, error: dict[str, Any], retry_after: float | None) -> None:
        super().__init__(str(error.get("message") or f"the upstream refused the request ({status})"),
                         param=_str_or_none(error.get("param")), code=_str_or_none(error.get("code")),
                         retry_after=retry_after)
        self.status_code = status
        self.error_type = str(error.get("type") or "invalid_request_error")


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def upstream_error(response: httpx.Response, body: bytes) -> APIError:
    """The gateway's error for an upstream answer with an error status (its body already read)."""
    status = response.status_code
    error = _error_object(body)
    if 400 <= status < 500 and status not in (401, 403):
        retry = response.headers.get("retry-after")
        return UpstreamRefused(status, error, float(retry) if retry and retry.isdigit() else None)
    message = str(error.get("message") or "")[:MAX_MESSAGE_CHARS]
    return UpstreamFailed(f"the upstream failed ({status}){': ' + message if message else ''}", code="upstream_error")


def _error_object(body: bytes) -> dict[str, Any]:
    """OpenAI's `{"error": {...}}`, a `{"detail": ...}` (FastAPI) or `{"message": ...}` body, else its text."""
    try:
        data = json.loads(body)
    except ValueError:
        return {"message": body.decode("utf-8", "replace")[:MAX_MESSAGE_CHARS]}
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            return error
        if isinstance(error, str):
            return {"message": error}
        detail = data.get("detail") or data.get("message")
        if detail:
            return {"message": detail if isinstance(detail, str) else json.dumps(detail)}
    return {"message": body.decode("utf-8", "replace")[:MAX_MESSAGE_CHARS]}


def transport_error(exc: httpx.HTTPError, base_url: str) -> APIError:
    """A failed exchange with the upstream (no HTTP status): 504 when it was too slow, 502 otherwise."""
    if isinstance(exc, httpx.TimeoutException):
        what = "connect" if isinstance(exc, httpx.ConnectTimeout) else "answer"
        return UpstreamTimeout(f"the upstream at {base_url} did not {what} in time ({type(exc).__name__})",
                               code="upstream_timeout")
    return UpstreamFailed(f"the upstream at {base_url} failed: {type(exc).__name__}: {exc}", code="upstream_error")


class UpstreamClient:
    """One pooled HTTP client for the upstream, owned by the app's lifespan; safe for concurrent requests.

    Build it in a thread (`asyncio.to_thread(UpstreamClient, settings)`): httpx reads the CA bundle at start.
    """

    def __init__(self, settings: Settings) -> None:
        assert settings.upstream_url is not None
        self.base_url = settings.upstream_url
        headers = {"Content-Type": "application/json"}
        if settings.upstream_api_key is not None:
            headers["Authorization"] = f"Bearer {settings.upstream_api_key.get_secret_value()}"
        timeout = httpx.Timeout(settings.upstream_read_timeout, connect=settings.upstream_connect_timeout)
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout,
                                         follow_redirects=False)

    async def close(self) -> None:
        await self._client.aclose()

    async def complete(self, endpoint: UpstreamEndpoint, body: dict[str, Any]) -> dict[str, Any]:
        """A whole answer: the upstream's JSON object, as it sent it."""
        try:
            response = await self._client.post(PATHS[endpoint], content=json.dumps(body))
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.base_url) from exc
        if response.status_code >= 400:
            raise upstream_error(response, response.content)
        try:
            answer = response.json()
        except ValueError as exc:
            raise UpstreamFailed("the upstream's answer is not JSON", code="upstream_error") from exc
        if not isinstance(answer, dict):
            raise UpstreamFailed("the upstream's answer is not a JSON object", code="upstream_error")
        return answer

    async def open_stream(self, endpoint: UpstreamEndpoint, body: dict[str, Any]) -> UpstreamStream:
        """Send a streamed request; return once the upstream has answered 200 (an error status is raised here)."""
        request = self._client.build_request("POST", PATHS[endpoint], content=json.dumps(body))
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.base_url) from exc
        if response.status_code >= 400:
            try:
                content = await response.aread()
            except httpx.HTTPError as exc:
                raise transport_error(exc, self.base_url) from exc
            finally:
                await response.aclose()
            raise upstream_error(response, content)
        return UpstreamStream(response, self.base_url)


class UpstreamStream:
    """The `data:` payloads of the upstream's SSE answer, up to (without) `[DONE]`; `done` tells whether it came."""

    def __init__(self, response: httpx.Response, base_url: str) -> None:
        self._response = response
        self._base_url = base_url
        self.done = False

    async def data(self) -> AsyncIterator[str]:
        """Each event's data, in order; transport failures are raised as the gateway's 502/504 errors."""
        lines: list[str] = []
        try:
            async for line in self._response.aiter_lines():
                if line.startswith("data:"):
                    lines.append(line[5:].removeprefix(" "))
                    continue
                if line or not lines:  # a comment, an `event:`/`id:` field, or a blank line between events
                    continue
                payload = "\n".join(lines)
                lines = []
                if payload.strip() == "[DONE]":
                    self.done = True
                    return
                yield payload
            if lines:  # a last event without its blank line
                if "\n".join(lines).strip() == "[DONE]":
                    self.done = True
                else:
                    yield "\n".join(lines)
        except httpx.HTTPError as exc:
            raise transport_error(exc, self._base_url) from exc

    async def aclose(self) -> None:
        await self._response.aclose()
