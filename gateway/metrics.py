"""Every Prometheus metric the gateway exports, defined in one place (base units, bounded labels).

The `prompt` label is bounded too: the first `max_prompts` prompts seen (registered, or first
counted) get series of their own, every later one is counted under `prompt="other"`, so a registry
of 100,000 prompts cannot grow `/metrics` (and Prometheus) without bound. A prompt keeps its series
for the life of the process; `none` (no prompt matched) and `other` are always there, at 0 from the
start, and take no place. The savings counters also carry a `tenant` label: a tenant of `API_KEYS` or
`none` (requests of no tenant), bounded by the configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# LLM-sized latency buckets: tens of milliseconds to minutes.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0,
                   300.0)
# Time per output token: a millisecond (a GPU) to a second (a large model on CPU).
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
DETECTION_BUCKETS = (1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2)
ADAPTER_STATUSES = ("training", "loading", "ready", "failed", "rejected")
ROUTES = ("adapter", "fallback", "passthrough")
NO_PROMPT = "none"
NO_TENANT = "none"
OTHER_PROMPT = "other"
DEFAULT_MAX_PROMPTS = 500
SHADOW_AGREE = ("true", "false")
TOP_CANDIDATES = 10  # discovery candidates with series of their own (the best by projected saving)


class PromptLabels:
    """The `prompt` label value of each prompt name: its own while places remain, then `other`."""

    def __init__(self, max_prompts: int) -> None:
        if max_prompts < 0:
            raise ValueError(f"max_prompts must be at least 0, got {max_prompts}")
        self.max_prompts = max_prompts
        self._own: set[str] = set()

    def __call__(self, prompt: str) -> str:
        if prompt in self._own or prompt in (NO_PROMPT, OTHER_PROMPT):
            return prompt
        if len(self._own) < self.max_prompts:
            self._own.add(prompt)
            return prompt
        return OTHER_PROMPT

    def __len__(self) -> int:
        """Prompts with series of their own (`none` and `other` not counted)."""
        return len(self._own)


class PerPromptCounter:
    """A counter with a `prompt` label whose values go through `PromptLabels`, so no caller can pass the cap."""

    def __init__(self, counter: Counter, labels: PromptLabels, *, tenant: bool = True) -> None:
        self.counter = counter
        self._labels = labels
        self._tenant = tenant

    def labels(self, prompt: str, tenant: str = NO_TENANT, **others: str) -> Counter:
        if not self._tenant:
            return self.counter.labels(prompt=self._labels(prompt), **others)
        return self.counter.labels(prompt=self._labels(prompt), tenant=tenant, **others)


class PerPromptHistogram:
    """A histogram with a `prompt` label whose values go through `PromptLabels` (as `PerPromptCounter`)."""

    def __init__(self, histogram: Histogram, labels: PromptLabels) -> None:
        self.histogram = histogram
        self._labels = labels

    def labels(self, prompt: str, **others: str) -> Histogram:
        return self.histogram.labels(prompt=self._labels(prompt), **others)


class RankedCandidate(Protocol):
    """What the discovery gauges show of a candidate (`gateway.discovery.protocol.CandidateOut`)."""

    @property
    def id(self) -> str: ...
    @property
    def tenant(self) -> str | None: ...
    @property
    def kind(self) -> str: ...
    @property
    def requests(self) -> int: ...
    @property
    def projected_saved_tokens(self) -> int: ...
    @property
    def projected_saved_usd(self) -> float: ...


@dataclass(frozen=True, slots=True)
class AnsweredSeries:
    """The series one answered request of a (prompt label, tenant label, route) counts in, bound once: resolving
    a label set costs several times the increment itself."""

    requests: Any
    original_prompt_tokens: Any
    sent_prompt_tokens: Any
    saved_prompt_tokens: Any
    saved_cost: Any
    completion_tokens: Any
    decode_tokens: Any
    request_duration: Any
    time_to_first_token: Any
    time_per_output_token: Any


class GatewayMetrics:
    """The gateway's metrics on their own registry, so every app (and test) has a clean set."""

    def __init__(self, registry: CollectorRegistry | None = None, max_prompts: int = DEFAULT_MAX_PROMPTS,
                 tenants: frozenset[str] = frozenset()) -> None:
        self.registry = registry or CollectorRegistry()
        self.tenants = tenants
        self.prompt_labels = PromptLabels(max_prompts)
        r = self.registry
        per_prompt = self.prompt_labels
        self.requests = PerPromptCounter(Counter(
            "promptintern_requests", "Requests answered, by matched prompt and route",
            ["prompt", "tenant", "route"], registry=r,
        ), per_prompt)
        self.request_errors = Counter(
            "promptintern_request_errors", "Requests that ended in an error, by route and HTTP status",
            ["route", "code"], registry=r,
        )
        self.original_prompt_tokens = PerPromptCounter(Counter(
            "promptintern_original_prompt_tokens", "Prompt tokens the apps sent (before stripping)",
            ["prompt", "tenant"], registry=r,
        ), per_prompt)
        self.sent_prompt_tokens = PerPromptCounter(Counter(
            "promptintern_sent_prompt_tokens", "Prompt tokens the model processed", ["prompt", "tenant"],
            registry=r,
        ), per_prompt)
        self.saved_prompt_tokens = PerPromptCounter(Counter(
            "promptintern_saved_prompt_tokens", "Prompt tokens removed by routing to an adapter",
            ["prompt", "tenant"], registry=r,
        ), per_prompt)
        self.saved_cost = PerPromptCounter(Counter(
            "promptintern_saved_cost_usd", "Input cost saved at the configured price (USD)",
            ["prompt", "tenant"], registry=r,
        ), per_prompt)
        self.completion_tokens = PerPromptCounter(Counter(
            "promptintern_completion_tokens", "Completion tokens generated", ["prompt", "tenant"], registry=r,
        ), per_prompt)
        self.upstream_requests = Counter(
            "promptintern_upstream_requests", "Requests relayed to the upstream provider, by route (fallback or "
            "passthrough) and status (200; 502/504: it failed or was too slow; its own 4xx; 499: the client left)",
            ["route", "code"], registry=r,
        )
        self.request_duration = Histogram(
            "promptintern_request_duration_seconds", "Time from request to last byte, by route",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.time_to_first_token = PerPromptHistogram(Histogram(
            "promptintern_time_to_first_token_seconds", "Time from request to first generated text, by prompt "
            "and route", ["prompt", "route"], buckets=LATENCY_BUCKETS, registry=r,
        ), per_prompt)
        self.time_per_output_token = PerPromptHistogram(Histogram(
            "promptintern_time_per_output_token_seconds", "Time per answer token after the first (from the first "
            "generated text to the end, over the tokens after the first), by prompt and route; answers of one "
            "token or of several choices are not observed", ["prompt", "route"], buckets=TPOT_BUCKETS, registry=r,
        ), per_prompt)
        self.decode_tokens = PerPromptCounter(Counter(
            "promptintern_decode_tokens", "Answer tokens after the first of the answers observed in "
            "promptintern_time_per_output_token_seconds, by prompt and route (decode seconds = TPOT x these)",
            ["prompt", "route"], registry=r,
        ), per_prompt, tenant=False)
        self.detection_duration = Histogram(
            "promptintern_detection_duration_seconds", "Time spent recognising a registered prompt",
            buckets=DETECTION_BUCKETS, registry=r,
        )
        self.adapters = Gauge(
            "promptintern_adapters", "Adapter versions by status", ["status"], registry=r,
        )
        for status in ADAPTER_STATUSES:
            self.adapters.labels(status=status).set(0)
        # The shadow guard (prompt labels bounded like the rest: `prompt_label`).
        self.shadow_requests = Counter(
            "promptintern_shadow_requests", "Adapter answers compared with the teacher's (the full prompt), by "
            "whether the pair agreed (its agreement reached the guard's min_agreement)", ["prompt", "agree"],
            registry=r,
        )
        self.shadow_agreement = Gauge(
            "promptintern_shadow_agreement", "Mean agreement of the active adapter's last shadowed answers with "
            "the teacher's (0..1), over the guard's window so far", ["prompt"], registry=r,
        )
        self.shadow_dropped = Counter(
            "promptintern_shadow_dropped", "Shadow checks not run because the shadow queue was full", ["prompt"],
            registry=r,
        )
        self.rollbacks = Counter(
            "promptintern_rollbacks", "Versions the shadow guard rejected and rolled back from", ["prompt"],
            registry=r,
        )
        # Prompt discovery (gateway/discovery): what the miner reads and holds, and the top candidates by projected
        # saving (at most TOP_CANDIDATES series at a time, so the labels stay bounded).
        self.discovery_observed = Counter(
            "promptintern_discovery_requests", "Passthrough requests the discovery miner read (the sampled share)",
            registry=r,
        )
        self.discovery_dropped = Counter(
            "promptintern_discovery_dropped", "Passthrough requests not mined: the miner's queue was full",
            registry=r,
        )
        self.discovery_clusters = Gauge(
            "promptintern_discovery_clusters", "Templates the miner holds on this replica", registry=r,
        )
        self.discovery_candidates = Gauge(
            "promptintern_discovery_candidates", "Discovered prompt candidates (all replicas)", registry=r,
        )
        candidate = ["rank", "candidate", "tenant", "kind"]
        self.discovery_saved_tokens = Gauge(
            "promptintern_discovery_projected_saved_tokens", f"Projected saved prompt tokens of the top "
            f"{TOP_CANDIDATES} candidates (requests seen x static tokens an adapter removes)", candidate,
            registry=r,
        )
        self.discovery_saved_usd = Gauge(
            "promptintern_discovery_projected_saved_usd", "The same in USD at PRICE_INPUT_PER_1K", candidate,
            registry=r,
        )
        self.discovery_requests = Gauge(
            "promptintern_discovery_candidate_requests", f"Requests seen of the top {TOP_CANDIDATES} candidates",
            candidate, registry=r,
        )
        self.discovery_candidates.set(0)
        self.discovery_clusters.set(0)
        self._answered: dict[tuple[str, str, str], AnsweredSeries] = {}
        self.track_prompt(NO_PROMPT)
        self.track_prompt(OTHER_PROMPT)

    def answered(self, prompt: str, tenant: str | None, route: str) -> AnsweredSeries:
        """The series an answered request counts in; bound once per label set (prompt and tenant labels are
        bounded, so this cache is too)."""
        label, tenant_label = self.prompt_labels(prompt), self.tenant_label(tenant)
        key = (label, tenant_label, route)
        series = self._answered.get(key)
        if series is None:
            series = self._answered[key] = AnsweredSeries(
                requests=self.requests.labels(prompt=label, tenant=tenant_label, route=route),
                original_prompt_tokens=self.original_prompt_tokens.labels(prompt=label, tenant=tenant_label),
                sent_prompt_tokens=self.sent_prompt_tokens.labels(prompt=label, tenant=tenant_label),
                saved_prompt_tokens=self.saved_prompt_tokens.labels(prompt=label, tenant=tenant_label),
                saved_cost=self.saved_cost.labels(prompt=label, tenant=tenant_label),
                completion_tokens=self.completion_tokens.labels(prompt=label, tenant=tenant_label),
                decode_tokens=self.decode_tokens.labels(prompt=label, route=route),
                request_duration=self.request_duration.labels(route=route),
                time_to_first_token=self.time_to_first_token.labels(prompt=label, route=route),
                time_per_output_token=self.time_per_output_token.labels(prompt=label, route=route))
        return series

    def prompt_label(self, prompt: str) -> str:
        """The bounded `prompt` label of a prompt name (its own, or `other` beyond `max_prompts`)."""
        return self.prompt_labels(prompt)

    def tenant_label(self, tenant: str | None) -> str:
        """A configured tenant's name, else `none`: the label stays bounded by the configuration."""
        return tenant if tenant is not None and tenant in self.tenants else NO_TENANT

    def track_prompt(self, prompt: str, tenant: str | None = None) -> None:
        """Export a registered prompt's series (for its tenant, `none` for a global prompt) at 0 right away, so
        `rate()` sees them start from zero (a prompt past the cap is counted under `other`, already there)."""
        if self.prompt_labels(prompt) != prompt:
            return
        label = self.tenant_label(tenant)
        for route in ROUTES:
            self.requests.labels(prompt=prompt, tenant=label, route=route)
            self.decode_tokens.labels(prompt=prompt, route=route)
        # The speed histograms on the routes a registered prompt takes: the net-seconds-saved rule divides their
        # rates, and a series created at its first observation would leave that observation out of rate().
        for route in ("passthrough",) if prompt == NO_PROMPT else ("adapter", "fallback"):
            self.time_to_first_token.labels(prompt, route=route)
            self.time_per_output_token.labels(prompt, route=route)
        for counter in (self.original_prompt_tokens, self.sent_prompt_tokens, self.saved_prompt_tokens,
                        self.saved_cost, self.completion_tokens):
            counter.labels(prompt=prompt, tenant=label)
        # The shadow guard's counters too: a rollback, often the first of its prompt, must show in increase().
        for agree in SHADOW_AGREE:
            self.shadow_requests.labels(prompt=prompt, agree=agree)
        self.shadow_dropped.labels(prompt=prompt)
        self.rollbacks.labels(prompt=prompt)

    def set_adapter_counts(self, counts: dict[str, int]) -> None:
        for status in ADAPTER_STATUSES:
            self.adapters.labels(status=status).set(counts.get(status, 0))

    def show_candidates(self, ranked: Sequence[RankedCandidate]) -> None:
        """Set the discovery gauges from a ranked candidate list (best first): the count, and the top ones."""
        self.discovery_candidates.set(len(ranked))
        for gauge in (self.discovery_saved_tokens, self.discovery_saved_usd, self.discovery_requests):
            gauge.clear()
        for rank, c in enumerate(ranked[:TOP_CANDIDATES], start=1):
            labels = {"rank": str(rank), "candidate": c.id, "tenant": c.tenant or NO_TENANT, "kind": c.kind}
            self.discovery_saved_tokens.labels(**labels).set(c.projected_saved_tokens)
            self.discovery_saved_usd.labels(**labels).set(c.projected_saved_usd)
            self.discovery_requests.labels(**labels).set(c.requests)
