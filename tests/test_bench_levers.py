"""`promptintern bench levers`: its flags, the vLLM command line of each configuration, and its report kept equal
to its JSON with the overheads computed right (the measuring itself needs vLLM and half an hour:
`promptintern bench levers --quick`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from benchmarks.levers import (
    ALTERNATING,
    BARE,
    MERGED,
    QKVO,
    QV,
    Cell,
    Config,
    command_line,
    configurations,
    overhead,
    rebuild,
    render_readme_section,
    write_results,
)
from core.config import Settings
from gateway.cli import main
from gateway.vllm_server import vllm_command

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "levers"


def _exit_status(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return int(exited.value.code or 0)


def test_bad_flags_are_refused_with_status_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert _exit_status(["bench", "levers", "--requests", "0"]) == 2
    assert "--requests: must be at least 1, got 0" in capsys.readouterr().err
    assert _exit_status(["bench", "levers", "--configs", "fastest"]) == 2
    assert "invalid choice: 'fastest'" in capsys.readouterr().err
    assert _exit_status(["bench", "levers", "--rebuild", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("promptintern bench levers: no ") and "levers.json" in err


def _flags(config: Config) -> list[str]:
    return command_line(Settings(), Path("/models/base"), config)[3:]  # after `python -m module`


def test_each_configuration_starts_vllm_with_its_own_flags() -> None:
    configs = {c.key: c for c in configurations()}
    plain = _flags(configs["plain"])
    assert "--enable-lora" not in plain and "--enforce-eager" not in plain and "--enable-prefix-caching" in plain
    assert "--enforce-eager" in _flags(configs["plain-eager"]) and "-O0" in _flags(configs["plain-eager"])
    lora = " ".join(_flags(configs["lora"]))
    assert "--enable-lora --max-lora-rank 16 --max-loras 4" in lora and "--enforce-eager" not in lora
    assert "--lora-target-modules" not in lora  # vLLM's own default, not the gateway's
    assert "--max-lora-rank 8 --max-loras 4" in " ".join(_flags(configs["rank8"]))
    assert "--max-loras 1 " in " ".join(_flags(configs["loras1"]))
    cpu = " ".join(_flags(configs["loras1-cpu2"]))
    assert "--max-loras 1 " in cpu and cpu.endswith("--max-cpu-loras 2")
    assert "--lora-target-modules q_proj k_proj v_proj o_proj --" in " ".join(_flags(configs["modules-qkvo"]))
    assert "--lora-target-modules q_proj v_proj --" in " ".join(_flags(configs["modules-qv"]))
    # The gateway's own launcher since 2026-12-02:
    assert _flags(configs["modules-qkvo"]) == vllm_command(Settings(), Path("/models/base"), port=8000)[3:]
    combined = " ".join(_flags(configs["combined"]))
    assert "--max-lora-rank 8 --max-loras 1" in combined and "--lora-target-modules" in combined
    assert "--enforce-eager" in _flags(configs["lora-eager"]) and "--enable-lora" in _flags(configs["lora-eager"])
    assert "--enable-lora" not in _flags(configs["merged"]) and configs["merged"].routes == (MERGED,)
    # Prefix caching (vLLM's default) everywhere; --quick: every engine eager, the eager-only ones dropped.
    assert all("--enable-prefix-caching" in _flags(c) for c in configs.values())
    quick = configurations(quick=True)
    assert {c.key for c in quick} == set(configs) - {"plain-eager", "lora-eager"}
    assert all("--enforce-eager" in _flags(c) for c in quick)


def doc(rank8_qkvo: float = 2.6) -> dict[str, Any]:
    """A results document as `run` writes it: plain 2.0 s (c=1) / 1.0 s (c=8); LoRA defaults: bare 2.2 / 1.1,
    q,k,v,o 3.0 / 1.5, q,v 2.6 / 1.3; rank 8: bare 2.1 / 1.05, q,k,v,o `rank8_qkvo` / half of it; merged 2.04 /
    1.02."""
    configs = [c for c in configurations() if c.key in ("plain", "lora", "rank8", "merged")]
    p50 = {("plain", BARE): 2.0, ("lora", BARE): 2.2, ("lora", QKVO): 3.0, ("lora", QV): 2.6,
           ("lora", ALTERNATING): 3.2, ("rank8", BARE): 2.1, ("rank8", QKVO): rank8_qkvo, ("rank8", QV): 2.2,
           ("merged", MERGED): 2.04}
    cells = [Cell(key, route, c, 6 if c == 1 else 16, seconds / (1 if c == 1 else 2), 0.1, seconds / 40,
                  4 / seconds) for (key, route), seconds in p50.items() for c in (1, 8)]
    quality = [{"adapter": QKVO, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "served_on": "lora",
                "rows": 40, "bleu": 20.5, "exact_match": 7.5, "samples": []},
               {"adapter": QV, "targets": ["q_proj", "v_proj"], "served_on": "lora", "rows": 40, "bleu": 18.25,
                "exact_match": 5.0, "samples": []}]
    written = {
        "date": "2026-12-02", "machine": "x86_64, 2 CPUs", "command": "promptintern bench levers",
        "mode": "full", "engine": "vLLM", "model": "m", "answer_tokens": 32, "requests": {"1": 6, "8": 16},
        "schedule": "demo", "lora_rank": 8,
        "adapters": {QKVO: {"targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "training_seconds": 130.0},
                     QV: {"targets": ["q_proj", "v_proj"], "training_seconds": 120.4}},
        "configs": [{**asdict(c), "command": f"vllm {c.key}"} for c in configs],
        "cells": [asdict(c) for c in cells], "quality": quality, "complete": True, "minutes": 12.5}
    return json.loads(json.dumps(written))  # as read back: lists, not tuples


def test_overheads_are_against_the_same_engine_and_the_plain_vllm() -> None:
    results = doc()
    assert overhead(results, "lora", QKVO, 1, "same") == pytest.approx(100 * (3.0 / 2.2 - 1))
    assert overhead(results, "lora", QKVO, 8, "plain") == pytest.approx(50.0)
    assert overhead(results, "merged", MERGED, 1, "plain") == pytest.approx(2.0)
    assert overhead(results, "plain", QKVO, 1, "plain") is None  # not measured there


def test_the_readme_section_puts_the_levers_side_by_side(tmp_path: Path) -> None:
    text = render_readme_section(doc())
    assert "`promptintern bench levers` on 2026-12-02" in text and "mode full" in text
    # Against the plain vLLM: bare 2.2/2.0, q,k,v,o 3.0/2.0, q,v 2.6/2.0 (the same at c=8, halved times).
    assert "| lora | LoRA, vLLM's defaults (--max-lora-rank 16 --max-loras 4; the gateway's before 2026-12-02) | " \
           "+10% | +10% | +50% | +50% | +30% | +30% |" in text
    assert "| merged | q,k,v,o adapter merged into the weights, plain vLLM | – | – | +2% (merged) | +2% (merged) |" \
           in text
    # Every cell: p50, ms/token, (a) against the engine's bare query (3.0/2.2: +36%), (b) against plain.
    assert "| lora | adapter q,k,v,o | 3.00 | 75 | +36% | +50% | 1.50 | 75 | 1.33 | +36% | +50% |" in text
    assert "| adapter q,v | q_proj, v_proj | lora | 40 | 18.2 | 5.0 | 120 |" in text
    # rank 8: q,k,v,o 2.6 against 3.0 on the defaults: 20 points less at both concurrencies.
    assert "- `rank8` (--max-lora-rank 8 (= the adapters' rank)): adapter q,k,v,o overhead -20 points at c=1" in text
    assert "no LoRA configuration reaches it; the closest is `rank8` at +30% in its worst cell." in text
    assert "- Merged serving: +2% at c=1, +2% at c=8" in text
    assert "rank8: vllm rank8" in text
    reached = render_readme_section(doc(rank8_qkvo=2.2))  # +10% against the plain vLLM
    assert "reached by `rank8`." in reached
    out = write_results(doc(), tmp_path)
    (out / "readme_section.md").write_text("stale")
    rebuild(out)
    assert (out / "readme_section.md").read_text() == text
    assert json.loads((out / "levers.json").read_text()) == doc()


def test_a_partial_run_says_so() -> None:
    partial = doc() | {"complete": False, "failed": [{"key": "loras1", "error": "RuntimeError: vLLM exited with 1:\n"
                                                                        "ValueError: bad flag"}]}
    text = render_readme_section(partial)
    assert "**Partial: the run stopped before every configuration ran.**" in text
    assert "`loras1` failed and is not in the tables: ValueError: bad flag" in text


@pytest.mark.skipif(not (RESULTS / "levers.json").exists(), reason="no committed levers results")
def test_committed_results_match_their_json_and_the_readme() -> None:
    results = json.loads((RESULTS / "levers.json").read_text())
    section = render_readme_section(results)
    assert (RESULTS / "readme_section.md").read_text() == section
    assert section in (REPO / "README.md").read_text()


def test_resume_needs_a_matching_earlier_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert _exit_status(["bench", "levers", "--resume", "--out", str(tmp_path)]) == 2
    assert "levers.json: run `promptintern bench levers" in capsys.readouterr().err
    earlier = doc() | {"mode": "full", "requests": {"1": 4, "8": 16}}
    write_results(earlier, tmp_path)
    assert _exit_status(["bench", "levers", "--resume", "--requests", "6", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "give the same flags" in err and "'1': 4" in err
    measured = [c["key"] for c in earlier["configs"]]
    assert _exit_status(["bench", "levers", "--resume", "--requests", "4", "--configs", *measured,
                         "--out", str(tmp_path)]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_a_resumed_run_says_which_sitting_measured_what() -> None:
    two = doc() | {"sittings": [{"started": "2026-12-02 08:19 UTC", "configs": ["plain", "lora"]},
                                {"started": "2026-12-02 08:52 UTC", "configs": ["rank8"]}]}
    text = render_readme_section(two)
    assert ("measured in 2 sittings (2026-12-02 08:19 UTC: plain, lora; 2026-12-02 08:52 UTC: rank8), so "
            "overhead (b)") in text
    assert "sittings" not in render_readme_section(doc() | {"sittings": two["sittings"][:1]})
