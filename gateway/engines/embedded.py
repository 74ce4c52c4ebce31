"""In-process engine: transformers + peft, several LoRA adapters by name, token streaming.

One worker thread owns the model and runs every operation (generation, adapter load and
unload) in order, so a request can never run with another request's adapter and adapters never
change under a running generation. The asyncio side talks to it through futures and queues.
The sampler itself (`sampling.DecodeLoop`) is step-wise, so several sequences can share a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import queue
import re
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from core.adapter_store import read_adapter_config
from gateway.engines.base import (
    AdapterLoadError,
    AdapterNotLoaded,
    ContextLengthExceeded,
    EngineError,
    EngineEvent,
    EngineRequest,
    EngineUnavailable,
    SamplingParams,
    Usage,
)
from gateway.engines.embedded_fields import refuse_unhonoured_fields
from gateway.engines.sampling import DecodeLoop
from gateway.errors import APIError

log = logging.getLogger(__name__)
T = TypeVar("T")


def internal_adapter_name(name: str) -> str:
    """peft keys adapters into module names, so public names (`p@v1`) get a safe, unique alias."""
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_]", "_", name)[:48] + "_" + digest


@dataclass
class _Job:
    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[EngineEvent | BaseException | None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: EngineEvent | BaseException | None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


def _settle(fut: asyncio.Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class EmbeddedEngine:
    """The default engine: the base model in this process, adapters loaded with peft."""

    name = "embedded"

    def __init__(self, model_dir: Path, *, max_lora_rank: int = 16, max_model_len: int | None = None,
                 default_max_tokens: int = 512, threads: int | None = None) -> None:
        self.model_dir = model_dir
        self.max_lora_rank = max_lora_rank
        self.default_max_tokens = default_max_tokens
        self._max_model_len_setting = max_model_len
        self._threads = threads
        self._ops: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._adapters: dict[str, str] = {}  # public name -> peft name
        self._model: Any = None
        self._peft: Any = None
        self._tokenizer: Any = None
        self._eos_ids: set[int] = set()
        self._max_len = 0
        self._failed: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="embedded-engine", daemon=True)
        self._thread.start()
        await self._call(self._load_base)

    async def close(self) -> None:
        if self._thread is not None:
            self._ops.put(None)
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    async def check_ready(self) -> None:
        if self._thread is None or not self._thread.is_alive() or self._model is None:
            raise EngineUnavailable("the embedded engine is not running", code="engine_unavailable")

    @property
    def max_model_len(self) -> int:
        return self._max_len

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def loaded_adapters(self) -> set[str]:
        return set(self._adapters)

    def _work(self) -> None:
        while True:
            op = self._ops.get()
            if op is None:
                return
            op()

    async def _call(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except BaseException as exc:
                loop.call_soon_threadsafe(_settle, fut, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, fut, result)

        if self._thread is None:
            raise EngineUnavailable("the embedded engine is not running", code="engine_unavailable")
        self._ops.put(run)
        return await fut

    def _load_base(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self._threads:
            torch.set_num_threads(self._threads)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        model.eval()
        self._model = model
        eos = model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self._tokenizer.eos_token_id is not None:
            self._eos_ids.add(self._tokenizer.eos_token_id)
        self._max_len = self._max_model_len_setting or int(model.config.max_position_embeddings)

    # -- adapters ------------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: Path) -> None:
        config = read_adapter_config(path, self.max_lora_rank)
        await self._call(lambda: self._load_adapter(name, path, config))

    def _load_adapter(self, name: str, path: Path, config: dict[str, Any]) -> None:
        from peft import PeftModel

        peft_name = internal_adapter_name(name)
        if name in self._adapters:
            self._delete_adapter(name)
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._model, str(path), adapter_name=peft_name)
                self._peft.eval()
            else:
                self._peft.load_adapter(str(path), adapter_name=peft_name)
        except Exception as exc:  # peft raises many types for a misfit adapter
            if self._peft is None:
                # A failed first load may have injected layers into the base model in place: reload it.
                self._load_base()
            elif peft_name in self._peft.peft_config:
                self._peft.delete_adapter(peft_name)
            raise AdapterLoadError(f"the adapter does not fit the base model: {exc}",
                                   param="adapter_path", code="adapter_mismatch") from exc
        self._adapters[name] = peft_name

    async def unload_adapter(self, name: str) -> None:
        await self._call(lambda: self._delete_adapter(name))

    def _delete_adapter(self, name: str) -> None:
        peft_name = self._adapters.pop(name, None)
        if peft_name is None or self._peft is None:
            return
        if not self._adapters:
            # peft cannot run with zero adapters: take the LoRA layers out again.
            self._model = self._peft.unload()
            self._peft = None
        else:
            if self._peft.active_adapter == peft_name:
                self._peft.set_adapter(next(iter(self._adapters.values())))
            self._peft.delete_adapter(peft_name)

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        refuse_unhonoured_fields(request, self.name)
        if request.adapter is not None and request.adapter not in self._adapters:
            raise AdapterNotLoaded(f"adapter '{request.adapter}' is not loaded", code="adapter_not_loaded")
        await self.check_ready()
        job = _Job(request=request, loop=asyncio.get_running_loop(), events=asyncio.Queue())
        self._ops.put(lambda: self._run_job(job))
        try:
            while True:
                item = await job.events.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()

    def _run_job(self, job: _Job) -> None:
        try:
            self._generate(job)
        except APIError as exc:
            job.emit(exc)
        except Exception as exc:
            log.exception("embedded generation failed")
            job.emit(EngineError(f"generation failed: {type(exc).__name__}: {exc}", code="engine_error"))
        finally:
            job.emit(None)

    def _encode(self, request: EngineRequest) -> list[int]:
        tok = self._tokenizer
        if request.kind == "chat":
            assert request.messages is not None
            text = tok.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        assert request.prompt is not None
        return list(tok(request.prompt)["input_ids"])

    def _max_new_tokens(self, n_prompt: int, params: SamplingParams) -> int:
        limit = f"this model's maximum context length is {self._max_len} tokens; the prompt has {n_prompt} tokens"
        if n_prompt >= self._max_len:
            raise ContextLengthExceeded(limit)
        if params.max_tokens is None:
            return min(self.default_max_tokens, self._max_len - n_prompt)
        if n_prompt + params.max_tokens > self._max_len:
            raise ContextLengthExceeded(f"{limit} and max_tokens asks for {params.max_tokens} more")
        return params.max_tokens

    def _generate(self, job: _Job) -> None:
        """Decode the request's `n` choices together, step by step, under its adapter alone."""
        import torch

        request = job.request
        if request.adapter is not None and request.adapter not in self._adapters:
            raise AdapterNotLoaded(f"adapter '{request.adapter}' is not loaded", code="adapter_not_loaded")
        prompt_ids = self._encode(request)
        max_new = self._max_new_tokens(len(prompt_ids), request.params)
        with torch.inference_mode(), self._adapter_context(request.adapter):
            decode = DecodeLoop(self._peft if self._peft is not None else self._model, self._tokenizer,
                                self._eos_ids)
            for index in range(request.params.n):
                decode.add(index, prompt_ids, request.params, max_new)
            while decode.live:
                if job.cancelled.is_set():
                    return
                for event in decode.step():
                    job.emit(event)
        completion_tokens = sum(len(s.generated) for s in decode.sequences)
        job.emit(Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens))

    def _adapter_context(self, adapter: str | None) -> Any:
        if self._peft is None:
            return contextlib.nullcontext()
        if adapter is None:
            return self._peft.disable_adapter()
        self._peft.set_adapter(self._adapters[adapter])
        return contextlib.nullcontext()
