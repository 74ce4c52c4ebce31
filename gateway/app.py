"""`create_app(settings)`: the FastAPI app; its lifespan owns registry, engine and services."""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

from core.adapter_store import AdapterStore
from core.basemodel import base_model_dir
from core.config import Settings
from gateway import __version__
from gateway.discovery.routes import router as discovery_router
from gateway.discovery.service import PromptDiscovery
from gateway.engines.base import Engine
from gateway.engines.inflight import AdapterUse
from gateway.engines.merged import MergedRoutes
from gateway.errors import APIError, PayloadTooLarge, error_json, register_exception_handlers
from gateway.jobs import JobRunner
from gateway.matcher import Matcher
from gateway.metrics import GatewayMetrics
from gateway.openai_api.planning import Planner
from gateway.openai_api.routes import router as openai_router
from gateway.openai_api.serving import InferenceService
from gateway.openai_api.shadow import ShadowGuard
from gateway.prompts.follower import RegistryFollower
from gateway.prompts.merged import MergedServing
from gateway.prompts.recording import TrafficRecorder
from gateway.prompts.routes import router as prompts_router
from gateway.prompts.service import PromptService
from gateway.registry.store import PromptRegistry
from gateway.tokens import TokenCounter, UpstreamCalibration
from gateway.upstream import UpstreamClient

log = logging.getLogger(__name__)
DOCS_ASSETS = "/docs/assets"


def build_engine(settings: Settings) -> Engine:
    model_dir = base_model_dir(settings)
    if settings.engine == "vllm":
        from gateway.engines.vllm import VLLMEngine

        return VLLMEngine(settings)
    from gateway.engines.embedded import EmbeddedEngine

    return EmbeddedEngine(model_dir, max_lora_rank=settings.max_lora_rank, max_model_len=settings.max_model_len,
                          default_max_tokens=settings.default_max_tokens, threads=settings.torch_threads,
                          max_queued_requests=settings.max_queued_requests)


UPLOAD_ROUTE = re.compile(r"/v1/prompts/[^/]+/adapters")


class _UploadTooLarge(Exception):
    """Raised into the app when a chunked upload passes its limit; BodySizeLimit answers it with a 413."""


class BodySizeLimit:
    """Refuse bodies over the limit with a 413 (plain ASGI: no per-request task).

    A request that declares its Content-Length is judged by it before anything is read. One that does not
    (chunked transfer encoding) is read here up to the limit and handed on from memory; past the limit it is
    answered 413 without reading further. The app reads whole bodies anyway, so nothing extra is held.
    Adapter uploads (`POST /v1/prompts/{name}/adapters`) have their own, larger limit; the app spools them to
    disk, so a chunked one is counted as the app reads it instead of being held here.
    """

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int | None = None) -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = max(limit, upload_limit or limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["method"] == "POST" and UPLOAD_ROUTE.fullmatch(scope["path"]) is not None
        limit = self.upload_limit if upload else self.limit
        length = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        declared = int(length) if length is not None and length.isdigit() else None
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, limit)
            return
        if declared is not None or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        if upload:
            await self._counted(scope, receive, send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send, self.limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        size = 0
        started = False

        async def counting() -> Message:
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            if size > limit:
                raise _UploadTooLarge
            return message

        async def watching(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting, watching)
        except _UploadTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send, limit)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = error_json(PayloadTooLarge(f"the request body is larger than {limit} bytes",
                                              code="request_too_large"))
        await response(scope, receive, send)


class Readiness(BaseModel):
    """`/ready`'s answer: each dependency up or down, never why (it is unauthenticated; the log says why)."""

    status: Literal["ready", "not_ready"]
    engine: Literal["up", "down"]
    registry: Literal["up", "down"]


async def engine_is_up(engine: Engine) -> bool:
    try:
        await engine.check_ready()
    except APIError as exc:
        log.warning("not ready: the %s engine is down: %s", engine.name, exc.message)
        return False
    except Exception:  # a readiness probe answers "down" whatever failed, and logs it
        log.exception("not ready: the %s engine's readiness check failed", engine.name)
        return False
    return True


async def registry_is_up(registry: PromptRegistry) -> bool:
    try:
        await asyncio.to_thread(registry.ping)
    except Exception:  # whatever the database driver raises
        log.exception("not ready: the registry does not answer")
        return False
    return True


def mount_docs(app: FastAPI) -> None:
    """Swagger UI at `/docs` from the files of the swagger-ui-bundle-v2 package, not a CDN: it works offline."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API docs",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon-32x32.png",
            oauth2_redirect_url=None,
            swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True},
        )


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app; nothing is loaded until the lifespan starts."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Files, the database and the model are read in threads: the loop stays free from the first moment.
        await asyncio.to_thread(settings.data_dir.mkdir, parents=True, exist_ok=True)
        # The first guess of a static file's type reads the system's MIME tables: once, here, not in a request.
        await asyncio.to_thread(mimetypes.init)
        model_dir = await asyncio.to_thread(base_model_dir, settings)
        metrics = GatewayMetrics(max_prompts=settings.metrics_max_prompts, tenants=settings.tenants)
        registry = await asyncio.to_thread(lambda: PromptRegistry(settings.resolved_database_url))
        store = await asyncio.to_thread(AdapterStore, settings.adapter_dir)
        the_engine = engine if engine is not None else await asyncio.to_thread(build_engine, settings)
        routes = MergedRoutes(the_engine, settings) if settings.engine == "vllm" else None
        if routes is not None:  # prompts served merged: their own vLLM, else this one (LoRA)
            the_engine = routes
        await the_engine.start()
        counter = await asyncio.to_thread(TokenCounter.from_model_dir, model_dir)
        upstream = None if settings.upstream_url is None else await asyncio.to_thread(UpstreamClient, settings)

        # The runner reaches the service through these callbacks only, first called after `runner.start()`.
        async def activate_trained(name: str, version: int, path: Path, manifest: dict[str, Any]) -> bool:
            return await prompts.activate_trained(name, version, path, manifest)

        async def versions_changed() -> None:  # serve a version this replica's runner published at once
            await follower.catch_up()
            await prompts.refresh_gauge()

        runner = JobRunner(settings, registry, store, model_dir, activate=activate_trained,
                           versions_changed=versions_changed, share_cores=getattr(the_engine, "share_cores", None))
        in_flight = AdapterUse()

        def adapter_of(name: str) -> str | None:
            entry = prompts.routable(name)
            return entry.adapter if entry is not None else None

        merged = None if routes is None else MergedServing(settings, registry, store, routes, model_dir, in_flight,
                                                           adapter_of)
        prompts = PromptService(settings, registry, store, the_engine, Matcher(), counter, metrics, runner, in_flight,
                                merged=lambda: merged)
        follower = RegistryFollower(registry, prompts.follow, settings.registry_poll_seconds)
        app.state.settings = settings
        app.state.metrics = metrics
        app.state.registry = registry
        app.state.engine = the_engine
        app.state.prompts = prompts
        app.state.jobs = runner
        calibration = UpstreamCalibration()  # the upstream's token counts per prompt, learnt from its usage
        app.state.planner = Planner(settings, prompts, counter, metrics, calibration)
        recorder = TrafficRecorder(registry, prompts.routable)
        app.state.recorder = recorder
        shadow = ShadowGuard(the_engine, in_flight, registry, metrics, prompts.routable, versions_changed,
                             upstream=upstream, recorder=recorder, concurrency=settings.shadow_concurrency)
        app.state.shadow = shadow
        app.state.inference = InferenceService(settings, the_engine, metrics, in_flight, upstream, recorder, shadow,
                                               calibration)
        app.state.follower = follower
        discovery = PromptDiscovery(settings, registry, counter, metrics) if settings.discovery else None
        app.state.discovery = discovery  # passthrough requests mined for recurring prompts
        app.state.started_at = int(time.time())
        await follower.mark_synced()
        await prompts.sync()
        await follower.start()
        await recorder.start()
        await shadow.start()
        await runner.start()
        if discovery is not None:
            await discovery.start()
        if merged is not None:
            await merged.start()
        log.info("gateway ready: engine=%s, %d prompt(s)", the_engine.name, len(prompts.matcher))
        try:
            yield
        finally:
            await follower.close()
            await shadow.close()
            if discovery is not None:
                await discovery.close()
            if merged is not None:
                await merged.close()
            await recorder.close()
            await runner.close()
            await prompts.close()
            await the_engine.close()
            if upstream is not None:
                await upstream.close()
            await asyncio.to_thread(registry.close)

    app = FastAPI(
        title="PromptIntern gateway",
        version=__version__,
        description="OpenAI-compatible gateway that answers registered recurring prompts from LoRA adapters "
                    "trained to internalise them, so the long prompt is no longer sent (arXiv 2407.02211).",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    mount_docs(app)
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes, upload_limit=settings.max_upload_bytes)
    register_exception_handlers(app)
    app.include_router(openai_router)
    app.include_router(discovery_router)  # before the registry's: `candidates` is not a prompt's name
    app.include_router(prompts_router)

    @app.get("/health", tags=["Operations"], summary="The process is alive")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["Operations"], summary="Engine reachable and registry open", response_model=Readiness,
             responses={503: {"model": Readiness, "description": "Not ready: what is down (why: in the log)"}})
    async def ready(request: Request) -> JSONResponse:
        engine_up = await engine_is_up(request.app.state.engine)
        registry_up = await registry_is_up(request.app.state.registry)
        body = Readiness(status="ready" if engine_up and registry_up else "not_ready",
                         engine="up" if engine_up else "down", registry="up" if registry_up else "down")
        return JSONResponse(body.model_dump(), status_code=200 if body.status == "ready" else 503)

    @app.get("/metrics", tags=["Operations"], summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
