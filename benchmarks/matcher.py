"""The matcher against the number of registered templates: detection latency, registration, start-up.

Each registered template is a realistic chat prompt: a system message with its own wording,
two few-shot exchanges, and a user message ending in `{query}`. The request fills one of them
in up to `request_tokens` tokens, estimated as characters / 4 (no tokenizer is loaded); the
miss is the same request with one character of its system message changed. Timings include
the matcher's normalisation of every message, as in the gateway. "Fresh" hits copy the request's
strings before each detection, as the gateway gets new strings from every request body (Python
caches a string's hash, so detecting the very same strings again skips hashing them).

`run_startup` measures what a gateway does with a registry of that many prompts when it starts:
the prompts are bulk-inserted into a new SQLite registry (setup, not timed as start-up), which is
then opened, listed, its templates parsed, the matcher built with `Matcher.add_many`, the metrics'
per-prompt series made, and each template's static tokens counted (on a sample, extrapolated).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.latency import percentile
from core.config import Settings
from core.templates import PromptTemplate, escape, parse_template
from gateway.matcher import Matcher

if TYPE_CHECKING:
    from gateway.registry.store import PromptRegistry
    from gateway.tokens import TokenCounter

CHARS_PER_TOKEN = 4
_WORDS = (
    "customer", "order", "invoice", "refund", "shipping", "account", "password", "billing", "delivery",
    "product", "review", "summary", "ticket", "priority", "contract", "clause", "policy", "claim", "patient",
    "report", "symptom", "dosage", "lesson", "student", "grade", "essay", "recipe", "ingredient", "budget",
    "forecast", "quarter", "revenue", "incident", "server", "log", "error", "deploy", "release", "feature",
    "request", "bug", "user", "team", "meeting", "agenda", "decision", "risk", "owner", "date", "always",
    "never", "briefly", "clearly", "politely", "formally", "exactly", "only", "each", "every", "the", "a",
    "an", "of", "to", "in", "for", "with", "on", "by", "from", "as", "and", "or", "but", "if", "when", "then",
    "must", "should", "may", "not", "be", "is", "are", "was", "use", "keep",
)
_PERSONAS = ("a support agent", "a legal assistant", "a medical scribe", "a tutor", "a data analyst",
             "an SRE on call", "a product manager", "a translator", "a copy editor", "a sales assistant")
_TASKS = ("Classify the message below.", "Summarise the text below in three sentences.",
          "Extract every date and amount from the text below.", "Answer the question below.",
          "Rewrite the text below in plain English.", "List the action items in the text below.")
_SUFFIXES = ("", "\n\nAnswer:", "\n\nReply in JSON.", "\n---")


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."


def _text(rng: random.Random, chars: int) -> str:
    parts: list[str] = []
    size = 0
    while size < chars:
        parts.append(_sentence(rng, rng.randint(6, 16)))
        size += len(parts[-1]) + 1
    return " ".join(parts)


def template_name(i: int) -> str:
    return f"prompt-{i:05d}"


def template_source(i: int) -> list[dict[str, str]]:
    """The messages of template number `i`, as registered: distinct system wording, few-shot examples, then
    `{query}`."""
    rng = random.Random(i)
    system = (f"You are {rng.choice(_PERSONAS)} for team {i}. " + _text(rng, 900))
    shots: list[dict[str, str]] = []
    for _ in range(2):
        shots.append({"role": "user", "content": escape(_text(rng, 500))})
        shots.append({"role": "assistant", "content": escape(_text(rng, 200))})
    user = f"{rng.choice(_TASKS)} {_sentence(rng, 8)}\n\n{{query}}{rng.choice(_SUFFIXES)}"
    return [{"role": "system", "content": escape(system)}, *shots, {"role": "user", "content": user}]


def build_template(i: int) -> PromptTemplate:
    """Template number `i`, parsed."""
    return parse_template(messages=template_source(i))


def build_request(template: PromptTemplate, request_tokens: int) -> list[tuple[str, str]]:
    """A request filling `template` in, its query sized so the whole is ~`request_tokens` tokens."""
    query_chars = max(1, request_tokens * CHARS_PER_TOKEN - template.static_chars)
    values = {template.slots[0]: _text(random.Random(-1), query_chars)[:query_chars].rstrip()}
    rendered = template.render(values)
    assert isinstance(rendered, list)
    return [(m["role"], m["content"]) for m in rendered]


def _fresh(request: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Equal strings that are new objects (no cached hash), as a request body parsed anew gives them."""
    return [(role, (text + ".")[:-1]) for role, text in request]


def _time_us(matcher: Matcher, request: list[tuple[str, str]], repeats: int,
             fresh: bool = False) -> tuple[float, float, bool]:
    for _ in range(min(50, repeats)):
        hit = matcher.match_chat(request) is not None
    samples: list[int] = []
    for _ in range(repeats):
        sent = _fresh(request) if fresh else request
        start = time.perf_counter_ns()
        matcher.match_chat(sent)
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000, percentile(samples, 0.99) / 1000, hit


def run(counts: Sequence[int] = (10, 1000, 10000), request_tokens: int = 2000, repeats: int = 2000) -> list[dict]:
    """Time registration, hits and misses for each template count, print a table, and return its rows."""
    matcher = Matcher()
    rows: list[dict] = []
    for count in sorted(counts):
        started = time.perf_counter()
        new = [(template_name(i), build_template(i)) for i in range(len(matcher), count)]
        generated = time.perf_counter()
        for name, template in new:
            matcher.add(name, template)
        added = time.perf_counter()
        add_us = (added - generated) / max(1, len(new)) * 1e6
        target = build_template(count // 2)
        hit_request = build_request(target, request_tokens)
        system = hit_request[0][1]
        middle = len(system) // 2
        changed = "X" if system[middle] != "X" else "Y"
        miss_request = [(hit_request[0][0], system[:middle] + changed + system[middle + 1 :]), *hit_request[1:]]
        chars = sum(len(text) for _, text in hit_request)
        print(f"{count} templates registered in {added - started:.1f} s (generating and parsing them "
              f"{generated - started:.1f} s, Matcher.add {added - generated:.2f} s: {add_us:.1f} µs each); "
              f"timing {repeats} hits and {repeats} misses of {chars} chars (~{chars // CHARS_PER_TOKEN} tokens)",
              flush=True)
        hit_median, hit_p99, hit_ok = _time_us(matcher, hit_request, repeats)
        fresh_median, fresh_p99, fresh_ok = _time_us(matcher, hit_request, repeats, fresh=True)
        miss_median, miss_p99, miss_hit = _time_us(matcher, miss_request, repeats)
        if not hit_ok or not fresh_ok or miss_hit:
            raise RuntimeError("matcher benchmark: the hit request did not match or the miss did")
        rows.append({"templates": count, "request_chars": chars, "request_tokens_est": chars // CHARS_PER_TOKEN,
                     "add_us": round(add_us, 1),
                     "hit_median_us": round(hit_median, 1), "hit_p99_us": round(hit_p99, 1),
                     "fresh_hit_median_us": round(fresh_median, 1), "fresh_hit_p99_us": round(fresh_p99, 1),
                     "miss_median_us": round(miss_median, 1), "miss_p99_us": round(miss_p99, 1)})
    print(f"\n{'templates':>10} {'add µs':>7} {'hit median µs':>14} {'hit p99 µs':>11} {'fresh hit median µs':>20} "
          f"{'miss median µs':>15} {'miss p99 µs':>12}")
    for row in rows:
        print(f"{row['templates']:>10} {row['add_us']:>7.1f} {row['hit_median_us']:>14.1f} {row['hit_p99_us']:>11.1f} "
              f"{row['fresh_hit_median_us']:>20.1f} {row['miss_median_us']:>15.1f} {row['miss_p99_us']:>12.1f}")
    return rows


# -- start-up ----------------------------------------------------------------------------------


def bulk_register(registry: PromptRegistry, count: int, batch: int = 5000) -> None:
    """Insert prompts 0 .. count-1 in a few large transactions (what 100,000 REST calls would leave behind)."""
    from sqlalchemy import insert

    from gateway.registry.db import PromptRow, utcnow

    def rows(start: int) -> Iterator[dict[str, Any]]:
        now = utcnow()
        for i in range(start, min(count, start + batch)):
            yield {"name": template_name(i), "kind": "chat", "template": template_source(i), "examples": [],
                   "created_at": now}

    for start in range(0, count, batch):
        with registry.engine.begin() as connection:
            connection.execute(insert(PromptRow), list(rows(start)))


def _seconds(since: float) -> float:
    return time.perf_counter() - since


def startup_once(database_url: str, count: int, max_prompts: int,
                 counter: TokenCounter | None, token_sample: int) -> dict[str, Any]:
    """Time each step of a gateway's start-up on a registry that already holds `count` prompts."""
    from gateway.metrics import GatewayMetrics
    from gateway.prompts.records import template_from_record
    from gateway.registry.store import PromptRegistry

    row: dict[str, Any] = {"templates": count}
    started = time.perf_counter()
    registry = PromptRegistry(database_url)
    row["open_s"] = _seconds(started)
    try:
        started = time.perf_counter()
        records = registry.all()
        row["list_s"] = _seconds(started)
    finally:
        registry.close()
    started = time.perf_counter()
    templates = [(record.name, template_from_record(record)) for record in records]
    row["parse_s"] = _seconds(started)
    matcher = Matcher()
    started = time.perf_counter()
    matcher.add_many(templates)
    row["matcher_s"] = _seconds(started)
    started = time.perf_counter()
    metrics = GatewayMetrics(max_prompts=max_prompts)
    for name, _ in templates:
        metrics.track_prompt(name)
    row["metrics_s"] = _seconds(started)
    row["tokens_s"] = None
    if counter is not None and token_sample:
        sample = templates[:: max(1, len(templates) // token_sample)][:token_sample]
        started = time.perf_counter()
        for _, template in sample:
            counter.static_tokens(template)
        row["tokens_s"] = _seconds(started) / len(sample) * len(templates)
    if len(matcher) != count or len(records) != count:
        raise RuntimeError(f"start-up benchmark: {len(records)} listed and {len(matcher)} matched of {count}")
    probe = build_template(count // 2)
    found = matcher.match_chat(build_request(probe, 2000))
    if found is None or found.name != template_name(count // 2):
        raise RuntimeError("start-up benchmark: the matcher built from the registry does not find its prompt")
    return row


def run_startup(counts: Sequence[int] = (10, 1000, 10000), token_sample: int = 1000,
                settings: Settings | None = None) -> list[dict[str, Any]]:
    """For each count, a new SQLite registry with that many prompts, then a timed start-up from it."""
    from core.basemodel import base_model_dir
    from gateway.registry.store import PromptRegistry
    from gateway.tokens import TokenCounter

    settings = settings or Settings()
    counter = None
    if token_sample:
        print("loading the base model's tokenizer (static token counts: a sample, extrapolated)", flush=True)
        counter = TokenCounter.from_model_dir(base_model_dir(settings))
    rows: list[dict[str, Any]] = []
    for count in sorted(counts):
        with tempfile.TemporaryDirectory(prefix="promptintern-bench-startup-") as tmp:
            url = f"sqlite:///{Path(tmp) / 'registry.db'}"
            started = time.perf_counter()
            registry = PromptRegistry(url)
            try:
                bulk_register(registry, count)
            finally:
                registry.close()
            inserted = _seconds(started)
            print(f"{count} prompts bulk-inserted into a new SQLite registry in {inserted:.1f} s (setup); "
                  "starting from it", flush=True)
            row = startup_once(url, count, settings.metrics_max_prompts, counter, min(token_sample, count))
        row["insert_s"] = inserted
        steps = ("open_s", "list_s", "parse_s", "matcher_s", "metrics_s", "tokens_s")
        row["total_s"] = sum(row[step] or 0.0 for step in steps)
        rows.append(row)
    header = ("templates", "open s", "list s", "parse s", "matcher s", "metrics s", "tokens s*", "total s")
    print("\n" + " ".join(f"{h:>10}" for h in header))
    for row in rows:
        tokens = "-" if row["tokens_s"] is None else f"{row['tokens_s']:.1f}"
        print(f"{row['templates']:>10} {row['open_s']:>10.2f} {row['list_s']:>10.2f} {row['parse_s']:>10.2f} "
              f"{row['matcher_s']:>10.2f} {row['metrics_s']:>10.2f} {tokens:>10} {row['total_s']:>10.1f}")
    print(f"* static token counts of every template (the prompt service counts them at start-up), measured on "
          f"{token_sample or 'no'} templates and extrapolated; metrics: per-prompt series for the first "
          f"{settings.metrics_max_prompts} (METRICS_MAX_PROMPTS)")
    return rows


def main() -> None:
    run()


if __name__ == "__main__":
    main()
