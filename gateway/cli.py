"""The `promptintern` command: serve, model, admin-key, prompts, train, bench."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from core.config import Settings

ADMIN_KEY_FILE = "admin_key"


def _settings() -> Settings:
    return Settings()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port:
        overrides["port"] = args.port
    if args.engine:
        overrides["engine"] = args.engine
    settings = Settings(**overrides)
    if not settings.admin_key:
        print("promptintern serve: set PROMPTINTERN_ADMIN_KEY (the registry API's bearer token); "
              "`make serve` generates one for you", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level,
                timeout_graceful_shutdown=10)
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from core.basemodel import base_model_dir

    print(base_model_dir(_settings()))
    return 0


def cmd_vllm(args: argparse.Namespace) -> int:
    from core.basemodel import base_model_dir
    from gateway.vllm_server import VLLM_VENV, vllm_command, vllm_env, vllm_python

    settings = _settings()
    python = Path(args.python) if args.python else vllm_python()
    if not python.exists():
        print(f"promptintern vllm: {python} not found; `make vllm-venv` creates {VLLM_VENV}", file=sys.stderr)
        return 2
    try:
        command = vllm_command(settings, base_model_dir(settings), python=python, port=args.port,
                               max_loras=args.max_loras, max_model_len=args.max_model_len,
                               prefix_caching=not args.no_prefix_caching, fast_start=args.fast_start,
                               extra_args=vllm_extra_args(args.vllm_args))
    except ValueError as exc:
        print(f"promptintern vllm: {exc}", file=sys.stderr)
        return 2
    print("[promptintern] " + " ".join(command), flush=True)
    os.execve(command[0], command, vllm_env(threads=args.threads))
    return 0  # pragma: no cover - execve does not return


def vllm_extra_args(args: list[str]) -> list[str]:
    return args[1:] if args[:1] == ["--"] else args


def ensure_admin_key(settings: Settings) -> str:
    """The key from the environment, else the one stored in DATA_DIR (created with mode 600)."""
    if settings.admin_key:
        return settings.admin_key
    path = settings.data_dir / ADMIN_KEY_FILE
    if path.is_file():
        return path.read_text().strip()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    key = "pi-admin-" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


def cmd_admin_key(args: argparse.Namespace) -> int:
    print(ensure_admin_key(_settings()))
    return 0


def _client(args: argparse.Namespace) -> Any:
    import httpx

    settings = _settings()
    url = args.url or f"http://{settings.host}:{settings.port}"
    key = settings.admin_key
    if not key and (settings.data_dir / ADMIN_KEY_FILE).is_file():
        key = (settings.data_dir / ADMIN_KEY_FILE).read_text().strip()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=600)


def _show(response: Any) -> int:
    if response.status_code == 204:
        print("deleted")
        return 0
    try:
        print(json.dumps(response.json(), indent=2))
    except ValueError:
        print(response.text)
    return 0 if response.is_success else 1


def cmd_prompts(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "list":
            return _show(client.get("/v1/prompts"))
        if args.action == "show":
            return _show(client.get(f"/v1/prompts/{args.name}"))
        if args.action == "delete":
            return _show(client.delete(f"/v1/prompts/{args.name}"))
        if args.action == "add-adapter":
            return _show(client.post(f"/v1/prompts/{args.name}/adapters",
                                     json={"adapter_path": str(Path(args.adapter).resolve())}))
        body = json.loads(Path(args.file).read_text())
        body["name"] = args.name
        if args.adapter:
            body["adapter_path"] = str(Path(args.adapter).resolve())
        return _show(client.post("/v1/prompts", json=body))


def cmd_bench(args: argparse.Namespace) -> int:
    if args.target == "matcher":
        from benchmarks import matcher as matcher_bench

        matcher_bench.run(counts=tuple(args.templates), request_tokens=args.request_tokens, repeats=args.repeats)
        return 0
    if args.target == "dashboard":
        from benchmarks import dashboard

        out = dashboard.run(_settings(), Path(args.out or "results/dashboard.png"), prometheus_url=args.prometheus_url,
                            duration=args.duration)
        print(f"dashboard picture: {out}")
        return 0
    if args.target == "engines":
        from benchmarks import engines as engines_bench

        engines_bench.run(_settings(), requests=args.requests or 16, max_tokens=args.max_tokens or 16,
                          fast_start=args.fast_start, skip_vllm=args.skip_vllm)
        return 0
    if args.target == "paper":
        return _bench_paper(args)
    from benchmarks import gateway as gateway_bench

    gateway_bench.run(_settings(), requests=args.requests or 40)
    return 0


def _bench_paper(args: argparse.Namespace) -> int:
    from benchmarks import paper

    if args.rebuild:
        paper.rebuild_report(Path(args.out or "results/paper"))
        return 0
    settings = _settings()
    prices = paper.Prices(
        settings.price_input_per_1k if args.price_input_per_1k is None else args.price_input_per_1k,
        settings.price_output_per_1k if args.price_output_per_1k is None else args.price_output_per_1k)
    options = paper.PaperOptions(
        quick=args.quick, rows=args.requests, throughput_requests=args.throughput_requests,
        max_new_tokens=args.max_tokens or 48, fast_start=args.fast_start, skip_vllm=args.skip_vllm,
        out=Path(args.out or "results/paper"), prices=prices)
    paper.run(settings, options)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptintern",
        description="PromptIntern gateway: serve registered recurring prompts from LoRA adapters. "
                    "Settings come from PROMPTINTERN_* environment variables (see README).")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible gateway (needs PROMPTINTERN_ADMIN_KEY)")
    serve.add_argument("--host", help="listen address (default PROMPTINTERN_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default PROMPTINTERN_PORT or 8000)")
    serve.add_argument("--engine", choices=["embedded", "vllm"], help="engine (default PROMPTINTERN_ENGINE)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    model = sub.add_parser("model", help="materialise the base model (once) and print its folder")
    model.set_defaults(func=cmd_model)

    vllm = sub.add_parser("vllm", help="run vLLM's OpenAI server for this gateway (LoRA on, runtime loading on)")
    vllm.add_argument("--port", type=int, help="listen port (default PROMPTINTERN_VLLM_PORT or 8100)")
    vllm.add_argument("--python", help="the vLLM venv's python (default .venv-vllm/bin/python)")
    vllm.add_argument("--max-loras", type=int, default=4, help="adapters held at once (default 4)")
    vllm.add_argument("--max-model-len", type=int, default=4096, help="context length (default 4096)")
    vllm.add_argument("--no-prefix-caching", action="store_true", help="turn automatic prefix caching off")
    vllm.add_argument("--fast-start", action="store_true",
                      help="eager mode, no compilation: starts in ~30 s instead of ~3 min, serves slower")
    vllm.add_argument("--threads", type=int, help="OMP threads for vLLM on CPU")
    vllm.add_argument("vllm_args", nargs=argparse.REMAINDER,
                      help="after `--`: more arguments for vLLM's server, appended as given "
                           "(e.g. -- --enable-auto-tool-choice --tool-call-parser hermes)")
    vllm.set_defaults(func=cmd_vllm)

    admin = sub.add_parser("admin-key", help="print the admin key: PROMPTINTERN_ADMIN_KEY, else one kept in DATA_DIR")
    admin.set_defaults(func=cmd_admin_key)

    prompts = sub.add_parser("prompts", help="manage registered prompts on a running gateway")
    prompts.add_argument("--url", help="gateway URL (default http://PROMPTINTERN_HOST:PROMPTINTERN_PORT)")
    actions = prompts.add_subparsers(dest="action", required=True)
    register = actions.add_parser("register", help="register a template from a JSON file")
    register.add_argument("name", help="prompt name")
    register.add_argument("--file", required=True,
                          help="JSON with `messages` (chat) or `prompt` (completion), optional `examples`, `train`")
    register.add_argument("--adapter", help="an existing PEFT LoRA folder to serve for it")
    actions.add_parser("list", help="list prompts")
    for action, text in (("show", "show one prompt"), ("delete", "delete a prompt, its adapters and jobs")):
        p = actions.add_parser(action, help=text)
        p.add_argument("name")
    add = actions.add_parser("add-adapter", help="upload an adapter as the prompt's next version")
    add.add_argument("name")
    add.add_argument("adapter", help="PEFT LoRA folder")
    prompts.set_defaults(func=cmd_prompts)

    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench.add_argument("target", choices=["matcher", "gateway", "engines", "dashboard", "paper"],
                       help="matcher: detection time vs number of templates; "
                            "gateway: added latency against calling the engine directly; "
                            "engines: full prompt vs bare query on the embedded engine and vLLM; "
                            "dashboard: draw the cost dashboard's main panels to a PNG; "
                            "paper: the paper's table on NL2Bash (every row in one run) into a results folder")
    bench.add_argument("--templates", type=int, nargs="+", default=[10, 1000, 10000],
                       help="matcher: numbers of registered templates")
    bench.add_argument("--request-tokens", type=int, default=2000, help="matcher: request size in tokens")
    bench.add_argument("--repeats", type=int, default=2000, help="matcher: detections timed per row")
    bench.add_argument("--requests", type=int, default=None,
                       help="gateway: interleaved rounds (default 40); engines: requests per condition (default 16); "
                            "paper: test rows per row of the table (default all 70; --quick 8)")
    bench.add_argument("--max-tokens", type=int, default=None,
                       help="engines: tokens generated per request (default 16); paper: most new tokens per answer "
                            "(default 48; answers also stop at the first newline)")
    bench.add_argument("--fast-start", action="store_true",
                       help="engines, paper: start vLLM in eager mode (starts in seconds, serves slower)")
    bench.add_argument("--skip-vllm", action="store_true", help="engines, paper: embedded engine only")
    bench.add_argument("--out", default=None,
                       help="dashboard: the PNG to write (default results/dashboard.png); "
                            "paper: the results folder (default results/paper)")
    bench.add_argument("--prometheus-url", help="dashboard: draw from this Prometheus instead of a demo stack "
                                                "(gateway + Prometheus + mixed traffic started here)")
    bench.add_argument("--duration", type=float, default=45.0, help="dashboard: seconds of demo traffic")
    bench.add_argument("--quick", action="store_true",
                       help="paper: the same pipeline on the first 8 test rows, 8 requests at concurrency 8, "
                            "vLLM in eager mode (under 10 minutes when the adapters are cached)")
    bench.add_argument("--throughput-requests", type=int, default=None,
                       help="paper: requests per row at concurrency 8 (default 32; --quick 8)")
    bench.add_argument("--price-input-per-1k", type=float, default=None,
                       help="paper: USD per 1,000 input tokens (default PROMPTINTERN_PRICE_INPUT_PER_1K)")
    bench.add_argument("--price-output-per-1k", type=float, default=None,
                       help="paper: USD per 1,000 output tokens (default PROMPTINTERN_PRICE_OUTPUT_PER_1K)")
    bench.add_argument("--rebuild", action="store_true",
                       help="paper: re-render report.md, plots and readme_section.md from --out's paper.json")
    bench.set_defaults(func=cmd_bench)

    from trainer.cli import add_train_parser

    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    sys.exit(args.func(args))
