"""The routing table: which registered prompts this replica matches and which adapter answers each.

Global prompts (no tenant) live in one matcher; each tenant's private prompts in a matcher of their own, tried
first for that tenant's requests. Every change costs the same whatever the number of prompts (dicts updated in
place: the table is only touched on the event loop, so no reader sees a change half made).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from core.templates import PromptTemplate
from gateway.matcher import Match, Matcher
from gateway.prompts.protocol import GuardSetting


@dataclass(frozen=True)
class RoutablePrompt:
    """What the router needs to know about one registered prompt, replaced whole on every change."""

    name: str
    template: PromptTemplate
    static_tokens: int | None  # the template's tokens without slot values; None: not counted yet (start-up)
    adapter: str | None  # the engine's adapter name (`<prompt>@v<N>`) once a version is ready
    bare: bool = True  # False for adapters trained on the full prompt (kept at inference)
    tenant: str | None = None  # None: global, matched for every caller
    record_rate: float = 0.0  # share of its fallback answers recorded as training rows (0: off)
    record_max_rows: int = 0  # recorded rows kept (a ring buffer)
    guard: GuardSetting | None = None  # the shadow guard of its adapter answers (None: off)

    def visible_to(self, tenant: str | None) -> bool:
        return self.tenant is None or self.tenant == tenant


class RoutingTable:
    def __init__(self, matcher: Matcher) -> None:
        self.matcher = matcher  # global prompts
        self._tenant_matchers: dict[str, Matcher] = {}
        self._routes: dict[str, RoutablePrompt] = {}
        self._by_adapter: dict[str, RoutablePrompt] = {}

    def __len__(self) -> int:
        return len(self._routes)

    def get(self, name: str) -> RoutablePrompt | None:
        return self._routes.get(name)

    def require(self, name: str) -> RoutablePrompt:
        return self._routes[name]

    def names(self) -> Iterable[str]:
        return list(self._routes)

    def routes_to(self, adapter: str) -> bool:
        return adapter in self._by_adapter

    def by_adapter_model(self, model: str, tenant: str | None) -> RoutablePrompt | None:
        """The prompt an adapter id serves, if the caller's tenant may use it (another tenant's: None)."""
        entry = self._by_adapter.get(model)
        return entry if entry is not None and entry.visible_to(tenant) else None

    def adapter_models(self, tenant: str | None) -> list[str]:
        return sorted(model for model, entry in self._by_adapter.items() if entry.visible_to(tenant))

    def match_chat(self, messages: list[tuple[str, str]], tenant: str | None) -> Match | None:
        """The caller's tenant's prompts first, then the global ones."""
        own = self._tenant_matchers.get(tenant) if tenant is not None else None
        return (own.match_chat(messages) if own is not None else None) or self.matcher.match_chat(messages)

    def match_completion(self, prompt: str, tenant: str | None) -> Match | None:
        own = self._tenant_matchers.get(tenant) if tenant is not None else None
        return (own.match_completion(prompt) if own is not None else None) or self.matcher.match_completion(prompt)

    def publish(self, name: str, entry: RoutablePrompt | None) -> None:
        """Route `name` by `entry` from now on (None: stop routing it)."""
        old = self._routes.pop(name, None)
        if old is not None:
            if old.adapter is not None and self._by_adapter.get(old.adapter) is old:
                del self._by_adapter[old.adapter]
            if entry is None or entry.tenant != old.tenant:
                self._matcher_of(old.tenant).remove(name)
        if entry is None:
            return
        self._routes[name] = entry
        if entry.adapter is not None:
            self._by_adapter[entry.adapter] = entry
        if old is None or old.template is not entry.template or old.tenant != entry.tenant:
            self._matcher_of(entry.tenant).add(name, entry.template)

    def publish_many(self, entries: list[RoutablePrompt]) -> None:
        """Route many prompts not routed yet (start-up): each matcher takes its share in one bulk load."""
        by_tenant: dict[str | None, list[RoutablePrompt]] = {}
        for entry in entries:
            if entry.name in self._routes:
                self.publish(entry.name, entry)
                continue
            self._routes[entry.name] = entry
            if entry.adapter is not None:
                self._by_adapter[entry.adapter] = entry
            by_tenant.setdefault(entry.tenant, []).append(entry)
        for tenant, group in by_tenant.items():
            self._matcher_of(tenant).add_many((e.name, e.template) for e in group)

    def _matcher_of(self, tenant: str | None) -> Matcher:
        if tenant is None:
            return self.matcher
        return self._tenant_matchers.setdefault(tenant, Matcher())
