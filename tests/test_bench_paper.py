"""`promptintern bench paper`'s pure parts on synthetic figures: cost, ratios to row 1, the JSON rows
(every key, nulls where a figure does not apply), report and README rendering, plots, inputs, CLI."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest

from benchmarks.latency import percentile
from benchmarks.paper.conditions import CONDITIONS, ROW_IDS, Condition, Measurement, Prices
from benchmarks.paper.inputs import CompressedTemplate, build_inputs, input_key
from benchmarks.paper.options import PaperOptions
from benchmarks.paper.plots import write_plots
from benchmarks.paper.report import render_readme_section, render_report
from benchmarks.paper.run import rebuild_report
from benchmarks.paper.scoring import bootstrap_bleu
from benchmarks.paper.table import (
    FIGURE_KEYS,
    PAPER_HEADLINE,
    complete_rows,
    paper_document,
    project_seconds,
    ratios,
    table_rows,
)
from core.templates import parse_template
from gateway.cli import build_parser

PRICES = Prices(input_per_1k=0.00015, output_per_1k=0.0006)
# Synthetic figures per row: (input tokens, output tokens, median latency s, BLEU, EM %, training s).
FIGURES: dict[str, tuple[float, float, float, float, float, float | None]] = {
    "base_full": (800, 20, 4.0, 10.0, 0.0, None),
    "base_bare": (50, 20, 1.0, 9.0, 0.0, None),
    "compressed_keep0.5": (420, 20, 2.5, 6.0, 0.0, None),
    "compressed_keep0.2": (200, 20, 1.8, 4.0, 0.0, None),
    "full_prompt_ft": (800, 20, 4.4, 30.0, 5.0, 600.0),
    "direct_ft": (50, 20, 1.1, 25.0, 3.0, 500.0),
    "promptintern": (50, 20, 1.0, 28.0, 4.0, 1200.0),
    "promptintern_gateway": (50, 20, 1.05, 28.0, 4.0, 1200.0),
    "promptintern_merged": (50, 20, 0.8, 28.0, 4.0, 1200.0),
}


def _measurement(condition: Condition) -> Measurement:
    if condition.id not in FIGURES:  # row 4 on the embedded engine: nothing measured
        return Measurement(condition=condition, note="the embedded engine has no prefix cache")
    tokens, out, p50, bleu, em, training = FIGURES[condition.id]
    return Measurement(
        condition=condition, n=4, input_tokens=tokens, output_tokens=out, bleu=bleu, exact_match=em,
        bleu_ci95=(bleu - 2, bleu + 2), latencies_s=[p50 * 0.9, p50, p50, p50 * 1.5], throughput_rps_c8=2 / p50,
        throughput_requests=8, training_time_s=training, seconds=10.0,
        original_input_tokens=802.0 if condition.gateway else None,
        samples=[{"query": "list *.py files", "reference": "ls *.py", "prediction": "ls `pwd`/*.py"}],
        predictions=["ls *.py"] * 4,
    )


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return table_rows([_measurement(c) for c in CONDITIONS], PRICES)


@pytest.fixture
def doc(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return _doc_of(rows)


def _doc_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    settings = {"command": "promptintern bench paper --quick", "mode_detail": "--quick: the first 4 of 70 test rows",
                "engine_detail": "transformers + peft", "test_rows": 4, "test_rows_available": 70,
                "train_rows": 206, "examples": 24, "base_model": "SmolLM2", "decoding": "greedy",
                "warmup": 2, "throughput_requests": 8, "prefix_caching": "none",
                "price_input_per_1k": PRICES.input_per_1k, "price_output_per_1k": PRICES.output_per_1k,
                "compression": [{"keep_ratio": 0.5, "kept_tokens": 400, "total_tokens": 800}]}
    return paper_document(engine="embedded", machine={"description": "test CPU, 2 CPU cores", "cores": 2},
                          date="2026-11-29T06:00:00+00:00", rows=rows, settings=settings,
                          extra={"adapters": [], "total_seconds": 100.0})


def test_cost_per_1k_requests_is_tokens_times_price_per_1k() -> None:
    # 1,000 requests x (800 / 1,000 x 0.00015 + 20 / 1,000 x 0.0006) = 0.12 + 0.012
    assert PRICES.per_1k_requests(800, 20) == pytest.approx(0.132)
    assert Prices(1.0, 0.0).per_1k_requests(50, 999) == pytest.approx(50.0)


def test_ratios_against_row_1() -> None:
    base = {"input_tokens": 800.0, "latency_p50_s": 4.0, "cost_per_1k_requests_usd": 0.132}
    row = {"input_tokens": 50.0, "latency_p50_s": 1.0, "cost_per_1k_requests_usd": PRICES.per_1k_requests(50, 20)}
    r = ratios(row, base)
    assert r["token_reduction"] == pytest.approx(1 - 50 / 800)
    assert r["speedup"] == pytest.approx(4.0)
    assert r["cost_saving"] == pytest.approx(1 - 0.0195 / 0.132)
    assert ratios(base, base) == {"token_reduction": 0.0, "speedup": 1.0, "cost_saving": 0.0}
    missing = {"input_tokens": None, "latency_p50_s": None, "cost_per_1k_requests_usd": None}
    assert ratios(missing, base) == {"token_reduction": None, "speedup": None, "cost_saving": None}


def test_projection_scales_rows_and_keeps_overhead() -> None:
    m = _measurement(CONDITIONS[0])  # latencies mean 4.1 s, 2 / 4.0 = 0.5 req/s at c=8, 10 s measured
    assert project_seconds([m], 100.0, rows=70, warmup=2, throughput_requests=32) == pytest.approx(
        90.0 + statistics.fmean(m.latencies_s) * 72 + 32 / 0.5)


def test_percentile_is_an_observed_value_at_or_above_the_rank() -> None:
    values = [float(i) for i in range(1, 21)]
    assert percentile(values, 0.95) == 20.0
    assert percentile(values, 0.5) == 11.0
    assert percentile([3.0], 0.95) == 3.0
    with pytest.raises(ValueError):
        percentile([], 0.95)


def test_percentile_gives_the_figures_earlier_results_were_computed_with() -> None:
    """numpy's "higher" method against the nearest-rank rule the benchmarks used before (p50, p95, p99)."""
    rng = random.Random(7)
    for n in range(1, 400):
        values = [rng.lognormvariate(0, 1) for _ in range(n)]
        ordered = sorted(values)
        for q in (0.5, 0.95, 0.99):
            assert percentile(values, q) == ordered[min(n - 1, int(q * n))], (n, q)


def test_rows_have_every_id_and_key_with_nulls_where_not_applicable(rows: list[dict[str, Any]]) -> None:
    assert [r["id"] for r in rows] == list(ROW_IDS)
    for r in rows:
        assert set(FIGURE_KEYS) <= set(r)
    by_id = {r["id"]: r for r in rows}
    assert all(by_id["base_full_prefix_cache"][k] is None for k in FIGURE_KEYS)
    for rid in ("base_full", "base_bare", "compressed_keep0.5", "compressed_keep0.2"):
        assert by_id[rid]["training_time_s"] is None
    assert by_id["promptintern"]["training_time_s"] == 1200.0
    base = by_id["base_full"]
    assert (base["token_reduction"], base["speedup"], base["cost_saving"]) == (0.0, 1.0, 0.0)
    pi = by_id["promptintern"]
    assert pi["token_reduction"] == pytest.approx(0.9375)
    assert pi["speedup"] == pytest.approx(4.0)
    assert pi["latency_p95_s"] == pytest.approx(1.5)
    assert pi["cost_per_1k_requests_usd"] == pytest.approx(0.0195)
    assert pi["cost_saving"] == pytest.approx(round(1 - 0.0195 / 0.132, 4))
    assert by_id["promptintern_gateway"]["original_input_tokens"] == 802.0
    # The second speed-up column: row 5's median latency (4.4 s) over the row's.
    assert pi["speedup_vs_ft"] == pytest.approx(4.4)
    assert by_id["full_prompt_ft"]["speedup_vs_ft"] == 1.0
    assert by_id["promptintern_merged"]["speedup_vs_ft"] == pytest.approx(5.5)
    assert by_id["promptintern_merged"]["merged"] and not pi["merged"]
    json.dumps(rows, allow_nan=False)  # plain JSON: no NaN, no objects


def test_an_older_document_gains_the_new_column_and_an_unmeasured_row_9(rows: list[dict[str, Any]]) -> None:
    old = [{k: v for k, v in r.items() if k not in ("speedup_vs_ft", "merged")}
           for r in rows if r["id"] != "promptintern_merged"]
    completed = complete_rows(old)
    assert [r["id"] for r in completed] == list(ROW_IDS)
    by_id = {r["id"]: r for r in completed}
    assert by_id["promptintern"]["speedup_vs_ft"] == pytest.approx(4.4)
    row9 = by_id["promptintern_merged"]
    assert all(row9[k] is None for k in FIGURE_KEYS)
    assert row9["note"] == "this run predates the row"
    text = render_report({**_doc_of(completed)})
    assert "Row 9 (the adapter merged into the weights) was not measured: this run predates the row." in text


def test_rows_need_the_baseline() -> None:
    with pytest.raises(ValueError, match="base_full"):
        table_rows([_measurement(CONDITIONS[1])], PRICES)


def test_document_shape_and_headline(doc: dict[str, Any]) -> None:
    assert {"engine", "machine", "date", "rows"} <= set(doc)
    assert doc["engine"] == "embedded"
    assert doc["headline"]["paper"] == PAPER_HEADLINE
    pi = next(r for r in doc["rows"] if r["id"] == "promptintern")
    assert doc["headline"]["ours"] == {k: pi[k] for k in PAPER_HEADLINE}
    parsed = json.loads(json.dumps(doc, allow_nan=False))
    assert parsed["rows"][4]["latency_p50_s"] is None


def test_report_renders_table_findings_and_dashes(doc: dict[str, Any]) -> None:
    text = render_report(doc)
    assert "| 1 | Base model, full prompt" in text
    for condition in CONDITIONS:
        assert condition.label in text
    row4 = next(line for line in text.splitlines() if line.startswith("| 4 |"))
    assert row4.count("—") == 12
    assert "93.8% — at or above the paper's >90%" in text
    assert "4.00× (4.00× faster) — below the paper's 4.2×" in text
    assert "Row 4 (prefix caching) was not measured: the embedded engine has no prefix cache." in text
    assert "| 9 | PromptIntern merged into the weights (merged serving), bare query | 50 |" in text
    assert "| 93.8% | 5.00× | 85.2% | 5.50× |" in text  # row 9: tokens −, speed-up vs 1, cost −, speed-up vs 5
    assert ("Merged serving (row 9), the best serving option here: 0.80 s median, 5.00× faster than the full "
            "prompt (row 1) and 1.25× faster than row 7's LoRA route; about 40 ms per answer token against 50 ms "
            "for the bare query on the base model (row 2, -20%)") in text
    assert ("the column \"speed-up vs 5\": row 7 4.40× faster (BLEU 28.0), row 9 5.50× faster (BLEU 28.0): "
            "trained answers without paying for the prompt, worth it where the BLEU beside each is close to "
            "row 5's.") in text
    assert "Under load (8 requests at concurrency 8): PromptIntern serves 2.00 requests/s against row 1's 0.50 " \
           "(4.00×): when" in text
    assert "2026-11-29 06:00 UTC" in text
    assert "`` ls `pwd`/*.py ``" in text  # backticks inside an answer stay inline code
    assert "None" not in text and "nan" not in text.lower()


def test_readme_section_names_date_machine_and_command(doc: dict[str, Any]) -> None:
    text = render_readme_section(doc, "results/paper/report.md")
    assert "2026-11-29 06:00 UTC" in text and "test CPU, 2 CPU cores" in text
    assert "`promptintern bench paper --quick`" in text
    assert "| 7 | PromptIntern (progressive), bare query |" in text
    assert "| 3a | Compressed prompt, keep_ratio 0.5" in text  # every row, not a selection
    assert "(results/paper/latency.png)" in text and "(results/paper/paper.json)" in text


def test_readme_carries_a_committed_runs_section_verbatim(request: pytest.FixtureRequest) -> None:
    """Every figure in the README's paper section comes from a run: the section is the results folder's
    generated readme_section.md, pasted whole."""
    root = request.config.rootpath
    readme = (root / "README.md").read_text()
    found = re.search(r"Full report: \[(docs/[\w.-]+)/report\.md\]", readme)
    assert found, "the README names no committed report under docs/"
    folder = root / found.group(1)
    section = (folder / "readme_section.md").read_text()
    assert section.strip() in readme
    doc = json.loads((folder / "paper.json").read_text())
    assert {r["id"] for r in doc["rows"]} == set(ROW_IDS)
    for name in ("report.md", "quality_vs_tokens.png", "latency.png"):
        assert (folder / name).is_file()


@pytest.mark.parametrize("folder", ["docs/paper-full", "docs/paper-quick"])
def test_rebuild_reproduces_the_committed_reports(folder: str, request: pytest.FixtureRequest, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed report and README section are exactly what `--rebuild` renders from their paper.json."""
    committed = request.config.rootpath / folder
    copy = tmp_path / folder
    shutil.copytree(committed, copy)
    monkeypatch.chdir(tmp_path)  # the README section names the folder as it was given
    rebuild_report(Path(folder))
    for name in ("report.md", "readme_section.md"):
        assert (copy / name).read_text() == (committed / name).read_text(), name


def test_plots_are_written(doc: dict[str, Any], tmp_path: Path) -> None:
    paths = write_plots(doc, tmp_path)
    assert [p.name for p in paths] == ["quality_vs_tokens.png", "latency.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bootstrap_interval_is_sacrebleus_and_holds_the_corpus_score() -> None:
    from sacrebleu.metrics import BLEU

    from trainer.evaluate import score

    preds = ["ls -l", "find . -name '*.py'", "du -sh", "wc -l a.txt", "pwd", "cat x", "ls -a", "head -n 5 f"]
    refs = [["ls -la"], ["find . -name '*.py'"], ["du -sh ."], ["wc -l a.txt"], ["pwd", "echo $PWD"], ["head x"],
            ["ls -A"], ["head -n 5 f"]]
    low, high = bootstrap_bleu(preds, refs)
    assert not math.isnan(low) and low < high
    assert low <= score(preds, refs)["bleu"] <= high
    assert bootstrap_bleu(preds, refs) == (low, high)  # seeded: a rerun gives the same interval
    streams: list[list[str | None]] = [[r[0] for r in refs], [r[1] if len(r) > 1 else None for r in refs]]
    expected = BLEU().corpus_score(preds, streams, n_bootstrap=1000)  # type: ignore[arg-type]
    assert (low + high) / 2 == pytest.approx(expected._mean)
    assert (high - low) / 2 == pytest.approx(expected._ci)
    with pytest.raises(ValueError):
        bootstrap_bleu(preds[:1], refs[:1])


def test_options_quick_and_full() -> None:
    quick, full = PaperOptions(quick=True), PaperOptions()
    assert (quick.test_rows(70), quick.throughput, quick.eager) == (8, 8, True)
    assert (full.test_rows(70), full.throughput, full.eager) == (70, 32, False)
    assert PaperOptions(rows=500).test_rows(70) == 70
    assert PaperOptions(fast_start=True).eager


def test_inputs_full_bare_and_compressed() -> None:
    template = parse_template(messages=[
        {"role": "system", "content": "Translate into bash.\nInput: list files\nOutput: ls"},
        {"role": "user", "content": "Input: {query}\nOutput:"},
    ])
    compressed = [CompressedTemplate(0.5, {0: "Translate bash. list ls"}, 5, 10)]
    inputs = build_inputs(template, ["show the date"], compressed)
    assert inputs["full"][0][1] == {"role": "user", "content": "Input: show the date\nOutput:"}
    assert inputs["bare"][0] == [{"role": "user", "content": "show the date"}]
    assert inputs["compressed:0.5"][0] == [{"role": "system", "content": "Translate bash. list ls"},
                                           {"role": "user", "content": "Input: show the date\nOutput:"}]
    keys = {input_key(c) for c in CONDITIONS}
    assert keys == {"full", "bare", "compressed:0.5", "compressed:0.2"}


def test_cli_parses_paper_and_rebuilds_from_json(doc: dict[str, Any], tmp_path: Path) -> None:
    args = build_parser().parse_args(["bench", "paper", "--quick", "--out", str(tmp_path), "--price-input-per-1k",
                                      "0.001"])
    assert (args.target, args.quick, args.price_input_per_1k) == ("paper", True, 0.001)
    (tmp_path / "paper.json").write_text(json.dumps(doc))
    rebuild = build_parser().parse_args(["bench", "paper", "--rebuild", "--out", str(tmp_path)])
    assert rebuild.func(rebuild) == 0
    assert {"report.md", "quality_vs_tokens.png", "latency.png", "readme_section.md"} <= {
        p.name for p in tmp_path.iterdir()}


def test_rebuild_adds_the_trainers_own_evaluation_when_the_key_matches(doc: dict[str, Any], tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    manifest = {"cache_key": "k" * 64, "evaluation": {
        "decoding": "greedy, max_new_tokens=64", "rows": 70,
        "conditions": {"adapter+bare": {"n": 70, "bleu": 29.04, "exact_match": 4.29, "input_tokens": 48,
                                        "latency_s": 1.49, "predictions_hidden": True}}}}
    (adapter / "manifest.json").write_text(json.dumps(manifest))
    doc["adapters"] = [{"schedule": "promptintern", "path": str(adapter), "source": "trainer cache",
                        "cache_key": "k" * 64, "training_seconds": 1200.0, "created": "2026-11-29"},
                       {"schedule": "direct", "path": str(adapter), "source": "trainer cache",
                        "cache_key": "other", "training_seconds": 800.0, "created": "2026-11-29"}]
    out = tmp_path / "out"
    out.mkdir()
    (out / "paper.json").write_text(json.dumps(doc))
    rebuild_report(out)
    report = (out / "report.md").read_text()
    assert "adapter+bare BLEU 29.0, EM 4.3%, 1.49 s" in report
    assert report.count("The trainer's own evaluation") == 1  # the stale key gets nothing


def _adapter_folder(root: Path, name: str, r: int, rank_pattern: dict[str, int] | None = None) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r,
                                                            "rank_pattern": rank_pattern or {}}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def test_lora_slots_are_sized_to_the_largest_adapter_rank_vllm_accepts(tmp_path: Path) -> None:
    from benchmarks.paper.adapters import lora_rank_limit
    from core.errors import InvalidAdapter

    r4, r8 = _adapter_folder(tmp_path, "a", 4), _adapter_folder(tmp_path, "b", 8)
    assert lora_rank_limit([r4], 16) == 8  # vLLM has no rank-4 slots: the next size up
    assert lora_rank_limit([r4, r8], 16) == 8
    assert lora_rank_limit([r4, _adapter_folder(tmp_path, "c", 8, {"q_proj": 12})], 16) == 16
    assert lora_rank_limit([], 16) == 16
    with pytest.raises(InvalidAdapter, match="exceeds"):
        lora_rank_limit([_adapter_folder(tmp_path, "d", 32)], 16)


def test_row_8_serves_an_adapter_named_by_a_path_relative_to_the_working_folder(
        tiny_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row 8 as `bench paper` runs it (the trainer's adapter under ./adapters, the real gateway in front of the
    engine), on the tiny model: the prompt is registered with the adapter, and every request takes the adapter
    route."""
    from types import SimpleNamespace

    from benchmarks.paper.adapters import AdapterInfo
    from benchmarks.paper.inputs import Workload
    from benchmarks.paper.measure import measure_through_gateway
    from benchmarks.paper.options import Progress
    from tests.conftest import gateway_settings
    from trainer.lora import random_lora

    monkeypatch.chdir(tmp_path)
    random_lora(tiny_model_path, tmp_path / "adapters" / "row8" / "v1", seed=0)
    adapter = AdapterInfo("promptintern", Path("adapters/row8/v1"), "trained now", "k" * 64, None, None)
    examples = "\n".join(f"Input: {q}\nOutput: {a}" for q, a in (("count lines in a.txt", "wc -l a.txt"),
                                                                  ("show disk usage", "du -sh ."),
                                                                  ("print the working folder", "pwd")))
    messages = [{"role": "system", "content": f"Translate the request into one bash command.\n{examples}"},
                {"role": "user", "content": "Input: {query}\nOutput:"}]
    example = SimpleNamespace(name="row8", registration=lambda: {"name": "row8", "messages": messages})
    full = [[messages[0], {"role": "user", "content": f"Input: {q}\nOutput:"}] for q in ("list files", "show date")]
    work = Workload(queries=["list files", "show date"], references=[["ls"], ["date"]], inputs={"full": full},
                    warmup={"full": full[:1]}, throughput_requests=2)
    settings = gateway_settings(tmp_path, tiny_model_path, engine="embedded")
    row8 = next(c for c in CONDITIONS if c.gateway)
    m = measure_through_gateway(settings, row8, example, adapter, work, 4, tmp_path / "run", Progress())
    assert m.n == 2 and m.input_tokens is not None and m.original_input_tokens is not None
    assert m.input_tokens < m.original_input_tokens  # the gateway stripped the prompt: the adapter route
    assert m.note == "all 5 requests sent the full prompt over HTTP and took the adapter route"
