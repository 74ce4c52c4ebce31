"""Detection latency of `Matcher.match_chat` as the number of registered templates grows.

Each registered template is a realistic chat prompt: a system message with its own wording,
two few-shot exchanges, and a user message ending in `{query}`. The request fills one of them
in up to `request_tokens` tokens, estimated as characters / 4 (no tokenizer is loaded); the
miss is the same request with one character of its system message changed. Timings include
the matcher's normalisation of every message, as in the gateway.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence

from benchmarks.latency import percentile
from core.templates import PromptTemplate, escape, parse_template
from gateway.matcher import Matcher

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


def build_template(i: int) -> PromptTemplate:
    """Template number `i`: distinct system wording, few-shot examples, then `{query}`."""
    rng = random.Random(i)
    system = (f"You are {rng.choice(_PERSONAS)} for team {i}. " + _text(rng, 900))
    shots: list[dict[str, str]] = []
    for _ in range(2):
        shots.append({"role": "user", "content": escape(_text(rng, 500))})
        shots.append({"role": "assistant", "content": escape(_text(rng, 200))})
    user = f"{rng.choice(_TASKS)} {_sentence(rng, 8)}\n\n{{query}}{rng.choice(_SUFFIXES)}"
    return parse_template(messages=[{"role": "system", "content": escape(system)}, *shots,
                                    {"role": "user", "content": user}])


def build_request(template: PromptTemplate, request_tokens: int) -> list[tuple[str, str]]:
    """A request filling `template` in, its query sized so the whole is ~`request_tokens` tokens."""
    query_chars = max(1, request_tokens * CHARS_PER_TOKEN - template.static_chars)
    values = {template.slots[0]: _text(random.Random(-1), query_chars)[:query_chars].rstrip()}
    rendered = template.render(values)
    assert isinstance(rendered, list)
    return [(m["role"], m["content"]) for m in rendered]


def _time_us(matcher: Matcher, request: list[tuple[str, str]], repeats: int) -> tuple[float, float, bool]:
    for _ in range(min(50, repeats)):
        hit = matcher.match_chat(request) is not None
    samples: list[int] = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        matcher.match_chat(request)
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000, percentile(samples, 0.99) / 1000, hit


def run(counts: Sequence[int] = (10, 1000, 10000), request_tokens: int = 2000, repeats: int = 2000) -> list[dict]:
    """Time hits and misses for each template count, print a table, and return its rows."""
    matcher = Matcher()
    rows: list[dict] = []
    for count in sorted(counts):
        started = time.perf_counter()
        for i in range(len(matcher), count):
            matcher.add(f"prompt-{i:05d}", build_template(i))
        target = build_template(count // 2)
        hit_request = build_request(target, request_tokens)
        system = hit_request[0][1]
        middle = len(system) // 2
        changed = "X" if system[middle] != "X" else "Y"
        miss_request = [(hit_request[0][0], system[:middle] + changed + system[middle + 1 :]), *hit_request[1:]]
        chars = sum(len(text) for _, text in hit_request)
        print(f"{count} templates registered in {time.perf_counter() - started:.1f} s; "
              f"timing {repeats} hits and {repeats} misses of {chars} chars (~{chars // CHARS_PER_TOKEN} tokens)",
              flush=True)
        hit_median, hit_p99, hit_ok = _time_us(matcher, hit_request, repeats)
        miss_median, miss_p99, miss_hit = _time_us(matcher, miss_request, repeats)
        if not hit_ok or miss_hit:
            raise RuntimeError("matcher benchmark: the hit request did not match or the miss did")
        rows.append({"templates": count, "request_chars": chars, "request_tokens_est": chars // CHARS_PER_TOKEN,
                     "hit_median_us": round(hit_median, 1), "hit_p99_us": round(hit_p99, 1),
                     "miss_median_us": round(miss_median, 1), "miss_p99_us": round(miss_p99, 1)})
    print(f"\n{'templates':>10} {'hit median µs':>14} {'hit p99 µs':>11} {'miss median µs':>15} {'miss p99 µs':>12}")
    for row in rows:
        print(f"{row['templates']:>10} {row['hit_median_us']:>14.1f} {row['hit_p99_us']:>11.1f} "
              f"{row['miss_median_us']:>15.1f} {row['miss_p99_us']:>12.1f}")
    return rows


def main() -> None:
    run()


if __name__ == "__main__":
    main()
