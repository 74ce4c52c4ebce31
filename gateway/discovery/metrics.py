"""Discovery's metrics, on the gateway's registry: what the miner reads and holds, and the top candidates by
projected saving (at most TOP_CANDIDATES series at a time, so the labels stay bounded)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

TOP_CANDIDATES = 10


class _Ranked(Protocol):
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


class DiscoveryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.observed = Counter("promptintern_discovery_requests", "Passthrough requests the discovery miner read "
                                "(the sampled share)", registry=registry)
        self.dropped = Counter("promptintern_discovery_dropped", "Passthrough requests not mined: the miner's queue "
                               "was full", registry=registry)
        self.clusters = Gauge("promptintern_discovery_clusters", "Templates the miner holds on this replica",
                              registry=registry)
        self.candidates = Gauge("promptintern_discovery_candidates", "Discovered prompt candidates (all replicas)",
                                registry=registry)
        labels = ["rank", "candidate", "tenant", "kind"]
        self.top_saved_tokens = Gauge(
            "promptintern_discovery_projected_saved_tokens", f"Projected saved prompt tokens of the top "
            f"{TOP_CANDIDATES} candidates (requests seen x static tokens an adapter removes)", labels,
            registry=registry)
        self.top_saved_usd = Gauge(
            "promptintern_discovery_projected_saved_usd", "The same in USD at PRICE_INPUT_PER_1K", labels,
            registry=registry)
        self.top_requests = Gauge(
            "promptintern_discovery_candidate_requests", f"Requests seen of the top {TOP_CANDIDATES} candidates",
            labels, registry=registry)
        self.candidates.set(0)
        self.clusters.set(0)

    def show(self, ranked: Sequence[_Ranked]) -> None:
        """Set the gauges from a ranked candidate list (best first)."""
        self.candidates.set(len(ranked))
        for gauge in (self.top_saved_tokens, self.top_saved_usd, self.top_requests):
            gauge.clear()
        for rank, c in enumerate(ranked[:TOP_CANDIDATES], start=1):
            labels = {"rank": str(rank), "candidate": c.id, "tenant": c.tenant or "none", "kind": c.kind}
            self.top_saved_tokens.labels(**labels).set(c.projected_saved_tokens)
            self.top_saved_usd.labels(**labels).set(c.projected_saved_usd)
            self.top_requests.labels(**labels).set(c.requests)
