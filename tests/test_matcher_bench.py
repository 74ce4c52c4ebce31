"""`promptintern bench matcher`, detection and `--startup`, on small counts: the figures exist and the hit, miss and
start-up checks inside the benchmark hold (no timing is asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import matcher as bench
from core.config import Settings
from gateway.cli import main
from gateway.registry.store import PromptRegistry


def test_detection_rows() -> None:
    rows = bench.run(counts=(20, 3), request_tokens=300, repeats=5)
    assert [row["templates"] for row in rows] == [3, 20]
    for row in rows:
        assert row["request_tokens_est"] >= 299
        for field in ("add_us", "hit_median_us", "fresh_hit_median_us", "miss_median_us", "miss_p99_us"):
            assert row[field] > 0, field


def test_bulk_registered_prompts_are_the_registry_s_own(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    registry = PromptRegistry(url)
    try:
        bench.bulk_register(registry, 12, batch=5)
        records = registry.all()
        assert [r.name for r in records] == [bench.template_name(i) for i in range(12)]
        assert records[7].template == bench.template_source(7) and records[7].kind == "chat"
        assert registry.get(bench.template_name(3)).versions == []
    finally:
        registry.close()


def test_startup_rows(tmp_path: Path) -> None:
    rows = bench.run_startup(counts=(40,), token_sample=0, settings=Settings(data_dir=tmp_path))
    [row] = rows
    assert row["templates"] == 40 and row["tokens_s"] is None
    for step in ("insert_s", "open_s", "list_s", "parse_s", "matcher_s", "metrics_s"):
        assert row[step] > 0, step
    assert row["total_s"] == pytest.approx(sum(row[s] for s in ("open_s", "list_s", "parse_s", "matcher_s",
                                                                 "metrics_s")))


def test_the_cli_runs_startup(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "matcher", "--startup", "--templates", "15", "--token-sample", "0"])
    assert exited.value.code in (0, None)
    out = capsys.readouterr().out
    assert "15 prompts bulk-inserted" in out and "matcher s" in out
    with pytest.raises(SystemExit) as exited:
        main(["bench", "matcher", "--startup", "--token-sample", "-1"])
    assert exited.value.code == 2
    assert "--token-sample: must be at least 0, got -1" in capsys.readouterr().err
