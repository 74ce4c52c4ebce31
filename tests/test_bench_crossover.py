"""`promptintern bench crossover`: its workload, where it finds the crossover, and its report kept equal to its
JSON (the measuring itself needs vLLM and minutes: `promptintern bench crossover --quick`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from benchmarks.crossover import (
    BARE,
    FULL,
    FULL_CACHED,
    LORA,
    MERGED,
    Cell,
    crossover,
    prompt_messages,
    rebuild,
    render_readme_section,
    write_results,
)
from gateway.tokens import TokenCounter

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "crossover"


def doc(cached_p50: dict[int, float], lora_p50: float, lora_rps: float = 1.0) -> dict[str, Any]:
    """A results document with these medians (the rest plausible), as `run` writes it."""
    cells = []
    for length, p50 in cached_p50.items():
        for concurrency in (1, 8):
            cells.append(Cell(FULL, length, concurrency, 4, length + 20, 3 * p50, 2 * p50, 0.05, 0.3, 9.0))
            cells.append(Cell(FULL_CACHED, length, concurrency, 4, length + 20, p50, 0.2, 0.07, 1 / p50, 30.0))
    for condition, p50, rps in ((LORA, lora_p50, lora_rps), (MERGED, 2.0, 2.0), (BARE, 2.0, 2.0)):
        for concurrency in (1, 8):
            cells.append(Cell(condition, None, concurrency, 4, 40, p50, 0.1, p50 / 32, rps, 32 * rps))
    return {"date": "2026-12-02", "machine": "x86_64, 2 CPUs", "command": "promptintern bench crossover",
            "engine": "vLLM", "model": "m", "answer_tokens": 32, "minutes": 1.0,
            "cells": [asdict(c) for c in cells],
            "gateway": [{"route": r, "prompt_tokens": t, "p50_s": p, "latencies_s": [p, p]}
                        for r, t, p in ((FULL_CACHED, 2056, 3.0), (BARE, 40, 2.0), (LORA, 40, 3.5),
                                        (MERGED, 40, 2.1))]}


def test_the_crossover_is_the_shortest_length_from_which_the_route_wins_at_every_longer_one() -> None:
    results = doc({250: 2.0, 500: 2.6, 1000: 2.4, 2000: 3.0, 4000: 4.0}, lora_p50=2.5)
    assert crossover(results, LORA, 1, "p50_s") == 2000  # wins at 500, loses at 1000: not from 500
    assert crossover(results, MERGED, 1, "p50_s") == 500  # 2.0 < 2.6, 2.4, 3.0, 4.0 (not < 2.0 at 250)
    assert crossover(doc({250: 2.0, 4000: 2.2}, lora_p50=3.0), LORA, 1, "p50_s") is None
    assert crossover(doc({250: 2.0, 4000: 4.0}, lora_p50=3.0, lora_rps=0.4), LORA, 8, "throughput_rps") == 4000


def test_the_readme_section_names_command_crossovers_and_the_gateway_ratios(tmp_path: Path) -> None:
    results = doc({250: 2.0, 500: 2.6, 1000: 2.4, 2000: 3.0, 4000: 4.0}, lora_p50=2.5)
    text = render_readme_section(results)
    assert "`promptintern bench crossover` on 2026-12-02" in text
    assert "- adapter (LoRA), concurrency 1: latency from 2000 tokens" in text
    assert "| adapter (LoRA) | 40 | 3.50 | x1.75 | x0.86 faster |" in text  # 3.5/2.0 and 3.0/3.5, as computed
    out = write_results(results, tmp_path)
    assert (out / "crossover.png").stat().st_size > 0
    (out / "readme_section.md").write_text("stale")
    rebuild(out)
    assert (out / "readme_section.md").read_text() == text


def test_prompts_are_cut_to_about_the_length_asked(base_model_path: Path) -> None:
    counter = TokenCounter.from_model_dir(base_model_path)
    for target in (250, 2000):
        tokens = counter.count_chat(prompt_messages(counter, target))
        assert target <= tokens < target + 80  # one worked example more than needed at most


@pytest.mark.skipif(not (RESULTS / "crossover.json").exists(), reason="no committed crossover results")
def test_committed_results_match_their_json_and_the_readme() -> None:
    results = json.loads((RESULTS / "crossover.json").read_text())
    section = render_readme_section(results)
    assert (RESULTS / "readme_section.md").read_text() == section
    assert section in (REPO / "README.md").read_text()
