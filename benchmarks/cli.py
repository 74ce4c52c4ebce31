"""`promptintern bench TARGET`: one subcommand per benchmark, each with its own flags.

`gateway.cli` adds this parser when the benchmarks are installed, so the runtime never imports
them. Each target imports its module only when it runs; a missing input (a results folder, the
deploy files, matplotlib from the `[bench]` extra) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks.deploy import DEFAULT_DEPLOY_DIR, DeployFiles
from benchmarks.errors import BenchInputError
from benchmarks.paper.options import DEFAULT_MAX_NEW_TOKENS, DEFAULT_OUT
from core.config import Settings

INSTALL_HINT = "pip install -e .[bench]"
Command = Callable[[argparse.Namespace], int]


def require_matplotlib() -> None:
    """Raise a BenchInputError with the install hint unless matplotlib (the `[bench]` extra) can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise BenchInputError(f"matplotlib is not installed (the [bench] extra): {INSTALL_HINT}") from exc


def _guarded(command: Command, *, plots: bool = False) -> Command:
    """`command`, with a missing input reported as one line and status 2 instead of a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            if plots:
                require_matplotlib()
            return command(args)
        except BenchInputError as exc:
            print(f"promptintern bench {args.target}: {exc}", file=sys.stderr)
            return 2

    return run


def count(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def at_least_zero(text: str) -> int:
    """An argparse type: a whole number of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def cmd_matcher(args: argparse.Namespace) -> int:
    from benchmarks import matcher

    if args.startup:
        matcher.run_startup(counts=tuple(args.templates), token_sample=args.token_sample)
    else:
        matcher.run(counts=tuple(args.templates), request_tokens=args.request_tokens, repeats=args.repeats)
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from benchmarks import gateway

    gateway.run(Settings(), rounds=args.rounds, engine=args.engine, max_tokens=args.max_tokens,
                profile=args.profile, profile_rounds=args.profile_rounds, profile_out=args.profile_out)
    return 0


def cmd_engines(args: argparse.Namespace) -> int:
    from benchmarks import engines

    engines.run(Settings(), requests=args.requests, max_tokens=args.max_tokens, fast_start=args.fast_start,
                skip_vllm=args.skip_vllm)
    return 0


def cmd_batching(args: argparse.Namespace) -> int:
    from benchmarks import batching

    batching.run(Settings(), before=args.before, concurrency=tuple(args.concurrency), requests=args.requests,
                 max_tokens=args.max_tokens, skip_before=args.skip_before)
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from benchmarks import load

    load.run(Settings(), requests=args.requests, max_tokens=args.max_tokens, timeout=args.timeout,
             max_queued=args.max_queued, with_vllm=args.vllm, fast_start=args.fast_start)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from benchmarks import dashboard

    out = dashboard.run(Settings(), args.out, prometheus_url=args.prometheus_url, window=args.window,
                        duration=args.duration, model_path=args.model, deploy=DeployFiles(args.deploy_dir))
    print(f"dashboard picture: {out}")
    return 0


def cmd_paper(args: argparse.Namespace) -> int:
    from benchmarks.paper.conditions import Prices
    from benchmarks.paper.options import PaperOptions
    from benchmarks.paper.run import rebuild_report, run

    if args.rebuild:
        rebuild_report(args.out)
        return 0
    settings = Settings()
    prices = Prices(
        settings.price_input_per_1k if args.price_input_per_1k is None else args.price_input_per_1k,
        settings.price_output_per_1k if args.price_output_per_1k is None else args.price_output_per_1k)
    options = PaperOptions(
        quick=args.quick, rows=args.requests, throughput_requests=args.throughput_requests,
        max_new_tokens=args.max_tokens, fast_start=args.fast_start, skip_vllm=args.skip_vllm, out=args.out,
        prices=prices)
    run(settings, options)
    return 0


def cmd_discovery(args: argparse.Namespace) -> int:
    from benchmarks import discovery

    discovery.run(Settings(), request_tokens=args.request_tokens, repeats=args.repeats, distinct=args.distinct,
                  words=args.words, trials=args.trials)
    return 0


def cmd_crossover(args: argparse.Namespace) -> int:
    from benchmarks import crossover

    if args.rebuild:
        crossover.rebuild(args.out)
        return 0
    engines = crossover.ENGINES if args.engine == "both" else (args.engine,)
    crossover.run(Settings(), crossover.CrossoverOptions(quick=args.quick, requests=args.requests,
                                                         lengths=tuple(args.lengths), fast_start=args.fast_start,
                                                         out=args.out, engines=engines,
                                                         cell_budget_s=args.cell_budget))
    return 0


def add_bench_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`bench` and its targets on `commands` (the `promptintern` parser's subcommands)."""
    bench = commands.add_parser("bench", help="benchmarks that print figures (the [bench] extra)",
                                description="Benchmarks that print figures; none of them asserts a timing.")
    targets = bench.add_subparsers(dest="target", required=True, metavar="TARGET")
    _add_matcher(targets)
    _add_gateway(targets)
    _add_engines(targets)
    _add_batching(targets)
    _add_load(targets)
    _add_dashboard(targets)
    _add_paper(targets)
    _add_discovery(targets)
    _add_traffic(targets)
    _add_crossover(targets)
    _add_levers(targets)


def _add_traffic(targets: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = targets.add_parser("traffic", help="learning from traffic on NL2Bash: record an upstream's answers, train "
                                           "from them (no labels), compare with gold-label training")
    p.add_argument("--train-rows", type=count, default=120, help="training queries sent and recorded (default 120)")
    p.add_argument("--test-rows", type=count, default=40, help="held-out test queries (default 40)")
    p.add_argument("--schedule", default="demo", help="training schedule preset for both adapters (default demo)")
    p.add_argument("--teacher-adapter", type=Path, default=None,
                   help="an adapter folder the upstream serves the prompt with (a stronger teacher); default: the "
                        "base model with the full prompt")
    p.add_argument("--steps-per-stage", type=count, nargs="+", default=None,
                   help="override the schedule's steps per stage (a quick look; not the preset's quality)")
    p.add_argument("--no-shadow", action="store_true", help="skip the shadow guard latency measurement")
    p.add_argument("--max-tokens", type=count, default=64, help="answer tokens asked for, greedy (default 64)")
    p.add_argument("--no-kl", action="store_true",
                   help="skip the third adapter (the recorded rows with the kl objective; base-model teacher only)")
    p.add_argument("--out", type=Path, default=Path("docs/traffic"),
                   help="results folder: traffic.json, report.md, readme_section.md (default docs/traffic)")
    p.set_defaults(func=_guarded(cmd_traffic))


def cmd_traffic(args: argparse.Namespace) -> int:
    from benchmarks.traffic import TrafficOptions, run

    run(Settings(), TrafficOptions(train_rows=args.train_rows, test_rows=args.test_rows, schedule=args.schedule,
                                   teacher_adapter=args.teacher_adapter, out=args.out, shadow=not args.no_shadow,
                                   kl=not args.no_kl, steps_per_stage=args.steps_per_stage,
                                   max_tokens=args.max_tokens))
    return 0


def _add_discovery(targets: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = targets.add_parser("discovery", help="prompt discovery: response-path cost, memory, precision and recall")
    p.add_argument("--request-tokens", type=count, default=2000, help="request size in tokens (default 2000)")
    p.add_argument("--repeats", type=count, default=5000, help="offers timed (default 5000)")
    p.add_argument("--distinct", type=count, default=10_000, help="distinct requests for the memory figure "
                                                                   "(default 10000)")
    p.add_argument("--words", type=count, default=300, help="words per distinct request (default 300)")
    p.add_argument("--trials", type=count, default=40, help="generated traffic mixes scored (default 40)")
    p.set_defaults(func=_guarded(cmd_discovery))


def _add_matcher(targets: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = targets.add_parser("matcher", help="detection time against the number of registered templates")
    p.add_argument("--templates", type=count, nargs="+", default=[10, 1000, 10000],
                   help="numbers of registered templates (default 10 1000 10000)")
    p.add_argument("--request-tokens", type=count, default=2000, help="request size in tokens (default 2000)")
    p.add_argument("--repeats", type=count, default=2000, help="detections timed per row (default 2000)")
    p.add_argument("--startup", action="store_true",
                   help="time a gateway's start-up instead: that many prompts bulk-inserted into a new SQLite "
                        "registry, then listed, parsed, matched and counted")
    p.add_argument("--token-sample", type=at_least_zero, default=1000, metavar="N",
                   help="with --startup: templates whose static tokens are counted, extrapolated to all "
                        "(default 1000; 0 skips it and loading the tokenizer)")
    p.set_defaults(func=_guarded(cmd_matcher))


def _add_gateway(targets: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = targets.add_parser("gateway", help="the gateway's added latency against calling the engine directly")
    p.add_argument("--rounds", "--requests", dest="rounds", type=count, default=2000,
                   help="interleaved rounds, each one request per condition and side (default 2000)")
    p.add_argument("--engine", choices=("instant", "embedded"), default="instant",
                   help="instant: a stand-in that answers at once, so only the gateway's cost shows (default); "
                        "embedded: the real model (use few rounds)")
    p.add_argument("--max-tokens", type=count, default=None,
                   help="answer tokens asked for (default 16 on instant, whose answer has 8; 1 on embedded)")
    p.add_argument("--profile", action="store_true",
                   help="then profile the gateway alone (cProfile) and print where a request's time goes")
    p.add_argument("--profile-rounds", type=count, default=500, help="requests per condition profiled (default 500)")
    p.add_argument("--profile-out", type=Path, default=None,
                   help="also save each condition's cProfile stats next to this path (for snakeviz, pstats)")
    p.set_defaults(func=_guarded(cmd_gateway))


def _add_engines(targets: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = targets.add_parser("engines", help="full prompt vs bare query on the embedded engine and vLLM")
    p.add_argument("--requests", type=count, default=16, help="requests per condition (default 16)")
    p.add_argument("--max-tokens", type=count, default=16, help="tokens generated per request (default 16)")
    p.add_argument("--fast-start", action="store_true",
                   help="start vLLM in eager mode (starts in seconds, serves slower)")
    p.add_argument("--skip-vllm", action="store_true", help="embedded engine only")
    p.set_defaults(func=_guarded(cmd_engines))


def _add_batching(targets: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from benchmarks.batching import BEFORE_BATCHING

    p = targets.add_parser("batching", help="embedded engine throughput before and after continuous batching")
    p.add_argument("--before", default=BEFORE_BATCHING,
                   help=f"git commit of the engine to compare with (default {BEFORE_BATCHING}, the last without "
                        "batching; run from the repository)")
    p.add_argument("--skip-before", action="store_true", help="measure the installed engine only")
    p.add_argument("--concurrency", type=count, nargs="+", default=[1, 8, 32],
                   help="concurrency levels (default 1 8 32)")
    p.add_argument("--requests", type=count, default=32, help="requests per row (default 32)")
    p.add_argument("--max-tokens", type=count, default=16, help="tokens generated per request (default 16)")
    p.set_defaults(func=_guarded(cmd_batching))


def _add_load(targets: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = targets.add_parser("load", help="concurrent streaming requests on a live gateway: errors, latency, RSS")
    p.add_argument("--requests", type=count, default=200, help="requests sent at once, per burst (default 200)")
    p.add_argument("--max-tokens", type=count, default=8, help="tokens generated per request (default 8)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a client gives up (default 300)")
    p.add_argument("--max-queued", type=count, default=None,
                   help="the embedded engine's MAX_QUEUED_REQUESTS (default: the setting's)")
    p.add_argument("--vllm", action="store_true", help="also on vLLM (started here; needs .venv-vllm)")
    p.add_argument("--fast-start", action="store_true",
                   help="start vLLM in eager mode (starts in seconds, serves slower)")
    p.set_defaults(func=_guarded(cmd_load))


def _add_dashboard(targets: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = targets.add_parser("dashboard", help="draw the cost dashboard's main panels to a PNG")
    p.add_argument("--out", type=Path, default=Path("results/dashboard.png"),
                   help="the PNG to write (default results/dashboard.png)")
    p.add_argument("--prometheus-url", help="draw from this Prometheus instead of a demo stack "
                                            "(gateway + Prometheus + mixed traffic started here)")
    p.add_argument("--window", default="5m", help="time range drawn from --prometheus-url (default 5m)")
    p.add_argument("--duration", type=float, default=45.0, help="seconds of demo traffic (default 45)")
    p.add_argument("--model", type=Path, help="demo: a local HF model folder (default: the base model)")
    p.add_argument("--deploy-dir", type=Path, default=DEFAULT_DEPLOY_DIR,
                   help=f"the repository's deploy folder, whose dashboard and Prometheus rules are drawn and "
                        f"evaluated (default {DEFAULT_DEPLOY_DIR}/ in the working directory)")
    p.set_defaults(func=_guarded(cmd_dashboard, plots=True))


def _add_paper(targets: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = targets.add_parser("paper", help="the paper's table on NL2Bash (every row in one run) into a results folder")
    p.add_argument("--quick", action="store_true",
                   help="the same pipeline on the first 8 test rows, 8 requests at concurrency 8, vLLM in eager "
                        "mode (under 10 minutes when the adapters are cached)")
    p.add_argument("--requests", type=count, default=None,
                   help="test rows per row of the table (default all 70; --quick 8)")
    p.add_argument("--throughput-requests", type=count, default=None,
                   help="requests per row at concurrency 8 (default 32; --quick 8)")
    p.add_argument("--max-tokens", type=count, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"most new tokens per answer (default {DEFAULT_MAX_NEW_TOKENS}; answers also stop at the "
                        "first newline)")
    p.add_argument("--fast-start", action="store_true",
                   help="start vLLM in eager mode (starts in seconds, serves slower)")
    p.add_argument("--skip-vllm", action="store_true", help="embedded engine only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the results folder (default {DEFAULT_OUT})")
    p.add_argument("--price-input-per-1k", type=float, default=None,
                   help="USD per 1,000 input tokens (default PROMPTINTERN_PRICE_INPUT_PER_1K)")
    p.add_argument("--price-output-per-1k", type=float, default=None,
                   help="USD per 1,000 output tokens (default PROMPTINTERN_PRICE_OUTPUT_PER_1K)")
    p.add_argument("--rebuild", action="store_true",
                   help="re-render report.md, plots and readme_section.md from --out's paper.json")
    p.set_defaults(func=_guarded(cmd_paper, plots=True))


def _add_crossover(targets: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from benchmarks.crossover import CELL_BUDGET_S, DEFAULT_OUT, LENGTHS

    p = targets.add_parser("crossover", help="from which prompt length internalising beats prefix caching (vLLM and "
                                             "the embedded engine)",
                           description="Full prompt (without and with prefix caching), adapter (LoRA), merged "
                                       "adapter and bare query on the base model, at prompt lengths x concurrency "
                                       "1 and 8, 32 answer tokens, on the embedded engine (no prefix cache, no "
                                       "merged serving: those are reported as not applicable) and on vLLM; then "
                                       "the adapter route through the gateway on vLLM (LoRA and merged) at a "
                                       "~2,000-token prompt. Writes crossover.json (after every cell), "
                                       "crossover.png and readme_section.md.")
    p.add_argument("--engine", choices=("vllm", "embedded", "both"), default="both",
                   help="the engines measured, one JSON for both (default both: the embedded engine, then vLLM)")
    p.add_argument("--quick", action="store_true",
                   help="2 requests per cell at concurrency 1 and 8 at concurrency 8; the full prompt without "
                        "caching at concurrency 8 only up to 1,000 tokens")
    p.add_argument("--requests", type=count, default=None, help="requests per cell at concurrency 1 (default 4)")
    p.add_argument("--lengths", type=count, nargs="+", default=list(LENGTHS),
                   help="recurring prompt lengths in tokens (default 250 500 1000 2000 4000)")
    p.add_argument("--cell-budget", type=count, default=int(CELL_BUDGET_S),
                   help="seconds one cell may take: at concurrency 1 no request is sent that would end past it, at "
                        "concurrency 8 a cell that would overrun it at concurrency 1's pace is skipped; both are "
                        f"listed in the report (default {CELL_BUDGET_S:.0f})")
    p.add_argument("--fast-start", action="store_true",
                   help="vLLM engines in eager mode (start in about a minute, serve slower)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the results folder (default {DEFAULT_OUT})")
    p.add_argument("--rebuild", action="store_true", help="re-render the plot and readme_section.md from --out's JSON")
    p.set_defaults(func=_guarded(cmd_crossover, plots=True))


def cmd_levers(args: argparse.Namespace) -> int:
    from benchmarks import levers

    if args.rebuild:
        levers.rebuild(args.out)
        return 0
    levers.run(Settings(), levers.LeversOptions(quick=args.quick, requests=args.requests, test_rows=args.test_rows,
                                                configs=tuple(args.configs) if args.configs else None,
                                                out=args.out, resume=args.resume))
    return 0


def _add_levers(targets: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from benchmarks.levers import CONFIG_KEYS, DEFAULT_OUT

    p = targets.add_parser("levers", help="what brings LoRA's serving overhead down on vLLM, side by side",
                           description="Two NL2Bash adapters (demo schedule, rank 8; targets q,k,v,o and q,v) "
                                       "scored on the test rows, then one vLLM start per configuration (plain, "
                                       "LoRA defaults, --max-lora-rank 8, --max-loras 1, --max-cpu-loras, "
                                       "--lora-target-modules, eager, merged): the bare query and each adapter "
                                       "at concurrency 1 and 8, 32 answer tokens. Writes levers.json and "
                                       "readme_section.md.")
    p.add_argument("--quick", action="store_true",
                   help="every engine eager (the eager-only configurations dropped), 2 requests per route at "
                        "concurrency 1 and 8 at 8, 8 test rows")
    p.add_argument("--requests", type=count, default=None,
                   help="requests per route at concurrency 1 (default 6; concurrency 8 sends 16)")
    p.add_argument("--test-rows", type=count, default=None, help="NL2Bash test rows scored per adapter (default 40)")
    p.add_argument("--configs", nargs="+", choices=CONFIG_KEYS, default=None, metavar="KEY",
                   help=f"run only these configurations (default all: {' '.join(CONFIG_KEYS)})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the results folder (default {DEFAULT_OUT})")
    p.add_argument("--resume", action="store_true",
                   help="keep the configurations --out's levers.json has measured and run only the missing ones "
                        "(same --quick and --requests; the section says which sitting measured what)")
    p.add_argument("--rebuild", action="store_true", help="re-render readme_section.md from --out's levers.json")
    p.set_defaults(func=_guarded(cmd_levers))
