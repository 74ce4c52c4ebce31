"""What `promptintern bench paper` was asked for, the run's fixed sizes, and its progress lines."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.paper.conditions import Prices

STOP = ("\n",)
WARMUP = 2
CONCURRENCY = 8
THROUGHPUT_REQUESTS = 32
QUICK_ROWS = 8
QUICK_THROUGHPUT_REQUESTS = 8
KEEP_RATIOS = (0.5, 0.2)
SCHEDULES = ("full_prompt", "direct", "promptintern")
# --quick trains only when an adapter is missing from the cache, and then only this long.
QUICK_STEPS = {"promptintern": (2, 2, 2, 4), "direct": (10,), "full_prompt": (10,)}
QUICK_ADAPTER_DIR = "nl2bash-quick"
SAMPLES = 3
DEFAULT_OUT = Path("results/paper")
DEFAULT_MAX_NEW_TOKENS = 48


@dataclass(frozen=True)
class PaperOptions:
    """What `promptintern bench paper` was asked for."""

    quick: bool = False
    rows: int | None = None
    throughput_requests: int | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    fast_start: bool = False
    skip_vllm: bool = False
    out: Path = DEFAULT_OUT
    prices: Prices | None = None

    def test_rows(self, available: int) -> int:
        wanted = self.rows or (QUICK_ROWS if self.quick else available)
        return max(1, min(available, wanted))

    @property
    def throughput(self) -> int:
        return self.throughput_requests or (QUICK_THROUGHPUT_REQUESTS if self.quick else THROUGHPUT_REQUESTS)

    @property
    def eager(self) -> bool:
        return self.fast_start or self.quick


class Progress:
    """Timestamped progress lines; `tick` prints at most every 15 s (and at the end) with an ETA."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._last_tick = 0.0

    def say(self, text: str) -> None:
        print(f"[bench paper {clock(time.monotonic() - self.started)}] {text}", flush=True)

    def tick(self, label: str, done: int, total: int, since: float) -> None:
        now = time.monotonic()
        if done < total and now - self._last_tick < 15:
            return
        self._last_tick = now
        per = (now - since) / max(done, 1)
        self.say(f"{label}: {done}/{total} requests, {per:.2f} s each, ETA {clock(per * (total - done))}")


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss, for progress lines."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
