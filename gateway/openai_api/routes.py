"""OpenAI-compatible routes: parse, call the inference service, answer JSON or SSE."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from gateway.auth import api_bearer, request_tenant, require_api_key
from gateway.errors import ERROR_RESPONSES, ErrorResponse
from gateway.openai_api.planning import Plan, Planner
from gateway.openai_api.protocol import ChatCompletionRequest, CompletionRequest
from gateway.openai_api.relay import RelayedStream
from gateway.openai_api.responses import ChatCompletionResponse, CompletionResponse, ModelCard, ModelList
from gateway.openai_api.serving import InferenceService, StreamedAnswer


class JSONBodyRoute(APIRoute):
    """A route whose endpoint is `(request, body: <pydantic model>)` behind the API key check: the common request
    (JSON content type, a valid body) skips FastAPI's dependency resolution and is parsed by pydantic straight
    from its bytes, several times cheaper per request; any other request (an invalid body, another content type,
    an unusual encoding) goes through FastAPI's own handler, so its refusals are FastAPI's, unchanged. The OpenAPI
    document is FastAPI's: it is built from the route's declaration, which this class leaves alone."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        params = self.dependant.body_params
        model = params[0].field_info.annotation if len(params) == 1 else None
        own = [d.call for d in self.dependant.dependencies]
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or own != [require_api_key]:
            return handler
        endpoint = self.endpoint
        body_model: type[BaseModel] = model

        async def fast(request: Request) -> Response:
            content_type = request.headers.get("content-type", "")
            if content_type != "application/json" and not content_type.startswith("application/json;"):
                return await handler(request)
            await require_api_key(request, await api_bearer(request))
            try:
                body = body_model.model_validate_json(await request.body())
            except ValidationError:  # FastAPI's handler refuses it as it always has (its body is read already)
                return await handler(request)
            response: Response = await endpoint(request, body)
            return response

        return fast


router = APIRouter(prefix="/v1", tags=["OpenAI"], dependencies=[Depends(require_api_key)],
                   responses=ERROR_RESPONSES, route_class=JSONBodyRoute)

GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks ending in `[DONE]` when `stream`"},
    429: {"model": ErrorResponse, "description": "The engine's queue is full: retry after `Retry-After` seconds",
          "headers": {"Retry-After": {"description": "Seconds to wait before retrying",
                                      "schema": {"type": "integer"}}}},
    502: {"model": ErrorResponse, "description": "An upstream model's provider failed (5xx), refused the gateway's "
                                                 "key (401/403) or could not be reached; its status is in the message"},
    504: {"model": ErrorResponse, "description": "An upstream model's provider was slower than UPSTREAM_*_TIMEOUT"},
}


def services(request: Request) -> tuple[Planner, InferenceService]:
    """The app's planner and inference service (read here rather than as dependencies: each dependency FastAPI
    resolves costs a generation request tens of microseconds)."""
    state = request.app.state
    return state.planner, state.inference


class AnswerEventStream(EventSourceResponse):
    """SSE that closes its answer when the response ends for any reason, the client leaving included (even before
    the first byte), so the engine stops generating for nobody at once rather than at garbage collection."""

    body_iterator: StreamedAnswer | RelayedStream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def client_gone(receive: Receive) -> None:
    """Return once the client has closed its connection (ASGI's `http.disconnect`); the body is already read."""
    while (await receive())["type"] != "http.disconnect":
        continue


async def _answer(request: Request, service: InferenceService, plan: Plan, stream: bool,
                  include_usage: bool) -> Response:
    started = time.perf_counter()
    if plan.route == "passthrough" and (discovery := getattr(request.app.state, "discovery", None)) is not None:
        discovery.offer(plan)  # a fingerprint and an enqueue: mined in the background
    if plan.upstream:  # relayed as the client sent it (also the fallback of an adapter that fails)
        plan = replace(plan, upstream_body=await request.json())
    if not stream:
        plan, body = await service.complete(plan, started, partial(client_gone, request.receive))
        content = json.dumps(body) if isinstance(body, dict) else body.model_dump_json()
        return Response(content, media_type="application/json", headers=plan.headers())
    plan, answer = await service.open_stream(plan, started, include_usage, partial(client_gone, request.receive))
    return AnswerEventStream(answer, headers={**plan.headers(), "cache-control": "no-cache"})


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=GENERATION_RESPONSES,
             summary="Chat completion; a registered prompt is answered by its adapter from the bare query")
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    planner, service = services(request)
    plan = planner.planned(planner.plan_chat, body, request_tenant(request))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _answer(request, service, plan, body.stream, include_usage)


@router.post("/completions", response_model=CompletionResponse, responses=GENERATION_RESPONSES,
             summary="Text completion; a registered completion template is answered by its adapter")
async def completions(request: Request, body: CompletionRequest) -> Response:
    planner, service = services(request)
    plan = planner.planned(planner.plan_completion, body, request_tenant(request))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _answer(request, service, plan, body.stream, include_usage)


@router.get("/models", response_model=ModelList,
            summary="The base model, then every ready adapter the caller may use as `<prompt>@v<N>` (global "
                    "prompts' and the caller's tenant's), then the upstream's models named in UPSTREAM_MODELS")
async def list_models(request: Request) -> ModelList:
    settings = request.app.state.settings
    created = request.app.state.started_at
    base = settings.served_model_name
    cards = [ModelCard(id=base, created=created, root=base)]
    cards += [ModelCard(id=model, created=created, root=base, parent=base)
              for model in request.app.state.prompts.adapter_models(request_tenant(request))]
    if settings.upstream_url is not None:
        cards += [ModelCard(id=model, created=created, owned_by="upstream") for model in settings.upstream_models]
    return ModelList(data=cards)
