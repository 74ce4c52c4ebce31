"""PromptService: registers prompts and their adapters, and keeps matcher, engine and registry in step."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from core.adapter_store import AdapterStore
from core.config import Settings
from core.errors import DomainError, InvalidInput, NotFoundError
from core.templates import PromptTemplate, TemplateError, parse_template
from gateway.engines.base import AdapterLoadError, Engine, EngineRequest, EngineUnavailable, SamplingParams
from gateway.engines.inflight import AdapterUse
from gateway.errors import APIError, Unprocessable
from gateway.jobs import TrainingJobs, prepare_train_spec
from gateway.matcher import Match, Matcher
from gateway.metrics import GatewayMetrics
from gateway.prompts.imports import (
    AdapterFiles,
    adapter_from_upload,
    open_import_adapter,
    read_import_jsonl,
    stage_adapter,
)
from gateway.prompts.merged import MergedServing
from gateway.prompts.protocol import (
    PatchPrompt,
    PromptOut,
    RegisterPrompt,
    ServingOut,
    ServingSetting,
    TrafficList,
    TrainSpec,
)
from gateway.prompts.records import (
    adapter_model_id,
    guard_out,
    guard_setting,
    inference_mode,
    job_out,
    record_out,
    record_setting,
    settings_fields,
    takes_bare_query,
    template_from_record,
    validate_examples,
    version_out,
)
from gateway.prompts.routing import RoutablePrompt, RoutingTable
from gateway.registry.db import utcnow
from gateway.registry.store import (
    JobRecord,
    PromptRecord,
    PromptRegistry,
    TrafficRecord,
    VersionRecord,
    check_prompt_name,
)
from gateway.tokens import TokenCounter
from trainer.jobspec import TrainData

log = logging.getLogger(__name__)
LOADING_STALE_AFTER = timedelta(minutes=15)  # a version `loading` this long lost its loader (another replica's too)


class PromptService:
    """Owns the routing table; every change goes registry first, then engine, then routing."""

    def __init__(self, settings: Settings, registry: PromptRegistry, store: AdapterStore, engine: Engine,
                 matcher: Matcher, counter: TokenCounter, metrics: GatewayMetrics, jobs: TrainingJobs,
                 in_flight: AdapterUse, merged: Callable[[], MergedServing | None] = lambda: None) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.engine = engine
        self.routing = RoutingTable(matcher)
        self.counter = counter
        self.metrics = metrics
        self._lock = asyncio.Lock()
        self._gauge_lock = asyncio.Lock()
        self.jobs = jobs
        self.in_flight = in_flight
        self._retiring: set[asyncio.Task[None]] = set()  # old versions draining before their unload
        self._merged = merged  # merged serving (ENGINE=vllm only)

    # -- routing table (see gateway.prompts.routing) ------------------------------------------

    @property
    def matcher(self) -> Matcher:
        """The global prompts' matcher (each tenant's own prompts have one more)."""
        return self.routing.matcher

    def routable(self, name: str) -> RoutablePrompt | None:
        return self.routing.get(name)

    def by_adapter_model(self, model: str, tenant: str | None = None) -> RoutablePrompt | None:
        return self.routing.by_adapter_model(model, tenant)

    def adapter_models(self, tenant: str | None = None) -> list[str]:
        return self.routing.adapter_models(tenant)

    def match_chat(self, messages: list[tuple[str, str]], tenant: str | None = None) -> Match | None:
        return self.routing.match_chat(messages, tenant)

    def match_completion(self, prompt: str, tenant: str | None = None) -> Match | None:
        return self.routing.match_completion(prompt, tenant)

    def static_tokens(self, entry: RoutablePrompt) -> int:
        """The template's tokens without slot values: counted at registration, or, for a prompt loaded at
        start-up, at its first match here (once: a few milliseconds for a long template)."""
        if entry.static_tokens is not None:
            return entry.static_tokens
        counted = replace(entry, static_tokens=self.counter.static_tokens(entry.template))
        if self.routing.get(entry.name) is entry:
            self.routing.publish(entry.name, counted)
        assert counted.static_tokens is not None
        return counted.static_tokens

    def _publish(self, entry: RoutablePrompt | None, name: str) -> None:
        if entry is not None and self.routing.get(name) is None:
            self.metrics.track_prompt(name, entry.tenant)
        self.routing.publish(name, entry)

    async def refresh_gauge(self) -> None:
        """Set the adapter gauge from the registry (queried in a thread); one refresh at a time, so the last to
        run, which read after the latest change, is the one that stays."""
        async with self._gauge_lock:
            self.metrics.set_adapter_counts(await asyncio.to_thread(self.registry.adapter_counts))

    # -- start-up ------------------------------------------------------------------------------

    async def sync(self) -> None:
        """Build routing and engine adapters from the registry (start-up). Costs one registry read and one pass
        over the prompts however many there are (100,000 prompts: `promptintern bench matcher --startup`);
        only prompts with a ready version touch the engine."""
        await asyncio.to_thread(self.settings.resolved_import_dir.mkdir, parents=True, exist_ok=True)
        leftovers = await asyncio.to_thread(self.store.remove_staging_leftovers)
        for path in leftovers:
            log.warning("removed a half-written adapter folder: %s", path)
        records = await asyncio.to_thread(self.registry.routing_records)
        for record in records:
            for version in record.versions:
                # Another replica may be loading a version right now: only one left loading for long was abandoned.
                if version.status == "loading" and utcnow() - version.created > LOADING_STALE_AFTER:
                    await asyncio.to_thread(self.registry.update_version, record.name, version.version,
                                            status="failed", error="interrupted: the gateway stopped while loading")
        entries = await asyncio.to_thread(self._entries, records)
        for entry in entries:
            self.metrics.track_prompt(entry.name, entry.tenant)
        self.routing.publish_many(entries)
        for record in records:
            if any(v.status == "ready" for v in record.versions):
                await self._activate_newest(record.name)
        await self.refresh_gauge()

    @staticmethod
    def _entries(records: list[PromptRecord]) -> list[RoutablePrompt]:
        """Blocking: each prompt's routing entry, without an adapter yet; its static tokens are counted at its
        first match (tokenising 100,000 long templates would take minutes of start-up)."""
        return [RoutablePrompt(r.name, template_from_record(r), None, None, tenant=r.tenant,
                               **settings_fields(r.record, r.guard))
                for r in records]

    async def close(self) -> None:
        """Stop draining old versions (the engine closes next anyway)."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)

    # -- following the other replicas ----------------------------------------------------------

    async def follow(self, names: frozenset[str] | None) -> None:
        """Make routing and engine match the registry for prompts another replica (or this one) changed;
        `None`: for every prompt. A local change is found already applied, so this does nothing for it."""
        if names is None:
            records = await asyncio.to_thread(self.registry.all)
            names = frozenset({r.name for r in records} | set(self.routing.names()))
        for name in sorted(names):
            try:
                async with self._lock:
                    await self._follow_one(name)
            except Exception:  # one prompt's trouble must not stop the others from being followed
                log.exception("could not follow the registry's change of prompt %s", name)
        merged = self._merged()
        if merged is not None:
            merged.kick()
        await self.refresh_gauge()

    async def _follow_one(self, name: str) -> None:
        try:
            record = await asyncio.to_thread(self.registry.get, name)
        except NotFoundError:
            entry = self.routing.get(name)
            if entry is not None:
                log.info("prompt %s was deleted through another replica: no longer routed", name)
                self._publish(None, name)
                await self.jobs.cancel(name)
                for model_id in [m for m in self.engine.loaded_adapters() if m.startswith(f"{name}@v")]:
                    self._retire(model_id)
            return
        entry = self.routing.get(name)
        template = template_from_record(record)
        if entry is None or entry.template.digest() != template.digest() or entry.tenant != record.tenant:
            static = await asyncio.to_thread(self.counter.static_tokens, template)
            self._publish(RoutablePrompt(name, template, static, entry.adapter if entry else None,
                                         entry.bare if entry else True, record.tenant), name)
        settings = settings_fields(record.record, record.guard)
        entry = self.routing.require(name)
        if any(getattr(entry, key) != value for key, value in settings.items()):
            self._publish(replace(entry, **settings), name)
        current = self.routing.require(name).adapter
        ready = [v for v in record.versions if v.status == "ready"]
        if current is not None and ready and adapter_model_id(name, ready[-1].version) == current:
            return  # already serving the newest ready version
        for version in reversed(ready):
            model_id = adapter_model_id(name, version.version)
            if model_id == current:
                return  # a newer one did not load here: stay on this one
            try:
                if model_id not in self.engine.loaded_adapters():  # a version's folder never changes: no reload
                    await self._load_and_warm(model_id, Path(version.path or ""))
            except EngineUnavailable as exc:
                log.warning("engine unavailable (%s); %s will be loaded when it is back", exc.message, model_id)
            except APIError as exc:
                # Loaded elsewhere, not here (a file not yet visible on this replica?): try an older one.
                log.error("adapter %s (ready in the registry) does not load on this replica: %s", model_id,
                          exc.message)
                continue
            log.info("following the registry: %s now answers %s", model_id, name)
            await self._replace_active(name, model_id, takes_bare_query(version.manifest))
            return
        if current is not None:  # no ready version any more (rolled back to none, all failed)
            self._set_adapter(name, None)
            self._retire(current)

    async def _activate_newest(self, name: str) -> None:
        """Load the newest ready version that still loads; mark those that no longer do as failed."""
        record = await asyncio.to_thread(self.registry.get, name)
        for version in reversed([v for v in record.versions if v.status == "ready"]):
            model_id = adapter_model_id(name, version.version)
            try:
                await self._load_and_warm(model_id, Path(version.path or ""))
            except EngineUnavailable as exc:
                # The engine remembers the adapter and loads it when it is back; until then: fallback.
                log.warning("engine unavailable (%s); %s will be loaded when it is back", exc.message, model_id)
                self._set_adapter(name, model_id, takes_bare_query(version.manifest))
                return
            except APIError as exc:
                log.error("adapter %s no longer loads: %s", model_id, exc.message)
                await asyncio.to_thread(self.registry.update_version, name, version.version, status="failed",
                                        error=f"failed to load at start-up: {exc.message}")
                continue
            self._set_adapter(name, model_id, takes_bare_query(version.manifest))
            return

    def _set_adapter(self, name: str, model_id: str | None, bare: bool = True) -> None:
        entry = self.routing.get(name)
        if entry is not None:
            self._publish(replace(entry, adapter=model_id, bare=bare), name)

    async def _load_and_warm(self, model_id: str, path: Path) -> None:
        await self.engine.load_adapter(model_id, path)
        if not self.settings.warm_adapters:
            return
        try:
            request = EngineRequest(kind="chat", messages=[{"role": "user", "content": "hello"}], adapter=model_id,
                                    params=SamplingParams(max_tokens=1, temperature=0.0))
            async for _ in self.engine.generate(request):
                pass
        except EngineUnavailable:
            raise
        except APIError:
            await self.engine.unload_adapter(model_id)
            raise

    # -- registry operations -------------------------------------------------------------------

    async def list_prompts(self) -> list[PromptRecord]:
        return await asyncio.to_thread(self.registry.all)

    async def get_prompt(self, name: str) -> PromptRecord:
        return await asyncio.to_thread(self.registry.get, name)

    async def register(self, body: RegisterPrompt) -> PromptRecord:
        check_prompt_name(body.name)
        if body.tenant is not None and body.tenant not in self.settings.tenants:
            known = ", ".join(sorted(self.settings.tenants)) or "none configured"
            raise Unprocessable(f"unknown tenant '{body.tenant}': a tenant is named by PROMPTINTERN_API_KEYS "
                                f"entries `tenant:key` (tenants: {known})", param="tenant", code="unknown_tenant")
        try:
            template = parse_template(
                messages=[m.model_dump() for m in body.messages] if body.messages is not None else None,
                prompt=body.prompt, max_chars=self.settings.max_template_chars)
        except TemplateError as exc:
            raise Unprocessable(str(exc), param=exc.param or "messages", code="invalid_template") from exc
        examples = validate_examples(template, body.examples)
        if body.train is not None and body.adapter_path is not None:
            raise Unprocessable("give 'adapter_path' or 'train', not both", param="train", code="invalid_value")
        if body.train is not None and body.train.source is not None:
            raise Unprocessable("a prompt being registered has no recorded traffic to train on yet",
                                param="train.source", code="invalid_train_data")
        train_spec = None if body.train is None else await self._prepare_training(template, body.train)
        files = None if body.adapter_path is None else await self._open_import(body.adapter_path)
        try:
            return await self._register_checked(body, template, examples, files, train_spec)
        finally:
            if files is not None:
                files.close()

    async def _register_checked(self, body: RegisterPrompt, template: PromptTemplate, examples: list[dict[str, str]],
                                files: AdapterFiles | None, train_spec: TrainData | None) -> PromptRecord:
        async with self._lock:
            recording = record_setting(body.record)
            record = await asyncio.to_thread(self.registry.create, body.name, template.kind, template.source(),
                                             examples, body.tenant, recording)
            static = await asyncio.to_thread(self.counter.static_tokens, template)
            self._publish(RoutablePrompt(body.name, template, static, None, tenant=body.tenant,
                                         **settings_fields(recording, None)), body.name)
            if files is not None:
                try:
                    await self._add_adapter_locked(body.name, files)
                except (APIError, DomainError):
                    # Registration and adapter are one request: undo both, so a retry can succeed.
                    await self._delete_locked(body.name)
                    raise
            if train_spec is not None:
                await self.jobs.submit(body.name, train_spec)
            await self.refresh_gauge()
        return await asyncio.to_thread(self.registry.get, record.name)

    async def train(self, name: str, spec: TrainSpec) -> JobRecord:
        """Queue a training job for a registered prompt (validated now, trained in order)."""
        record = await asyncio.to_thread(self.registry.get, name)
        traffic = spec.source == "traffic"
        if traffic:
            spec = await self._traffic_spec(name, spec)
        elif spec.data is None and spec.path is None:
            raise Unprocessable("give exactly one of 'data' (rows), 'path' (a server-side JSONL file) or "
                                "'source': 'traffic' (the recorded answers)", param="train", code="invalid_train_data")
        prepared = await self._prepare_training(template_from_record(record), spec)
        if traffic:  # the promotion gate applies to it
            prepared = prepared.model_copy(update={"source": "traffic"})
        return await self.jobs.submit(name, prepared)

    async def _traffic_spec(self, name: str, spec: TrainSpec) -> TrainSpec:
        """The prompt's recorded answers as the job's rows (self-distillation: the answer served is the label),
        copied into the job now, so a purge while it waits or trains changes nothing for it."""
        if spec.data is not None or spec.path is not None:
            raise Unprocessable("give exactly one of 'data', 'path' or 'source'", param="train",
                                code="invalid_train_data")
        if spec.eval_fraction <= 0:
            raise Unprocessable("training from traffic holds recorded rows out for the promotion gate: "
                                "eval_fraction must be above 0", param="train.eval_fraction",
                                code="invalid_train_data")
        _, recorded = await asyncio.to_thread(self.registry.traffic, name)
        minimum = self.settings.min_traffic_rows
        if len(recorded) < minimum:
            raise Unprocessable(f"prompt '{name}' has {len(recorded)} recorded answer(s); training from traffic "
                                f"needs at least {minimum} (MIN_TRAFFIC_ROWS)", param="train.source",
                                code="not_enough_traffic")
        rows = [{**row.slots, "response": row.response} for row in reversed(recorded)]  # oldest first
        return spec.model_copy(update={"data": rows, "source": None})

    async def _prepare_training(self, template: PromptTemplate, spec: TrainSpec) -> TrainData:
        """Validate a `train` object; a `path` is read here, from IMPORT_DIR only, and its rows handed on."""
        if spec.path is None or spec.data is not None:
            return await asyncio.to_thread(prepare_train_spec, template, spec)
        rows = await asyncio.to_thread(read_import_jsonl, self.settings.resolved_import_dir, spec.path,
                                       max_bytes=self.settings.max_upload_bytes)
        try:
            return await asyncio.to_thread(prepare_train_spec, template,
                                           spec.model_copy(update={"data": rows, "path": None}))
        except InvalidInput as exc:  # the rows came from the file: name it, not `data`
            param = exc.param.replace("train.data", "train.path", 1) if exc.param else exc.param
            raise InvalidInput(exc.message, param=param, code=exc.code) from exc

    async def activate_trained(self, name: str, version: int, path: Path, manifest: dict[str, Any]) -> bool:
        """Load and warm a freshly trained version on this replica (the job runner staged it `loading`). The runner
        then publishes it, `ready` under its job's lease, and this replica routes to it as it follows the registry
        (at once: the runner's `versions_changed` catches up), the others within REGISTRY_POLL_SECONDS. False if
        it did not load (why: in the log); the old version stays in service."""
        model_id = adapter_model_id(name, version)
        try:
            async with self._lock:
                await self._load_and_warm(model_id, path)
        except APIError as exc:
            log.error("trained adapter %s did not load: %s", model_id, exc.message)
            return False
        return True

    async def add_adapter(self, name: str, adapter_path: str) -> VersionRecord:
        """Import an adapter folder from IMPORT_DIR as the prompt's next version; it answers once loaded and warmed."""
        await asyncio.to_thread(self.registry.get, name)
        with await self._open_import(adapter_path) as files:
            return await self._add_checked(name, files)

    async def upload_adapter(self, name: str, parts: Mapping[str, BinaryIO]) -> VersionRecord:
        """An adapter uploaded as files (no shared filesystem needed), checked exactly like an import."""
        await asyncio.to_thread(self.registry.get, name)
        files = await asyncio.to_thread(adapter_from_upload, parts, max_rank=self.settings.max_lora_rank)
        return await self._add_checked(name, files)

    async def _open_import(self, adapter_path: str) -> AdapterFiles:
        return await asyncio.to_thread(open_import_adapter, self.settings.resolved_import_dir, adapter_path,
                                       max_rank=self.settings.max_lora_rank, max_bytes=self.settings.max_upload_bytes)

    async def _add_checked(self, name: str, files: AdapterFiles) -> VersionRecord:
        async with self._lock:
            version = await self._add_adapter_locked(name, files)
            await self.refresh_gauge()
        return await asyncio.to_thread(self.registry.get_version, name, version)

    async def _add_adapter_locked(self, name: str, files: AdapterFiles) -> int:
        record = await asyncio.to_thread(self.registry.get, name)
        version = await asyncio.to_thread(self.registry.allocate_version, name, "loading", "upload", self.store)
        await self.refresh_gauge()
        model_id = adapter_model_id(name, version)
        started = time.monotonic()
        manifest: dict[str, Any] = {
            "prompt": name, "version": version, "source": "upload", "uploaded_from": files.origin,
            "prompt_hash": template_from_record(record).digest(), "base_model": self.settings.served_model_name,
            "inference": inference_mode(files.manifest),
        }
        try:
            path = await asyncio.to_thread(stage_adapter, self.store, files, name, version,
                                           self.settings.served_model_name, manifest)
            await self._load_and_warm(model_id, path)
        except (APIError, DomainError, OSError, ValueError) as exc:
            message = exc.message if isinstance(exc, APIError | DomainError) else f"{type(exc).__name__}: {exc}"
            await self._set_status(name, model_id, version, status="failed", error=message)
            await asyncio.to_thread(self.store.remove_version, name, version)
            if isinstance(exc, APIError | DomainError):
                raise
            raise AdapterLoadError(message, param="adapter_path", code="invalid_adapter") from exc
        manifest["load_seconds"] = round(time.monotonic() - started, 3)
        await self._set_status(name, model_id, version, status="ready", path=str(path), manifest=manifest)
        await self._replace_active(name, model_id, takes_bare_query(manifest))
        return version

    async def _set_status(self, name: str, model_id: str, version: int, **changes: Any) -> None:
        """Record how adding `version` ended. If the prompt was deleted meanwhile (on another replica: the lock
        here is per replica), that delete may have run before this version's folder was published and its
        adapter loaded here: both are removed, and the caller gets the 404."""
        try:
            await asyncio.to_thread(self.registry.update_version, name, version, **changes)
        except NotFoundError:
            if model_id in self.engine.loaded_adapters():
                try:
                    await self.engine.unload_adapter(model_id)
                except APIError as exc:
                    log.warning("unloading %s, whose prompt was deleted, failed: %s", model_id, exc.message)
            await asyncio.to_thread(self.store.remove_orphan_version, name, version)
            raise

    async def _replace_active(self, name: str, model_id: str, bare: bool) -> None:
        """Route to the new version first, then unload the old one once its requests have drained: no window
        without an adapter, and no request cut off."""
        entry = self.routing.get(name)
        previous = entry.adapter if entry else None
        self._set_adapter(name, model_id, bare)
        if previous and previous != model_id:
            self._retire(previous)

    def _retire(self, model_id: str) -> None:
        """Unload an adapter no longer routed to, in the background, after its in-flight requests end (at most
        ADAPTER_DRAIN_SECONDS); not if it is routed to again by then."""
        task = asyncio.create_task(self._drain_and_unload(model_id), name=f"retire {model_id}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _drain_and_unload(self, model_id: str) -> None:
        if not await self.in_flight.drain(model_id, self.settings.adapter_drain_seconds):
            log.warning("%s still had %d request(s) in flight after %.0f s; unloading it anyway", model_id,
                        self.in_flight.count(model_id), self.settings.adapter_drain_seconds)
        if self.routing.routes_to(model_id):
            return  # routed to again meanwhile (a rollback)
        try:
            await self.engine.unload_adapter(model_id)
        except Exception:
            log.exception("unloading %s failed", model_id)

    async def delete(self, name: str) -> None:
        async with self._lock:
            await asyncio.to_thread(self.registry.get, name)
            await self._delete_locked(name)
            await self.refresh_gauge()

    async def _delete_locked(self, name: str) -> None:
        self._publish(None, name)  # routing stops at once
        await self.jobs.cancel(name)
        for model_id in [m for m in self.engine.loaded_adapters() if m.startswith(f"{name}@v")]:
            await self.engine.unload_adapter(model_id)
        versions: list[int] = []
        with contextlib.suppress(NotFoundError):
            record = await asyncio.to_thread(self.registry.delete, name)
            versions = [v.version for v in record.versions]
        await asyncio.to_thread(self.store.remove_prompt, name, versions)
        merged = self._merged()
        if merged is not None:
            merged.kick()  # its merged engine stops (routing to it stopped above)

    # -- settings and recorded traffic ---------------------------------------------------------

    async def patch(self, name: str, body: PatchPrompt) -> PromptRecord:
        """Apply a JSON merge patch of the prompt's settings: present fields replace, `null` turns off."""
        async with self._lock:
            record = await asyncio.to_thread(self.registry.get, name)
            if "record" in body.model_fields_set:
                record = await asyncio.to_thread(self.registry.set_record, name, record_setting(body.record))
            if "guard" in body.model_fields_set:
                record = await asyncio.to_thread(self.registry.set_guard, name, guard_setting(body.guard))
            if "serving" in body.model_fields_set:
                record = await asyncio.to_thread(self.registry.set_serving, name,
                                                 await self._serving_setting(name, body.serving))
                merged = self._merged()
                if merged is not None:
                    await merged.setting_changed(name)
            entry = self.routing.get(name)
            if entry is not None:  # this replica at once; the others through the change log
                self._publish(replace(entry, **settings_fields(record.record, record.guard)), name)
        return record

    async def _serving_setting(self, name: str, setting: ServingSetting | None) -> dict[str, Any] | None:
        """A `serving` patch checked, as the registry keeps it (None: LoRA)."""
        if setting is None or setting.mode == "lora":
            if setting is not None and setting.url is not None:
                raise Unprocessable("'url' names a merged engine: give it with \"mode\": \"merged\"",
                                    param="serving.url", code="invalid_value")
            return None
        if self.settings.engine != "vllm":
            raise Unprocessable("merged serving needs PROMPTINTERN_ENGINE=vllm (the embedded engine serves adapters "
                                "only)", param="serving.mode", code="merged_needs_vllm")
        if setting.url is not None:
            return {"mode": "merged", "url": merged_engine_url(setting.url)}
        others = [n for n, s in (await asyncio.to_thread(self.registry.merged_prompts)).items()
                  if n != name and s.get("url") is None]
        if len(others) >= self.settings.max_merged_engines:
            raise Unprocessable(
                f"{len(others)} prompt(s) already have a merged engine started by the gateway "
                f"(PROMPTINTERN_MAX_MERGED_ENGINES={self.settings.max_merged_engines}): serve one of them by LoRA "
                "first, or give a `url`", param="serving.mode", code="too_many_merged_engines")
        return {"mode": "merged", "url": None}

    async def traffic(self, name: str, limit: int | None) -> TrafficList:
        total, rows = await asyncio.to_thread(self.registry.traffic, name, limit)
        return TrafficList(total=total, data=[traffic_row(row) for row in rows])

    async def purge_traffic(self, name: str) -> int:
        return await asyncio.to_thread(self.registry.purge_traffic, name)

    # -- views ---------------------------------------------------------------------------------

    def serving_out(self, record: PromptRecord) -> ServingOut:
        merged = self._merged()
        if merged is not None:
            return ServingOut.model_validate(merged.view(record.name, record.serving))
        return ServingOut(requested="merged" if (record.serving or {}).get("mode") == "merged" else "lora",
                          current="lora", url=(record.serving or {}).get("url"), error=None)

    def describe(self, record: PromptRecord) -> PromptOut:
        template = template_from_record(record)
        active = record.active_version
        job = record.jobs[-1] if record.jobs else None
        return PromptOut(
            name=record.name, tenant=record.tenant, kind=template.kind, template=record.template,
            slots=list(template.slots),
            examples=record.examples, status=record.status,
            active_version=active.version if active else None,
            versions=[version_out(v) for v in record.versions],
            job=job_out(job) if job else None,
            record=record_out(record.record),
            guard=guard_out(record.guard),
            serving=self.serving_out(record),
            created=record.created,
        )


def merged_engine_url(url: str) -> str:
    """A merged engine's base URL: http(s), a host, no query; a trailing `/v1` is dropped (the gateway adds it)."""
    parsed = urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
        raise Unprocessable("a merged engine's url is an http(s) base URL such as http://vllm-merged:8000",
                            param="serving.url", code="invalid_url")
    try:
        parsed.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise Unprocessable(f"the url's port is not valid: {exc}", param="serving.url", code="invalid_url") from exc
    path = parsed.path.rstrip("/").removesuffix("/v1").rstrip("/")
    return f"{parsed.scheme}://{parsed.netloc}{path}"


def traffic_row(row: TrafficRecord) -> dict[str, Any]:
    return {**row.slots, "response": row.response, "model": row.model, "created": int(row.created.timestamp())}
