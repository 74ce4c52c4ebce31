"""`bench traffic`'s report: the figures a run measured, written as JSON, a report and a README section (the run
itself needs SmolLM2's context for the NL2Bash prompt; its path is the one tests/test_guard.py drives end to end
against a real upstream on the tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.traffic import _write


def test_the_report_carries_every_condition_and_the_upstream_figures(tmp_path: Path) -> None:
    result = {
        "conditions": {
            "teacher (upstream, full prompt)": {"exact_match": 5.0, "bleu": 9.1},
            "adapter trained from recorded traffic (no labels)": {"exact_match": 2.5, "bleu": 7.4,
                                                                   "agreement_exact": 20.0, "agreement_chrf": 55.5},
            "adapter trained on the gold labels": {"exact_match": 10.0, "bleu": 25.0, "agreement_exact": 2.5,
                                                   "agreement_chrf": 30.1},
        },
        "routes_after": {"adapter": 40},
        "traffic_job": {"status": "succeeded", "rows": 120, "version_status": "ready",
                        "gate": {"reason": "agreement 0.250 with the teacher on held-out recorded rows; no active "
                                           "version and no guard to compare with", "passed": True}},
        "upstream": {"before": {"calls_per_1k": 1000.0, "billed_input_tokens_per_1k": 846_000},
                     "after": {"calls_per_1k": 0.0, "billed_input_tokens_per_1k": 0,
                               "local_input_tokens_per_1k": 48_000}},
        "shadow_latency": {"requests_each": 40, "median_off_s": 0.8, "median_on_s": 0.9, "ratio_on_off": 1.125,
                           "note": "interleaved"},
        "samples": [{"query": "list files", "gold": "ls", "teacher": "ls -l", "traffic_adapter": "ls"}],
        "settings": {"schedule": "demo", "train_rows": 120, "test_rows": 40, "max_tokens": 64,
                     "decoding": "greedy (temperature 0)", "teacher": "base model with the full prompt"},
        "date": "2026-12-02", "command": "promptintern bench traffic",
    }
    _write(tmp_path, result)
    assert json.loads((tmp_path / "traffic.json").read_text()) == result
    section = (tmp_path / "readme_section.md").read_text()
    assert "| adapter trained from recorded traffic (no labels) | 2.5 | 7.4 | 20.0 | 55.5 |" in section
    assert "| teacher (upstream, full prompt) | 5.0 | 9.1 | - | - |" in section
    assert "| before (fallback to the upstream) | 1000 | 846000 | 0 |" in section
    assert "| after (traffic-trained adapter) | 0 | 0 | 48000 |" in section
    assert "no active version and no guard" in section and "x1.125" in section
    assert "`list files`: gold `ls`" in (tmp_path / "report.md").read_text()
