"""In-process engine: transformers + peft, several LoRA adapters by name, continuous batching, streaming.

One worker thread owns the model and does everything with it, in order. Between decode steps it takes
new requests and adapter operations; each step prefills the prompts that arrived, then decodes every
live sequence in one forward pass (`sampling.DecodeLoop`), each row under its own adapter. An adapter
unloaded while requests use it stays until they end (`lora_set.LoraSet`), so a request never runs with
another request's adapter, nor loses its own. The asyncio side talks to the worker through futures and
queues. The requests held (queued plus decoding) are bounded: past the bound `generate` raises
EngineOverloaded (429), and a request whose consumer goes away is dropped at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.adapter_store import read_adapter_config
from gateway.engines.base import (
    AdapterNotLoaded,
    ContextLengthExceeded,
    EngineError,
    EngineEvent,
    EngineOverloaded,
    EngineRequest,
    EngineUnavailable,
    SamplingParams,
    Usage,
)
from gateway.engines.embedded_fields import refuse_unhonoured_fields
from gateway.engines.kv_batch import batchable
from gateway.engines.lora_set import LoraSet
from gateway.engines.sampling import DecodeLoop, Sequence
from gateway.errors import APIError

log = logging.getLogger(__name__)
STEP_TIME_SMOOTHING = 0.2  # weight of the latest step in the running step time behind the Retry-After hint


@dataclass(eq=False)
class _Job:
    """One request in the worker: what it asks, where its events go, and its sequences once admitted."""

    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[EngineEvent | BaseException | None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompt_ids: list[int] = field(default_factory=list)
    max_new: int = 0
    adapter: str | None = None  # the peft name it runs with, fixed when the worker accepts it
    sequences: list[Sequence] = field(default_factory=list)

    def emit(self, item: EngineEvent | BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            self.cancelled.set()


@dataclass(eq=False)
class _Op:
    """Work on the model (loading it, loading or unloading an adapter) and the future that awaits it."""

    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]

    def run(self) -> None:
        try:
            result = self.fn()
        except BaseException as exc:
            self.settle(error=exc)
        else:
            self.settle(result)

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        def apply() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(apply)


class EmbeddedEngine:
    """The default engine: the base model in this process, adapters loaded with peft, requests batched."""

    name = "embedded"

    def __init__(self, model_dir: Path, *, max_lora_rank: int = 16, max_model_len: int | None = None,
                 default_max_tokens: int = 512, threads: int | None = None, max_queued_requests: int = 64,
                 max_batch_rows: int = 32, max_batch_tokens: int = 65536) -> None:
        if min(max_queued_requests, max_batch_rows, max_batch_tokens) < 1:
            raise ValueError("max_queued_requests, max_batch_rows and max_batch_tokens must be at least 1")
        self.model_dir = model_dir
        self.max_lora_rank = max_lora_rank
        self.default_max_tokens = default_max_tokens
        self.max_queued_requests = max_queued_requests
        self.max_batch_rows = max_batch_rows  # rows (choices) decoded in one pass; a larger request runs alone
        self.max_batch_tokens = max_batch_tokens  # KV bound: rows x padded length (SmolLM2: 46 kB a token)
        self._max_model_len_setting = max_model_len
        self._threads = threads
        # No lock is ever taken on the event loop (a contended one would block it): the inbox is a SimpleQueue
        # (its put never blocks), and each counter below has a single writer.
        self._inbox: queue.SimpleQueue[_Job | _Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False  # written on the event loop only
        self._accepted = 0  # requests taken in, written on the event loop only
        self._ended = 0  # requests ended, written by the worker only
        self._lora: LoraSet | None = None
        self._decode: DecodeLoop | None = None
        self._tokenizer: Any = None
        self._eos_ids: set[int] = set()
        self._max_len = 0
        self._waiting: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._owners: dict[Sequence, _Job] = {}
        self._step_seconds = 0.0
        self._retry_after = 1

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="embedded-engine", daemon=True)
        self._thread.start()
        await self._call(self._load_base)

    async def close(self) -> None:
        if self._thread is not None:
            self._closed = True  # nothing enters the inbox after the end mark
            self._inbox.put(None)
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    async def check_ready(self) -> None:
        if self._thread is None or not self._thread.is_alive() or self._lora is None:
            raise EngineUnavailable("the embedded engine is not running", code="engine_unavailable")

    @property
    def max_model_len(self) -> int:
        return self._max_len

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def requests_held(self) -> int:
        """Requests accepted and not yet ended (queued or decoding): what MAX_QUEUED_REQUESTS bounds."""
        return self._accepted - self._ended

    @property
    def rows_decoding(self) -> int:
        """Sequences (choices) in the decode batch or joining it at the next step."""
        return len(self._decode.live) if self._decode is not None else 0

    def loaded_adapters(self) -> set[str]:
        return set(self._lora.names) if self._lora is not None else set()

    def _read_model(self) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        model.eval()
        return model

    def _load_base(self) -> None:
        import torch
        from transformers import AutoTokenizer

        if self._threads:
            torch.set_num_threads(self._threads)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        model = self._read_model()
        if not batchable(model.config):
            raise EngineError("the embedded engine batches full-attention models only (no sliding-window or "
                              "linear-attention layers); serve this base model with vLLM", code="model_not_batchable")
        eos = model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self._tokenizer.eos_token_id is not None:
            self._eos_ids.add(self._tokenizer.eos_token_id)
        self._max_len = self._max_model_len_setting or int(model.config.max_position_embeddings)
        self._lora = LoraSet(model, self._read_model)
        self._decode = DecodeLoop(model, self._tokenizer, self._eos_ids)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread between two decode steps and return its result."""
        loop = asyncio.get_running_loop()
        op = _Op(fn, loop, loop.create_future())
        if self._thread is None or self._closed:
            raise EngineUnavailable("the embedded engine is not running", code="engine_unavailable")
        self._inbox.put(op)
        return await op.future

    # -- threads -------------------------------------------------------------------------------

    @property
    def threads(self) -> int:
        """Torch threads when the engine has the machine to itself: TORCH_THREADS, else every core."""
        return self._threads or os.cpu_count() or 1

    async def share_cores(self, training: bool) -> int:
        """While a training job runs beside it on this machine, decode with half the threads (the job gets the
        rest: see `training_threads`); back to all of them when it ends. Returns the threads now used."""
        threads = max(1, self.threads // 2) if training else self.threads

        def apply() -> None:
            import torch

            torch.set_num_threads(threads)

        await self._call(apply)
        return threads

    # -- adapters ------------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: Path) -> None:
        config = await asyncio.to_thread(read_adapter_config, path, self.max_lora_rank)  # file reads: off the loop
        await self._call(lambda: self._lora_set().load(name, path, config))

    async def unload_adapter(self, name: str) -> None:
        """New requests can no longer use `name` once this returns; requests already using it finish with it."""
        await self._call(lambda: self._lora_set().unload(name))

    def _lora_set(self) -> LoraSet:
        if self._lora is None:
            raise EngineUnavailable("the embedded engine has no model loaded", code="engine_unavailable")
        return self._lora

    # -- generation: the asyncio side ----------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        refuse_unhonoured_fields(request, self.name)
        await self.check_ready()
        if request.adapter is not None and request.adapter not in self._lora_set().names:
            raise AdapterNotLoaded(f"adapter '{request.adapter}' is not loaded", code="adapter_not_loaded")
        job = _Job(request=request, loop=asyncio.get_running_loop(), events=asyncio.Queue())
        self._enqueue(job)
        try:
            while True:
                item = await job.events.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()  # the worker drops it at its next step if it is still running

    def _enqueue(self, job: _Job) -> None:
        if self._closed:
            raise EngineUnavailable("the embedded engine is shutting down", code="engine_unavailable")
        if self.requests_held >= self.max_queued_requests:  # a stale count of ended requests only errs high
            raise EngineOverloaded(
                f"the embedded engine is busy: it holds its maximum of {self.max_queued_requests} requests "
                f"(MAX_QUEUED_REQUESTS); retry in about {self._retry_after} s", retry_after=self._retry_after)
        self._accepted += 1
        self._inbox.put(job)

    # -- generation: the worker thread ---------------------------------------------------------

    def _work(self) -> None:
        while True:
            for item in self._take(block=not (self._waiting or self._running)):
                if item is None:
                    self._shut_down()
                    return
                if isinstance(item, _Op):
                    item.run()
                else:
                    self._accept(item)
            if self._lora is None or self._decode is None:
                continue
            self._decode.model = self._lora.model  # an adapter operation may have wrapped or unwrapped it
            self._drop_cancelled()
            self._admit()
            if self._running:
                self._step()
            self._sweep_adapters()

    def _sweep_adapters(self) -> None:
        """Delete the weights of unloaded adapters that no request uses any more."""
        assert self._lora is not None and self._decode is not None
        in_use = {s.adapter for s in self._decode.live if s.adapter} | {j.adapter for j in self._waiting if j.adapter}
        try:
            self._lora.sweep(in_use)
        except Exception:  # the weights stay in memory; serving goes on
            log.exception("deleting unloaded adapters failed")

    def _take(self, block: bool) -> list[_Job | _Op | None]:
        """Everything in the inbox now; when `block`, wait for at least one item first."""
        items = [self._inbox.get()] if block else []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def _accept(self, job: _Job) -> None:
        """Check and tokenise a new request; it waits for room in the batch, or ends with its error."""
        if job.cancelled.is_set():
            self._end(job)
            return
        try:
            if job.request.adapter is not None:
                job.adapter = self._lora_set().peft_name(job.request.adapter)
            job.prompt_ids = self._encode(job.request)
            job.max_new = self._max_new_tokens(len(job.prompt_ids), job.request.params)
        except APIError as exc:
            self._end(job, exc)
        except Exception as exc:
            log.exception("embedded request could not be prepared")
            self._end(job, EngineError(f"generation failed: {type(exc).__name__}: {exc}", code="engine_error"))
        else:
            self._waiting.append(job)

    def _drop_cancelled(self) -> None:
        """Free the rows and KV cache of requests whose consumer has gone away."""
        assert self._decode is not None
        for job in [j for j in self._waiting if j.cancelled.is_set()]:
            self._waiting.remove(job)
            self._end(job)
        gone = [j for j in self._running if j.cancelled.is_set()]
        if gone:
            self._decode.remove([s for job in gone for s in job.sequences])
            for job in gone:
                self._retire(job)

    def _admit(self) -> None:
        """Start waiting requests, first come first served, while their choices fit in the batch.

        A request fits when the rows stay within `max_batch_rows` and the padded batch (rows times the longest
        a row may grow: prompt plus max_tokens) within `max_batch_tokens`, which bounds the KV cache. A request
        alone always fits.
        """
        assert self._decode is not None
        live = self._decode.live
        rows, longest = len(live), max((len(s.prompt_ids) + s.max_new for s in live), default=0)
        while self._waiting:
            job = self._waiting[0]
            n = job.request.params.n
            length = max(longest, len(job.prompt_ids) + job.max_new)
            if rows and (rows + n > self.max_batch_rows or (rows + n) * length > self.max_batch_tokens):
                return
            self._waiting.popleft()
            job.sequences = self._decode.add(job.prompt_ids, job.request.params, job.max_new, adapter=job.adapter, n=n,
                                             ignore_eos=job.request.extra.get("ignore_eos") is True)
            self._owners.update((s, job) for s in job.sequences)
            self._running.append(job)
            rows, longest = rows + n, length

    def _step(self) -> None:
        assert self._decode is not None
        started = time.perf_counter()
        try:
            events = self._decode.step()
        except Exception as exc:
            log.exception("embedded decode step failed")
            self._decode.clear()
            error = EngineError(f"generation failed: {type(exc).__name__}: {exc}", code="engine_error")
            for job in list(self._running):
                self._retire(job, error)
            return
        for sequence, event in events:
            self._owners[sequence].emit(event)
        for job in [j for j in self._running if all(s.finish_reason is not None for s in j.sequences)]:
            job.emit(Usage(prompt_tokens=len(job.prompt_ids),
                           completion_tokens=sum(len(s.generated) for s in job.sequences)))
            self._retire(job)
        self._note_step(time.perf_counter() - started)

    def _note_step(self, seconds: float) -> None:
        """Keep the Retry-After hint: about when the soonest-ending running request frees its place."""
        assert self._decode is not None
        self._step_seconds += STEP_TIME_SMOOTHING * (seconds - self._step_seconds) if self._step_seconds else seconds
        remaining = min((s.max_new - len(s.generated) for s in self._decode.live), default=1)
        self._retry_after = max(1, min(60, math.ceil(remaining * self._step_seconds)))

    def _retire(self, job: _Job, error: BaseException | None = None) -> None:
        self._running.remove(job)
        for sequence in job.sequences:
            self._owners.pop(sequence, None)
        self._end(job, error)

    def _end(self, job: _Job, error: BaseException | None = None) -> None:
        """The request's place given back, then its last event (its error, if any, then the end): a client that
        saw its request end may send the next at once and find the place free."""
        self._ended += 1
        if error is not None:
            job.emit(error)
        job.emit(None)

    def _shut_down(self) -> None:
        """End everything still held with EngineUnavailable; ops still queued fail the same way."""
        error = EngineUnavailable("the embedded engine is shutting down", code="engine_unavailable")
        for item in self._take(block=False):
            if isinstance(item, _Op):
                item.settle(error=error)
            elif item is not None:
                self._end(item, error)
        if self._decode is not None:
            self._decode.clear()
        for job in list(self._running):
            self._retire(job, error)
        while self._waiting:
            self._end(self._waiting.popleft(), error)

    # -- requests to tokens --------------------------------------------------------------------

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
