"""`promptintern bench`: one subcommand per target with its own flags, and one line (no traceback) with status 2
for a missing input, a missing `[bench]` extra, or benchmarks that are not installed at all."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gateway.cli import build_parser, main


def _exit_status(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return int(exited.value.code or 0)


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_each_target_has_its_own_flags_and_defaults() -> None:
    parser = build_parser()
    matcher = parser.parse_args(["bench", "matcher"])
    assert (matcher.target, matcher.templates, matcher.request_tokens, matcher.repeats) == (
        "matcher", [10, 1000, 10000], 2000, 2000)
    assert parser.parse_args(["bench", "gateway"]).rounds == 2000
    engines = parser.parse_args(["bench", "engines", "--skip-vllm"])
    assert (engines.requests, engines.max_tokens, engines.skip_vllm) == (16, 16, True)
    dashboard = parser.parse_args(["bench", "dashboard"])
    assert (dashboard.out, dashboard.deploy_dir, dashboard.window) == (
        Path("results/dashboard.png"), Path("deploy"), "5m")
    paper = parser.parse_args(["bench", "paper"])
    assert (paper.out, paper.max_tokens, paper.requests, paper.quick) == (Path("results/paper"), 48, None, False)


def test_flags_of_another_target_and_bad_counts_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_status(["bench", "matcher", "--quick"]) == 2
    assert "unrecognized arguments: --quick" in capsys.readouterr().err
    assert _exit_status(["bench", "paper", "--requests", "0"]) == 2
    assert "--requests: must be at least 1, got 0" in capsys.readouterr().err


def test_a_missing_results_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_status(["bench", "paper", "--rebuild", "--out", str(tmp_path / "none")]) == 2
    line = _one_line(capsys)
    assert line.startswith("promptintern bench paper: no ") and "paper.json" in line


def test_missing_deploy_files_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "dashboard", "--prometheus-url", "http://127.0.0.1:9", "--deploy-dir", str(tmp_path)]
    assert _exit_status(argv) == 2
    line = _one_line(capsys)
    assert f"no deploy files at {tmp_path}" in line and "--deploy-dir" in line


def test_without_matplotlib_the_plotting_targets_say_how_to_install_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets where it is missing
    for argv in (["bench", "paper", "--rebuild", "--out", str(tmp_path)], ["bench", "dashboard"]):
        assert _exit_status(argv) == 2
        assert _one_line(capsys) == (f"promptintern bench {argv[1]}: matplotlib is not installed (the [bench] "
                                     "extra): pip install -e .[bench]")


def test_without_the_benchmarks_bench_says_how_to_install_them(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "benchmarks.cli", None)
    for argv in (["bench", "paper", "--quick"], ["bench", "--help"], ["bench"]):
        assert _exit_status(argv) == 2
        assert _one_line(capsys) == "promptintern bench: the benchmarks are not installed: pip install -e .[bench]"
    assert build_parser().parse_args(["admin-key"]).command == "admin-key"  # the rest of the CLI is unaffected


def test_bench_gateway_measures_every_condition_on_the_tiny_model(tiny_model_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A short real run on the instant engine: each condition timed on both sides, then profiled step by step."""
    from benchmarks import gateway
    from core.config import Settings

    rows = gateway.run(Settings(base_model=tiny_model_path), rounds=3, profile=True, profile_rounds=2)
    assert {name: {side: len(v) for side, v in sides.items()} for name, sides in rows["times"].items()} == {
        gateway.condition_name(route, stream): {"gateway": 3, "direct": 3} for route, stream in gateway.CONDITIONS}
    assert set(rows["summary"]) == set(rows["times"])
    adapter = rows["profile"]["adapter, whole"]["steps_us"]
    assert adapter["  detection (matcher)"] > 0 and adapter["  token counting"] > 0
    assert rows["profile"]["passthrough, streamed"]["steps_us"]["SSE framing (format_sse_event)"] > 0
    out = capsys.readouterr().out
    assert "added median ms" in out and "Where a gateway request's time goes (adapter, whole" in out


@pytest.mark.parametrize("target", ["paper", "crossover", "levers"])
def test_an_incomplete_results_document_is_one_line(target: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / f"{target}.json").write_text("{}")
    assert _exit_status(["bench", target, "--rebuild", "--out", str(tmp_path)]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"promptintern bench {target}: {tmp_path / f'{target}.json'} is not a complete results")
