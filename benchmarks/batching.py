"""`promptintern bench batching`: the embedded engine's throughput before and after continuous batching.

Rows at concurrency 1, 8 and 32, side by side in one run: the engine of an earlier commit (default: the
last one that ran one request at a time), checked out with `git worktree` into a temporary folder, and the
engine installed here. The workload is NL2Bash bare queries (short chat prompts) on the base model and two
random LoRA adapters in turn, greedy, 16 new tokens. Each row runs in its own process whose `gateway`
package comes from the tree measured: this file runs again as a script there, importing only the engine.
The same run reports how often the batched engine's greedy answers agree with its batch-1 answers
(floating-point sums differ with batch shapes and padding) and whether batch-1 answers equal the earlier
engine's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BEFORE_BATCHING = "12cab94"  # the last commit whose embedded engine ran one request at a time
ADAPTERS = ("bench-a@v1", "bench-b@v1")


@dataclass(frozen=True)
class Row:
    """One engine at one concurrency: wall time of the whole set of requests and every answer."""

    engine: str
    concurrency: int
    seconds: float
    completion_tokens: int
    answers: tuple[str, ...]

    @property
    def requests_per_second(self) -> float:
        return len(self.answers) / self.seconds


def run(settings: Any, *, before: str = BEFORE_BATCHING, concurrency: tuple[int, ...] = (1, 8, 32),
        requests: int = 32, max_tokens: int = 16, skip_before: bool = False) -> list[Row]:
    """Measure every row, print the table and the agreement figures, and return the rows."""
    from benchmarks.errors import BenchInputError
    from core.basemodel import base_model_dir
    from core.templates import bare_query_messages
    from trainer.lora import random_lora
    from trainer.nl2bash import build

    model_dir = base_model_dir(settings)
    example = build()
    queries = [row["query"] for row in example.test][:requests]
    if len(queries) < requests:
        raise BenchInputError(f"the NL2Bash test split has {len(queries)} queries; ask for at most that many")
    workload = [{"messages": bare_query_messages(example.template, {"query": q}),
                 "adapter": (None, *ADAPTERS)[i % 3]} for i, q in enumerate(queries)]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="promptintern-bench-batching-") as tmp:
        root = Path(tmp)
        adapters = {name: str(random_lora(model_dir, root / name.replace("@", "-"), seed=seed))
                    for seed, name in enumerate(ADAPTERS)}
        trees = {"after": _installed_tree()}
        if not skip_before:
            trees["before"] = _checkout(before, root / "before")
        spec = {"model": str(model_dir), "threads": settings.torch_threads, "adapters": adapters,
                "workload": workload, "max_tokens": max_tokens}
        try:
            for level in concurrency:
                for engine, tree in trees.items():
                    print(f"[bench batching] {engine}: {requests} requests at concurrency {level}", flush=True)
                    rows.append(_measure_in(tree, engine, {**spec, "concurrency": level}))
        finally:
            if not skip_before:
                _remove_checkout(root / "before")
    print(report(rows, requests=requests, max_tokens=max_tokens, threads=settings.torch_threads))
    return rows


def report(rows: list[Row], *, requests: int, max_tokens: int, threads: int | None) -> str:
    """The throughput table, then how often batched greedy answers agree with batch-1 ones."""
    by = {(r.engine, r.concurrency): r for r in rows}
    levels = sorted({r.concurrency for r in rows})
    lines = [f"Embedded engine on SmolLM2-135M: {requests} NL2Bash bare queries per row (base model and 2 LoRA "
             f"adapters in turn), greedy, {max_tokens} new tokens, torch threads {threads or 'default'}", "",
             "| concurrency | before (req/s) | after (req/s) | speed-up | after: answers equal to batch 1 |",
             "|---:|---:|---:|---:|---:|"]
    alone = by.get(("after", 1))
    for level in levels:
        after, before = by.get(("after", level)), by.get(("before", level))
        cells = [f"{before.requests_per_second:.2f}" if before else "–",
                 f"{after.requests_per_second:.2f}" if after else "–",
                 f"{after.requests_per_second / before.requests_per_second:.1f}×" if after and before else "–",
                 _agreement(after, alone) if after and alone and level != 1 else "–"]
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    before_alone = by.get(("before", 1))
    if alone and before_alone:
        lines += ["", f"Batch-1 answers equal to the earlier engine's: {_agreement(alone, before_alone)}"]
    return "\n".join(lines)


def _agreement(rows: Row, reference: Row) -> str:
    same = sum(a == b for a, b in zip(rows.answers, reference.answers, strict=True))
    return f"{same}/{len(rows.answers)} ({same / len(rows.answers):.0%})"


def _installed_tree() -> Path:
    """The folder holding the `gateway` package this process imports: the engine 'after'."""
    import gateway

    return Path(gateway.__path__[0]).parent


def _checkout(ref: str, into: Path) -> Path:
    from benchmarks.errors import BenchInputError

    done = subprocess.run(["git", "worktree", "add", "--detach", str(into), ref], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise BenchInputError(f"cannot check out {ref!r} for the 'before' engine (run from the repository, or pass "
                              f"--skip-before): {done.stderr.strip()}")
    return into


def _remove_checkout(path: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(path)], capture_output=True, check=False)


def _measure_in(tree: Path, engine: str, spec: dict[str, Any]) -> Row:
    """Run one row in a fresh process whose `gateway` package is the one in `tree`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, __file__, str(tree)], input=json.dumps(spec), capture_output=True,
                          text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {engine} engine's row failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Row(engine, spec["concurrency"], result["seconds"], result["completion_tokens"], tuple(result["answers"]))


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    """In the child: load the engine and its adapters, warm up, then time the whole workload at one concurrency."""
    import asyncio
    import time

    from gateway.engines.base import EngineRequest, SamplingParams, TextDelta, Usage
    from gateway.engines.embedded import EmbeddedEngine

    async def main() -> dict[str, Any]:
        engine = EmbeddedEngine(Path(spec["model"]), threads=spec["threads"])
        await engine.start()
        for name, path in spec["adapters"].items():
            await engine.load_adapter(name, Path(path))
        semaphore = asyncio.Semaphore(spec["concurrency"])

        async def answer(item: dict[str, Any]) -> tuple[str, int]:
            request = EngineRequest(kind="chat", messages=item["messages"], adapter=item["adapter"],
                                    params=SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0))
            text, tokens = "", 0
            async with semaphore:
                async for event in engine.generate(request):
                    if isinstance(event, TextDelta):
                        text += event.text
                    elif isinstance(event, Usage):
                        tokens = event.completion_tokens
            return text, tokens

        for item in spec["workload"][:3]:  # warm-up: each adapter once
            await answer(item)
        started = time.perf_counter()
        results = await asyncio.gather(*(answer(item) for item in spec["workload"]))
        seconds = time.perf_counter() - started
        await engine.close()
        return {"seconds": seconds, "completion_tokens": sum(t for _, t in results),
                "answers": [text for text, _ in results]}

    return asyncio.run(main())


if __name__ == "__main__":
    # Run as a script in the tree measured: that tree, not this file's folder, is where `gateway` comes from.
    sys.path[0] = sys.argv[1]
    print(json.dumps(_measure(json.loads(sys.stdin.read()))))
