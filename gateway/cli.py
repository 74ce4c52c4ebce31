"""The `promptintern` command: serve, worker, model, admin-key, prompts, train, bench."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.config import Settings

ADMIN_KEY_FILE = "admin_key"


def _settings(**overrides: Any) -> Settings:
    """The settings from the environment; an invalid one ends the command with a one-line message per field."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            name = "_".join(str(part) for part in error["loc"]).upper()
            print(f"promptintern: PROMPTINTERN_{name}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.local_server import UVICORN_HTTP, UVICORN_LOOP

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port:
        overrides["port"] = args.port
    if args.engine:
        overrides["engine"] = args.engine
    settings = _settings(**overrides)
    if not settings.admin_key:
        print("promptintern serve: set PROMPTINTERN_ADMIN_KEY (the registry API's bearer token); "
              "`make serve` generates one for you", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level,
                timeout_graceful_shutdown=10, http=UVICORN_HTTP, loop=UVICORN_LOOP)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run training jobs from the registry without serving, until SIGTERM or Ctrl-C (a job in progress is handed
    back, queued again for the next runner)."""
    import asyncio
    import logging

    settings = _settings()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_work(settings))
    return 0


async def _work(settings: Settings) -> None:
    import asyncio
    import logging
    import signal

    from core.adapter_store import AdapterStore
    from core.basemodel import base_model_dir
    from gateway.jobs import JobRunner
    from gateway.registry.store import PromptRegistry

    log = logging.getLogger("promptintern.worker")
    await asyncio.to_thread(settings.data_dir.mkdir, parents=True, exist_ok=True)
    model_dir = await asyncio.to_thread(base_model_dir, settings)
    registry = await asyncio.to_thread(PromptRegistry, settings.resolved_database_url)
    store = await asyncio.to_thread(AdapterStore, settings.adapter_dir)
    for path in await asyncio.to_thread(store.remove_staging_leftovers):
        log.warning("removed a half-written adapter folder: %s", path)

    async def no_one_to_tell() -> None:
        """Serving replicas learn of new versions from the registry's change log."""

    # No engine here: a trained version is checked and marked ready; serving replicas load it when they see it.
    runner = JobRunner(settings, registry, store, model_dir, activate=None, versions_changed=no_one_to_tell,
                       claim_jobs=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await runner.start()
    log.info("worker %s: running training jobs from the registry (adapters in %s)", runner.owner, store.root)
    try:
        await stop.wait()
        log.info("worker %s stopping", runner.owner)
    finally:
        await runner.close()
        await asyncio.to_thread(registry.close)


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
        return settings.admin_key.get_secret_value()
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


class PromptsCommandError(Exception):
    """A `promptintern prompts` failure worth one line on stderr and exit code 2, never a traceback."""


def _client(args: argparse.Namespace) -> Any:
    import httpx

    settings = _settings()
    url = args.url or f"http://{settings.host}:{settings.port}"
    key = settings.admin_key.get_secret_value() if settings.admin_key else None
    if not key and (settings.data_dir / ADMIN_KEY_FILE).is_file():
        key = (settings.data_dir / ADMIN_KEY_FILE).read_text().strip()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        return httpx.Client(base_url=url, headers=headers, timeout=600)
    except httpx.InvalidURL as exc:
        raise PromptsCommandError(f"invalid gateway URL {url!r}: {exc}") from None


def _show(response: Any) -> int:
    if response.status_code == 204:
        print("deleted")
        return 0
    try:
        print(json.dumps(response.json(), indent=2))
    except ValueError:
        print(response.text)
    return 0 if response.is_success else 1


def _adapter_files(folder: Path) -> dict[str, Path]:
    """The files of a local PEFT LoRA folder that an upload sends (checked here, so a mistake costs no upload)."""
    from gateway.prompts.imports import CONFIG_FILE, UPLOAD_FIELDS, WEIGHTS_FILE

    files = {name: folder / name for name in UPLOAD_FIELDS if (folder / name).is_file()}
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if name not in files]
    if missing:
        pickled = " (adapter_model.bin is not accepted: save the adapter with safetensors)" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise PromptsCommandError(f"{folder} is not a PEFT LoRA folder: no {' or '.join(missing)}{pickled}")
    return files


def _upload_adapter(client: Any, name: str, files: dict[str, Path]) -> Any:
    """Send the adapter's files themselves (multipart), so the gateway needs no access to this machine's disk."""
    with contextlib.ExitStack() as stack:
        parts = {field: (path.name, stack.enter_context(path.open("rb")), "application/octet-stream")
                 for field, path in files.items()}
        return client.post(f"/v1/prompts/{name}/adapters", files=parts)


def _registration(args: argparse.Namespace) -> dict[str, Any]:
    try:
        body = json.loads(Path(args.file).read_text())
    except (OSError, ValueError) as exc:
        raise PromptsCommandError(f"cannot read the template file {args.file}: {exc}") from None
    if not isinstance(body, dict):
        raise PromptsCommandError(f"{args.file} must hold a JSON object (`messages` or `prompt`, ...)")
    if args.adapter and ("train" in body or "adapter_path" in body):
        raise PromptsCommandError("--adapter uploads an adapter: the file may not also give `train` or `adapter_path`")
    return {**body, "name": args.name}


def _register(client: Any, args: argparse.Namespace) -> int:
    """Register, then upload the adapter if one is given; an upload that fails removes the registration again."""
    body = _registration(args)
    files = _adapter_files(Path(args.adapter)) if args.adapter else None
    created = client.post("/v1/prompts", json=body)
    if files is None or not created.is_success:
        return _show(created)
    uploaded = _upload_adapter(client, args.name, files)
    if not uploaded.is_success:
        client.delete(f"/v1/prompts/{args.name}")
        return _show(uploaded)
    return _show(client.get(f"/v1/prompts/{args.name}"))


def _run_prompts_action(client: Any, args: argparse.Namespace) -> int:
    if args.action == "list":
        return _show(client.get("/v1/prompts"))
    if args.action == "show":
        return _show(client.get(f"/v1/prompts/{args.name}"))
    if args.action == "delete":
        return _show(client.delete(f"/v1/prompts/{args.name}"))
    if args.action == "add-adapter":
        return _show(_upload_adapter(client, args.name, _adapter_files(Path(args.adapter))))
    if args.action == "record":
        record = None if args.off else {"rate": args.rate, **({"max_rows": args.max_rows} if args.max_rows else {})}
        return _show(client.patch(f"/v1/prompts/{args.name}", json={"record": record}))
    if args.action == "guard":
        guard = None if args.off else {"shadow_rate": args.shadow_rate, "min_agreement": args.min_agreement,
                                       "window": args.window, "metric": args.metric}
        return _show(client.patch(f"/v1/prompts/{args.name}", json={"guard": guard}))
    if args.action == "traffic":
        if args.purge:
            return _show(client.delete(f"/v1/prompts/{args.name}/traffic"))
        params = {"limit": args.limit} if args.limit is not None else {}
        return _show(client.get(f"/v1/prompts/{args.name}/traffic", params=params))
    if args.action == "train":
        return _show(client.post(f"/v1/prompts/{args.name}/train", json=_train_body(args)))
    if args.action == "candidates":
        if args.register is None:
            return _show(client.get("/v1/prompts/candidates"))
        if not args.name:
            raise PromptsCommandError("--register ID needs --name NAME (the new prompt's name)")
        if any("=" not in pair for pair in args.slot or ()):
            raise PromptsCommandError("--slot is OLD=NEW")
        adopt: dict[str, Any] = {"name": args.name}
        if args.slot:
            adopt["slots"] = dict(pair.split("=", 1) for pair in args.slot)
        if args.record is not None:
            adopt["record"] = {"rate": args.record}
        return _show(client.post(f"/v1/prompts/candidates/{args.register}/register", json=adopt))
    return _register(client, args)


def _train_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"source": args.source}
    if args.schedule:
        body["schedule"] = _json_object(args.schedule, "--schedule")
    if args.eval_fraction is not None:
        body["eval_fraction"] = args.eval_fraction
    return body


def _json_object(text: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise PromptsCommandError(f"{flag} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PromptsCommandError(f"{flag} must be a JSON object")
    return value


def cmd_prompts(args: argparse.Namespace) -> int:
    import httpx

    try:
        with _client(args) as client:
            url = str(client.base_url).rstrip("/")
            try:
                return _run_prompts_action(client, args)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise PromptsCommandError(
                    f"cannot reach the gateway at {url} ({exc or type(exc).__name__}). Is it running (`make serve`)? "
                    "Point the CLI elsewhere with `promptintern prompts --url URL ...` or PROMPTINTERN_HOST and "
                    "PROMPTINTERN_PORT") from None
            except httpx.TransportError as exc:
                raise PromptsCommandError(f"the request to the gateway at {url} failed: "
                                          f"{exc or type(exc).__name__}") from None
    except PromptsCommandError as exc:
        print(f"promptintern prompts: {exc}", file=sys.stderr)
        return 2


def _add_bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`promptintern bench ...` from the benchmarks package; where it is not installed, `bench` only says how to
    install it, so the runtime never depends on the benchmarks."""
    try:
        from benchmarks.cli import add_bench_parser
    except ImportError as exc:
        if not (exc.name or "").startswith("benchmarks"):
            raise
        # "+" as the only prefix: every word after `bench`, --help included, reaches the hint below.
        bench = sub.add_parser("bench", help="benchmarks (not installed: pip install -e .[bench])", prefix_chars="+",
                               add_help=False)
        bench.add_argument("words", nargs="*")
        bench.set_defaults(func=_bench_not_installed)
        return
    add_bench_parser(sub)


def _bench_not_installed(args: argparse.Namespace) -> int:
    print("promptintern bench: the benchmarks are not installed: pip install -e .[bench]", file=sys.stderr)
    return 2


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

    worker = sub.add_parser(
        "worker", help="run training jobs from the registry without serving (a dedicated training machine)",
        description="Claims queued training jobs from the registry (DATABASE_URL), one at a time, under a fenced "
                    "lease, trains them with the base model (BASE_MODEL) and publishes each version into the "
                    "adapter store (ADAPTER_DIR, shared with the gateways) as ready: serving replicas load it when "
                    "they see the change. A job whose runner dies is taken over once its lease "
                    "(JOB_LEASE_SECONDS) runs out. SIGTERM hands a job in progress back. Set "
                    "PROMPTINTERN_TRAIN_IN_GATEWAY=false on the gateways to leave training to workers.")
    worker.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    worker.set_defaults(func=cmd_worker)

    model = sub.add_parser("model", help="materialise the base model (once) and print its folder")
    model.set_defaults(func=cmd_model)

    vllm = sub.add_parser(
        "vllm", help="run vLLM's OpenAI server for this gateway (LoRA on, runtime loading on)",
        description="Run vLLM's OpenAI server for this gateway: LoRA on (--max-lora-rank PROMPTINTERN_MAX_LORA_RANK, "
                    "--lora-target-modules PROMPTINTERN_VLLM_LORA_TARGET_MODULES, q/k/v/o_proj by default), adapters "
                    "loaded at run time, automatic prefix caching on.")
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
                          help="JSON with `messages` (chat) or `prompt` (completion), optional `examples`, `train`, "
                               "`tenant`")
    register.add_argument("--adapter", help="a local PEFT LoRA folder (safetensors) to upload and serve for it")
    actions.add_parser("list", help="list prompts")
    for action, text in (("show", "show one prompt"), ("delete", "delete a prompt, its adapters and jobs")):
        p = actions.add_parser(action, help=text)
        p.add_argument("name")
    add = actions.add_parser("add-adapter", help="upload an adapter's files as the prompt's next version")
    add.add_argument("name")
    add.add_argument("adapter", help="a local PEFT LoRA folder: adapter_config.json, adapter_model.safetensors "
                                     "and optionally manifest.json are uploaded")
    record = actions.add_parser("record", help="record a share of the prompt's fallback answers as training rows")
    record.add_argument("name")
    how = record.add_mutually_exclusive_group(required=True)
    how.add_argument("--rate", type=float, help="share of fallback answers recorded, 0..1")
    how.add_argument("--off", action="store_true", help="stop recording (the rows kept stay)")
    record.add_argument("--max-rows", type=int, help="rows kept, the oldest dropped beyond (default 10,000)")
    guard = actions.add_parser("guard", help="shadow-check a share of the prompt's adapter answers against the "
                                             "teacher; roll back by itself when they stop agreeing")
    guard.add_argument("name")
    how = guard.add_mutually_exclusive_group(required=True)
    how.add_argument("--shadow-rate", type=float, help="share of adapter answers shadowed, 0..1")
    how.add_argument("--off", action="store_true", help="turn the guard off")
    guard.add_argument("--min-agreement", type=float, default=0.8,
                       help="roll back when the window's mean agreement is below this, 0..1 (default 0.8)")
    guard.add_argument("--window", type=int, default=50, help="shadowed answers judged together (default 50)")
    guard.add_argument("--metric", choices=("exact", "chrf", "bleu"), default="exact",
                       help="agreement of two answers (default: exact match after collapsing whitespace)")
    traffic = actions.add_parser("traffic", help="show the prompt's recorded answers, newest first (or purge them)")
    traffic.add_argument("name")
    traffic.add_argument("--limit", type=int, help="show at most this many")
    traffic.add_argument("--purge", action="store_true", help="delete them")
    train = actions.add_parser("train", help="queue a training job on the running gateway")
    train.add_argument("name")
    train.add_argument("--source", required=True, choices=["traffic"],
                       help="`traffic`: the prompt's recorded answers (self-distillation, no labels)")
    train.add_argument("--schedule", help='schedule overrides as JSON, e.g. \'{"preset": "demo"}\'')
    train.add_argument("--eval-fraction", type=float, help="share of rows held out for evaluation (default 0.2)")
    found = actions.add_parser("candidates", help="recurring prompts found in passthrough traffic, highest projected "
                                                  "saving first (or register one)")
    found.add_argument("--register", metavar="ID", help="register this candidate as a prompt (needs --name)")
    found.add_argument("--name", help="the new prompt's name")
    found.add_argument("--slot", action="append", metavar="OLD=NEW", help="rename a slot (repeatable)")
    found.add_argument("--record", type=float, metavar="RATE", help="record this share of its fallback answers")
    prompts.set_defaults(func=cmd_prompts)

    _add_bench_parser(sub)

    from trainer.cli import add_train_parser

    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":  # `python -m gateway.cli`, the same as the `promptintern` script
    main()
