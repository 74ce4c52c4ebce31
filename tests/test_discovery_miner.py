"""The discovery miner's properties on generated traffic: every recurring template (chat or completion, one to four
slots, multi-line values of every length) mixed with one-off noise is proposed; each candidate matches at least 95%
of fresh requests of its template under the gateway's matching rules; no noise request is captured."""

from __future__ import annotations

import random
from typing import Literal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.discovery_traffic import SyntheticTemplate, make_template, noise
from core.templates import PromptTemplate, normalize, parse_template
from gateway.discovery.miner import PromptMiner, Summary, align, observation, slot_names, source

MIN_REQUESTS = 20
FRESH = 60

Request = list[tuple[str, str]] | str


def observe(miner: PromptMiner, kind: str, request: Request) -> None:
    if isinstance(request, str):
        miner.observe(observation(None, "completion", prompt=request))
    else:
        miner.observe(observation(None, kind, messages=request))


def texts(request: Request) -> list[str]:
    return [normalize(request)] if isinstance(request, str) else [normalize(t) for _, t in request]


def compiled(summary: Summary) -> PromptTemplate:
    """The candidate exactly as the registry would parse it."""
    if summary.kind == "completion":
        assert isinstance(summary.template, str)
        return parse_template(prompt=summary.template)
    assert isinstance(summary.template, list)
    return parse_template(messages=summary.template)


def proposed(miner: PromptMiner) -> list[Summary]:
    """The candidates, by the service's rules in characters: enough requests, at least half static."""
    return [s for s in miner.summaries(MIN_REQUESTS) if s.static_chars >= 0.5 * s.chars_total / s.requests]


def same_shape(template: SyntheticTemplate, summary: Summary) -> bool:
    mined = summary.template
    roles = ("prompt",) if isinstance(mined, str) else tuple(m["role"] for m in mined)
    return template.kind == summary.kind and template.roles == roles


shapes = st.lists(st.tuples(st.sampled_from(["chat", "completion"]), st.integers(1, 4)), min_size=1, max_size=4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shapes, seed=st.integers(0, 2**32 - 1), noise_count=st.integers(0, 80),
       repeats=st.integers(MIN_REQUESTS + 2, 40))
def test_generated_templates_are_proposed_match_fresh_requests_and_capture_no_noise(
        shapes: list[tuple[Literal["chat", "completion"], int]], seed: int, noise_count: int, repeats: int) -> None:
    rng = random.Random(seed)
    templates = [make_template(rng, kind, slots) for kind, slots in shapes]
    traffic: list[tuple[int, str, Request]] = [(i, t.kind, t.request(rng)) for i, t in enumerate(templates)
                                               for _ in range(repeats)]
    noises = [noise(rng) for _ in range(noise_count)]
    traffic += [(-1, kind, request) for kind, request in noises]
    rng.shuffle(traffic)
    miner = PromptMiner()
    for _, kind, request in traffic:
        observe(miner, kind, request)

    covered: set[int] = set()
    for summary in proposed(miner):
        template = compiled(summary)
        # Under the gateway's matching rules: the requests it was mined from ...
        mined_from = [i for i, kind, request in traffic
                      if kind == summary.kind and template.match(texts(request)) is not None]
        assert len(mined_from) >= summary.requests
        assert -1 not in mined_from, "a noise request is captured"
        (source_template,) = set(mined_from)
        # ... and fresh ones of its template.
        generator = templates[source_template]
        assert same_shape(generator, summary)
        fresh = [generator.request(rng) for _ in range(FRESH)]
        matched = sum(template.match(texts(r)) is not None for r in fresh)
        assert matched >= 0.95 * FRESH, f"{matched}/{FRESH} fresh requests match {summary.template!r}"
        covered.add(source_template)
    assert covered == set(range(len(templates))), "a recurring template was not proposed"


def test_alignment_keeps_the_common_text_and_makes_a_slot_of_each_difference() -> None:
    merged = align(["Input: list files\nOutput:"], "Input: show the disk usage\nOutput:")
    assert merged == ["Input: ", None, "\nOutput:"]
    # A space both values happen to share is no template text: one slot, not two.
    assert align(["Say: red fox\nDone"], "Say: blue cat\nDone") == ["Say: ", None, "\nDone"]
    # A value left empty by the alignment takes a neighbouring token (slot values are never empty).
    assert align(["Total: ", None, " items"], "Total: items") is not None


def test_slot_names_come_from_labels_else_query_or_numbers() -> None:
    assert slot_names([["Question: ", None, "\nContext:\n", None]]) == ["question", "context"]
    assert slot_names([["Fix this ", None]]) == ["query"]
    assert slot_names([["Fix ", None, " and ", None]]) == ["slot1", "slot2"]
    assert source([["{x} Question: ", None]], ["user"], "chat", ["question"]) == [
        {"role": "user", "content": "{{x}} Question: {question}"}]


def test_memory_is_bounded_and_recurring_templates_survive_a_flood_of_one_offs() -> None:
    rng = random.Random(3)
    template = make_template(rng, "chat", 2)
    miner = PromptMiner(max_clusters=50)
    for i in range(2000):
        if i % 40 == 0:
            observe(miner, template.kind, template.request(rng))
        kind, request = noise(rng)
        observe(miner, kind, request)
    assert len(miner) <= 50 and miner.evicted >= 1900
    (found,) = miner.summaries(MIN_REQUESTS)
    assert found.requests >= MIN_REQUESTS and len(found.examples) <= 3


def test_templates_of_different_tenants_are_different_candidates() -> None:
    rng = random.Random(5)
    template = make_template(rng, "completion", 1)
    miner = PromptMiner()
    for tenant in ("acme", "globex"):
        for _ in range(MIN_REQUESTS):
            request = template.request(rng)
            assert isinstance(request, str)
            miner.observe(observation(tenant, "completion", prompt=request))
    found = miner.summaries(MIN_REQUESTS)
    assert sorted(s.tenant or "" for s in found) == ["acme", "globex"]
    assert len({s.id for s in found}) == 2 and len({str(s.template) for s in found}) == 1
