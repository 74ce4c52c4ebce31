"""`promptintern bench traffic`: learning a recurring prompt from live traffic, measured on NL2Bash.

A second gateway process stands in for the hosted provider (the upstream): by default it answers the full NL2Bash
prompt with the base model (`--teacher base`), or with an adapter you give it (`--teacher-adapter DIR`, e.g. a
full-prompt fine-tuned one, for a stronger provider). The gateway under test sits in front of it with
`UPSTREAM_URL` and records what it answers:

1. *before*: the training queries go through the gateway with the full prompt; the prompt has no adapter, so
   every request is relayed upstream (calls and billed input tokens counted from the upstream's `usage`), and the
   answers are recorded (`record: {rate: 1}`);
2. the gateway trains from what it recorded (`{"source": "traffic"}`: no labels sent; the promotion gate checks
   the version on held-out recorded rows);
3. side by side, the same schedule is trained on the same queries with their gold commands (labels), as a second
   prompt of the same gateway;
4. *after*: the held-out test queries go through the gateway with the full prompt and are answered locally by the
   traffic-trained adapter (upstream calls counted: they should be none); the teacher's own greedy answers to
   them are fetched from the upstream directly, the gold-trained adapter's from its adapter id;
5. the shadow guard's cost on the adapter route: the test queries again, interleaved with the guard off and on
   (every answer shadowed, a threshold it cannot fail), the adapter route's latency compared.

Prints progress and a table; writes `traffic.json`, `report.md` and `readme_section.md` into `--out`.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import secrets
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.errors import BenchInputError
from benchmarks.load import GatewayProcess
from core.agreement import agreement
from core.basemodel import base_model_dir
from core.config import Settings
from gateway.local_server import LocalGateway, free_port

UPSTREAM_MODEL = "gpt-4o-mini"
DEFAULT_MAX_TOKENS = 64
SHADOW_BLOCK = 5  # test queries per block of the shadow latency measurement
STOP = ["\n"]  # one command line, as an app asking for one would send (and as `bench paper` decodes)


@dataclass(frozen=True)
class TrafficOptions:
    train_rows: int = 120
    test_rows: int = 40
    schedule: str = "demo"
    teacher_adapter: Path | None = None
    out: Path = Path("docs/traffic")
    shadow: bool = True
    kl: bool = True  # with the base model as the teacher, also train with the kl objective
    max_tokens: int = DEFAULT_MAX_TOKENS  # answer tokens asked for (greedy)
    steps_per_stage: list[int] | None = None  # overrides the preset's (a quick look)


class Clock:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        seconds = int(time.monotonic() - self.started)
        print(f"[bench traffic {seconds // 60:3d}:{seconds % 60:02d}] {text}", flush=True)


def _chat(url: str, messages: list[dict[str, str]], max_tokens: int, model: str = UPSTREAM_MODEL,
          **fields: Any) -> httpx.Response:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stop": STOP, **fields}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    if response.status_code != 200:
        raise BenchInputError(f"{url} answered {response.status_code}: {response.text[:500]}")
    return response


def _text(response: httpx.Response) -> str:
    return str(response.json()["choices"][0]["message"]["content"] or "").strip()


def _full(example: Any, query: str) -> list[dict[str, str]]:
    system = example.messages[0]["content"].replace("{{", "{").replace("}}", "}")
    return [{"role": "system", "content": system}, {"role": "user", "content": f"Input: {query}\nOutput:"}]


def _upstream_calls(front: LocalGateway) -> float:
    text = httpx.get(f"{front.url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("promptintern_upstream_requests_total{"))


def _wait_for_job(admin: httpx.Client, name: str, clock: Clock, label: str) -> dict[str, Any]:
    last = 0.0
    while True:
        body: dict[str, Any] = admin.get(f"/v1/prompts/{name}").json()
        job = body.get("job") or {}
        if job.get("status") in ("succeeded", "failed", "rejected"):
            clock.say(f"{label}: job {job['status']} ({job.get('error') or 'ok'})")
            return body
        if time.monotonic() - last > 20:
            last = time.monotonic()
            p = job.get("progress") or {}
            clock.say(f"{label}: {job.get('status')} {p.get('phase', '')} {p.get('stage_name', '')} step "
                      f"{p.get('global_step', 0)}/{p.get('global_steps', 0)} loss {p.get('loss')} "
                      f"ETA {p.get('eta_s')} s")
        time.sleep(2)


def _score(predictions: list[str], rows: list[dict[str, Any]], teacher: list[str] | None) -> dict[str, Any]:
    from trainer.evaluate import score

    refs = [[r["response"], *r.get("references", [])] for r in rows]
    figures = score(predictions, refs)
    out: dict[str, Any] = {"exact_match": round(figures["exact_match"], 1), "bleu": round(figures["bleu"], 1)}
    if teacher is not None:
        out["agreement_exact"] = round(100 * statistics.fmean(agreement(p, t) for p, t in zip(predictions, teacher,
                                                                                              strict=True)), 1)
        out["agreement_chrf"] = round(100 * statistics.fmean(agreement(p, t, "chrf")
                                                             for p, t in zip(predictions, teacher, strict=True)), 1)
    return out


def run(settings: Settings, options: TrafficOptions) -> dict[str, Any]:
    from trainer.nl2bash import build

    clock = Clock()
    example = build()
    train, test = example.train[: options.train_rows], example.test[: options.test_rows]
    if len(train) < settings.min_traffic_rows:
        raise BenchInputError(f"--train-rows must be at least MIN_TRAFFIC_ROWS ({settings.min_traffic_rows})")
    root = options.out / "work"  # this run's registries, adapters and logs: started afresh
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    clock.say(f"NL2Bash: {len(train)} training queries, {len(test)} test queries; schedule {options.schedule}; "
              f"teacher: {'adapter ' + str(options.teacher_adapter) if options.teacher_adapter else 'base model'}")
    upstream = GatewayProcess(settings, root / "upstream", "embedded", None, None)
    upstream.env["PROMPTINTERN_MODEL_ALIASES"] = UPSTREAM_MODEL
    upstream.env["PROMPTINTERN_API_KEYS"] = "upstream-key"
    (root / "upstream").mkdir(parents=True, exist_ok=True)
    clock.say("starting the upstream (a second gateway process)")
    with upstream:
        up_admin = httpx.Client(base_url=upstream.url, timeout=600, headers={
            "Authorization": f"Bearer {upstream.env['PROMPTINTERN_ADMIN_KEY']}"})
        teacher_name = "base model with the full prompt"
        if options.teacher_adapter is not None:
            _register_with_adapter(up_admin, example, options.teacher_adapter)
            teacher_name = f"adapter {options.teacher_adapter.name} behind the upstream"
        front_settings = settings.model_copy(update={
            "port": free_port(), "data_dir": root / "front", "adapter_dir": root / "front" / "adapters",
            "database_url": None, "upstream_url": f"{upstream.url}/v1", "upstream_models": [UPSTREAM_MODEL],
            "base_model": base_model_dir(settings), "api_keys": [], "discovery": False,
            "upstream_read_timeout": 900.0})  # a shared 2-core machine: the upstream may queue a while
        front_settings = front_settings.model_copy(update={"upstream_api_key": _secret("upstream-key"),
                                                           "admin_key": _secret(secrets.token_urlsafe(24))})
        clock.say("starting the gateway under test in front of it")
        with LocalGateway(front_settings) as front, front.admin() as admin:
            result = _measure(front, admin, upstream.url, example, train, test, options, clock, teacher_name)
    result["settings"] = {"schedule": options.schedule, "steps_per_stage": options.steps_per_stage,
                          "train_rows": len(train), "test_rows": len(test),
                          "max_tokens": options.max_tokens,
                          "decoding": "greedy (temperature 0), stop at the first newline", "teacher": teacher_name,
                          "base_model": settings.served_model_name}
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    result["date"] = dt.date.today().isoformat()
    result["command"] = (f"promptintern bench traffic --train-rows {options.train_rows} --test-rows "
                         f"{options.test_rows} --schedule {options.schedule}"
                         + (f" --max-tokens {options.max_tokens}" if options.max_tokens != DEFAULT_MAX_TOKENS else "")
                         + (f" --teacher-adapter {options.teacher_adapter}" if options.teacher_adapter else "")
                         + (" --steps-per-stage " + " ".join(map(str, options.steps_per_stage))
                            if options.steps_per_stage else ""))
    _write(options.out, result)
    return result


def _secret(value: str) -> Any:
    from pydantic import SecretStr

    return SecretStr(value)


def _register_with_adapter(admin: httpx.Client, example: Any, folder: Path) -> None:
    files = {name: (name, (folder / name).read_bytes(), "application/octet-stream")
             for name in ("adapter_config.json", "adapter_model.safetensors")}
    manifest = folder / "manifest.json"
    if manifest.exists():
        files["manifest.json"] = ("manifest.json", manifest.read_bytes(), "application/json")
    created = admin.post("/v1/prompts", json=example.registration())
    if created.status_code != 201:
        raise BenchInputError(f"registering the teacher's prompt upstream failed: {created.text[:300]}")
    uploaded = admin.post(f"/v1/prompts/{example.name}/adapters", files=files)
    if uploaded.status_code != 201:
        raise BenchInputError(f"uploading the teacher adapter failed: {uploaded.text[:300]}")


def _measure(front: LocalGateway, admin: httpx.Client, upstream_url: str, example: Any, train: list[dict[str, Any]],
             test: list[dict[str, Any]], options: TrafficOptions, clock: Clock, teacher_name: str) -> dict[str, Any]:
    registration = example.registration()
    created = admin.post("/v1/prompts", json={**registration, "record": {"rate": 1.0}})
    if created.status_code != 201:
        raise BenchInputError(f"registering {example.name} failed: {created.text[:300]}")

    # 1. Before: every request relayed upstream, and recorded.
    billed: list[int] = []
    calls_before = _upstream_calls(front)
    started = time.monotonic()
    for i, row in enumerate(train, 1):
        response = _chat(front.url, _full(example, row["query"]), options.max_tokens)
        if response.headers.get("x-promptintern-route") != "fallback":
            raise BenchInputError(f"expected the fallback route, got {response.headers.get('x-promptintern-route')}")
        billed.append(int(response.json()["usage"]["prompt_tokens"]))
        if i % 10 == 0 or i == len(train):
            per = (time.monotonic() - started) / i
            clock.say(f"before: {i}/{len(train)} requests through the upstream, {per:.2f} s each, "
                      f"ETA {per * (len(train) - i):.0f} s")
    calls = _upstream_calls(front) - calls_before
    deadline = time.monotonic() + 60
    while (total := admin.get(f"/v1/prompts/{example.name}/traffic", params={"limit": 1}).json()["total"]) < len(train):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    clock.say(f"recorded {total} of {len(train)} answers (only whole answers are kept: finish `stop`)")

    # 2. Train from the recorded traffic (no labels), and 3. the same on the gold labels.
    schedule: dict[str, Any] = {"preset": options.schedule}
    if options.steps_per_stage:
        schedule["steps_per_stage"] = list(options.steps_per_stage)
    job = admin.post(f"/v1/prompts/{example.name}/train", json={"source": "traffic", "schedule": schedule,
                                                                 "eval_fraction": 0.1})
    if job.status_code != 202:
        raise BenchInputError(f"training from traffic was refused: {job.text[:300]}")
    traffic_body = _wait_for_job(admin, example.name, clock, "training from traffic")
    gold_name = f"{example.name}-gold"
    gold_messages = [dict(m) for m in registration["messages"]]
    gold_messages[0]["content"] = "(gold-label twin) " + gold_messages[0]["content"]
    admin.post("/v1/prompts", json={"name": gold_name, "messages": gold_messages,
                                    "examples": registration["examples"]}).raise_for_status()
    gold_rows = [{"query": r["query"], "response": r["response"]} for r in train]
    job = admin.post(f"/v1/prompts/{gold_name}/train", json={"data": gold_rows, "schedule": schedule,
                                                             "eval_fraction": 0.1})
    if job.status_code != 202:
        raise BenchInputError(f"training on the gold labels was refused: {job.text[:300]}")
    gold_body = _wait_for_job(admin, gold_name, clock, "training on the gold labels")
    kl_name = f"{example.name}-kl"
    kl_body: dict[str, Any] = {}
    if options.teacher_adapter is None and options.kl:
        # The teacher is the base model: the same recorded rows, distilled on its token distributions (the kl
        # objective) instead of its sampled answers. A twin prompt whose system message differs only by a final
        # newline (two prompts may not share a template), so the full prompt the base model reads is the same.
        recorded = admin.get(f"/v1/prompts/{example.name}/traffic", params={"limit": 100_000}).json()["data"]
        kl_messages = [dict(m) for m in registration["messages"]]
        kl_messages[0]["content"] += "\n"
        admin.post("/v1/prompts", json={"name": kl_name, "messages": kl_messages,
                                        "examples": registration["examples"]}).raise_for_status()
        kl_rows = [{"query": r["query"], "response": r["response"]} for r in reversed(recorded)]
        job = admin.post(f"/v1/prompts/{kl_name}/train", json={"data": kl_rows, "eval_fraction": 0.1,
                                                               "schedule": {**schedule, "objective": "kl"}})
        if job.status_code != 202:
            raise BenchInputError(f"training with the kl objective was refused: {job.text[:300]}")
        kl_body = _wait_for_job(admin, kl_name, clock, "training from traffic with the kl objective")

    # 4. After: the test queries, answered locally; the teacher's and the gold adapter's answers beside them.
    served: list[str] = []
    routes: list[str] = []
    local_tokens: list[int] = []
    calls_before = _upstream_calls(front)
    for row in test:
        response = _chat(front.url, _full(example, row["query"]), options.max_tokens)
        routes.append(response.headers.get("x-promptintern-route", ""))
        served.append(_text(response))
        local_tokens.append(int(response.json()["usage"]["prompt_tokens"]))
    calls_after = _upstream_calls(front) - calls_before
    clock.say(f"after: {len(test)} test requests, routes {sorted(set(routes))}, {calls_after:.0f} upstream calls")
    teacher = [_text(_upstream_direct(upstream_url, example, row["query"], options.max_tokens)) for row in test]
    gold_version = gold_body.get("active_version")
    gold_answers = [_text(_chat(front.url, [{"role": "user", "content": row["query"]}], options.max_tokens,
                                model=f"{gold_name}@v{gold_version}")) for row in test] if gold_version else []
    kl_version = kl_body.get("active_version")
    kl_answers = [_text(_chat(front.url, [{"role": "user", "content": row["query"]}], options.max_tokens,
                              model=f"{kl_name}@v{kl_version}")) for row in test] if kl_version else []
    clock.say("scored the teacher, the traffic-trained and the gold-trained adapters on the test queries")

    all_local = bool(routes) and all(r == "adapter" for r in routes)
    shadow = _shadow_latency(front, admin, example, test, clock, options.max_tokens) if options.shadow and all_local \
        else None
    traffic_version = traffic_body["versions"][-1] if traffic_body.get("versions") else {}
    conditions = {
        "teacher (upstream, full prompt)": _score(teacher, test, None),
        "adapter trained from recorded traffic (no labels)": _score(served, test, teacher),
    }
    if kl_answers:
        conditions["adapter trained from recorded traffic, kl objective (no labels)"] = _score(kl_answers, test,
                                                                                              teacher)
    if gold_answers:
        conditions["adapter trained on the gold labels"] = _score(gold_answers, test, teacher)
    return {
        "conditions": conditions,
        "routes_after": {r: routes.count(r) for r in set(routes)},
        "traffic_job": {"status": (traffic_body.get("job") or {}).get("status"),
                        "rows": (traffic_body.get("job") or {}).get("rows"),
                        "version_status": traffic_version.get("status"),
                        "gate": (traffic_version.get("manifest") or {}).get("gate"),
                        "training_seconds": (traffic_version.get("manifest") or {}).get("training_seconds")},
        "upstream": {
            "before": {"requests": len(train), "upstream_calls": calls,
                       "calls_per_1k": round(1000 * calls / max(1, len(train)), 1),
                       "billed_input_tokens_per_1k": round(1000 * statistics.fmean(billed)) if billed else None},
            "after": {"requests": len(test), "upstream_calls": calls_after,
                      "calls_per_1k": round(1000 * calls_after / max(1, len(test)), 1),
                      "billed_input_tokens_per_1k": 0 if calls_after == 0 else None,
                      "local_input_tokens_per_1k": round(1000 * statistics.fmean(local_tokens)) if local_tokens
                      else None},
        },
        "shadow_latency": shadow,
        "samples": [{"query": row["query"], "gold": row["response"], "teacher": t, "traffic_adapter": s}
                    for row, t, s in list(zip(test, teacher, served, strict=True))[:5]],
    }


def _upstream_direct(upstream_url: str, example: Any, query: str, max_tokens: int) -> httpx.Response:
    body = {"model": UPSTREAM_MODEL, "messages": _full(example, query), "temperature": 0, "max_tokens": max_tokens,
            "stop": STOP}
    response = httpx.post(f"{upstream_url}/v1/chat/completions", json=body, timeout=600,
                          headers={"Authorization": "Bearer upstream-key"})
    if response.status_code != 200:
        raise BenchInputError(f"the upstream answered {response.status_code}: {response.text[:300]}")
    return response


def _shadow_latency(front: LocalGateway, admin: httpx.Client, example: Any, test: list[dict[str, Any]],
                    clock: Clock, max_tokens: int) -> dict[str, Any]:
    """The adapter route's latency with the guard off and on (every answer shadowed): the test queries in blocks
    of SHADOW_BLOCK, each block sent once with the guard off and once on (alternating which first), so requests
    of an `on` block overlap the shadow checks of the ones before; the checks are let finish before an `off`
    block (and before the guard is turned off, which would skip those still queued)."""
    off: list[float] = []
    on: list[float] = []
    guard = {"shadow_rate": 1.0, "min_agreement": 0.0, "window": 1000}
    shadow = front.app.state.shadow
    blocks = [test[i:i + SHADOW_BLOCK] for i in range(0, len(test), SHADOW_BLOCK)]
    for b, block in enumerate(blocks):
        for shadowed in ((False, True) if b % 2 == 0 else (True, False)):
            admin.patch(f"/v1/prompts/{example.name}", json={"guard": guard if shadowed else None}).raise_for_status()
            for row in block:
                started = time.perf_counter()
                _chat(front.url, _full(example, row["query"]), max_tokens)
                (on if shadowed else off).append(time.perf_counter() - started)
            while shadow.pending:
                time.sleep(0.2)
    admin.patch(f"/v1/prompts/{example.name}", json={"guard": None}).raise_for_status()
    checks = [v for v in shadow.verdicts if v.prompt == example.name]
    clock.say(f"shadow guard: adapter route median {statistics.median(off):.3f} s off, {statistics.median(on):.3f} s "
              f"on ({len(checks)} shadow checks)")
    return {"requests_each": len(test), "median_off_s": round(statistics.median(off), 3),
            "median_on_s": round(statistics.median(on), 3),
            "ratio_on_off": round(statistics.median(on) / statistics.median(off), 3), "shadow_checks": len(checks),
            "note": f"each query sent once with the guard off and once on, in blocks of {SHADOW_BLOCK} alternating "
                    "which goes first; shadow calls run after each answer, on the same cores as the next request"}


def _table(result: dict[str, Any]) -> str:
    lines = ["| condition (test queries) | exact match vs gold % | BLEU vs gold | agreement with teacher, exact % "
             "| agreement, chrF % |", "|---|---:|---:|---:|---:|"]
    for name, c in result["conditions"].items():
        lines.append(f"| {name} | {c['exact_match']} | {c['bleu']} | {c.get('agreement_exact', '-')} | "
                     f"{c.get('agreement_chrf', '-')} |")
    up = result["upstream"]
    lines += ["", "| per 1,000 requests | upstream calls | billed upstream input tokens | "
                  "input tokens processed locally |", "|---|---:|---:|---:|",
              f"| before (fallback to the upstream) | {up['before']['calls_per_1k']:.0f} | "
              f"{up['before']['billed_input_tokens_per_1k']} | 0 |",
              f"| after (traffic-trained adapter) | {up['after']['calls_per_1k']:.0f} | "
              f"{up['after']['billed_input_tokens_per_1k']} | {up['after']['local_input_tokens_per_1k']} |"]
    return "\n".join(lines)


def _write(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "traffic.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    s = result["settings"]
    gate = result["traffic_job"].get("gate") or {}
    shadow = result.get("shadow_latency")
    section = [f"### Learning from traffic (`bench traffic`, {result['date']})", "",
               f"Teacher: {s['teacher']} behind a second gateway process (the upstream); {s['train_rows']} NL2Bash "
               f"training queries sent through the gateway with the full prompt and recorded, then trained with the "
               f"`{s['schedule']}` schedule from what was recorded (no labels), beside the same schedule on the gold "
               f"commands; {s['test_rows']} held-out test queries, {s['decoding']}, at most {s['max_tokens']} "
               f"tokens. Command: `{result['command']}`.", "", _table(result), "",
               f"Promotion gate of the traffic-trained version: {gate.get('reason', 'n/a')} "
               f"(version {result['traffic_job'].get('version_status')})."]
    if shadow:
        section += ["", f"Shadow guard cost on the adapter route (every answer shadowed, {shadow['requests_each']} "
                        f"queries each way, interleaved): median {shadow['median_off_s']} s off, "
                        f"{shadow['median_on_s']} s on (x{shadow['ratio_on_off']}); {shadow['note']}."]
    text = "\n".join(section) + "\n"
    (out / "readme_section.md").write_text(text)
    (out / "report.md").write_text(text + "\n## Samples\n\n" + "\n".join(
        f"- `{x['query']}`: gold `{x['gold']}`, teacher `{x['teacher']}`, traffic adapter `{x['traffic_adapter']}`"
        for x in result["samples"]) + "\n")
    print(text)
