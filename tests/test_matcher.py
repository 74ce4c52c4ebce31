"""Matcher: render-then-match round trips, near misses, priority, and concurrent updates.

Joining an array of text parts into one string is the caller's job (the OpenAI layer), so every
request here is plain (role, text) pairs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from core.templates import CHAT_ROLES, COMPLETION_ROLE, PromptTemplate, Slot, escape, normalize, parse_template
from gateway.matcher import Match, Matcher

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])

# Static text and slot values share a few characters (space, newline, brace, "a") so that values
# sometimes contain pieces of the static text around them; no "\r", which normalisation rewrites.
STATIC = st.text(alphabet="ab:. \n{}", min_size=1, max_size=10)
VALUE = st.text(alphabet="acdé1 \n{", min_size=1, max_size=10)
SLOT_NAMES = st.lists(st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True), min_size=1, max_size=3, unique=True)


@st.composite
def message_source(draw: st.DrawFn, slots: list[str]) -> str:
    """Template text for one message: static pieces with the given slots between them."""
    if not slots:
        return escape(draw(st.text(alphabet="ab:. \n{}", max_size=10)))
    pieces = [escape(draw(st.just("") | STATIC))]
    for i, name in enumerate(slots):
        if i:
            pieces.append(escape(draw(STATIC)))  # touching slots are refused by the parser
        pieces.append("{" + name + "}")
    pieces.append(escape(draw(st.just("") | STATIC)))
    return "".join(pieces)


@st.composite
def templates(draw: st.DrawFn) -> PromptTemplate:
    names = draw(SLOT_NAMES)
    if draw(st.booleans()):
        return parse_template(prompt=draw(message_source(names)))
    count = draw(st.integers(1, 3))
    roles = draw(st.lists(st.sampled_from(sorted(CHAT_ROLES)), min_size=count, max_size=count))
    owners = [draw(st.integers(0, count - 1)) for _ in names]
    messages = [
        {"role": role, "content": draw(message_source([n for n, o in zip(names, owners, strict=True) if o == i]))}
        for i, role in enumerate(roles)
    ]
    return parse_template(messages=messages)


def stops_at(after: str) -> Callable[[str], bool]:
    """Accepts a value only if the first `after` in value + `after` is the one that follows it."""
    return lambda value: (value + after).find(after) == len(value)


@st.composite
def slot_values(draw: st.DrawFn, template: PromptTemplate) -> dict[str, str]:
    """Non-empty values whose rendering can only be read back one way.

    Matching takes each slot as short as possible, so a value followed by static text S must not
    contain S (nor a start of S that its own end completes): otherwise reading back would stop at
    that earlier S, which is a different but equally valid reading. A value that ends its message
    has no trailing whitespace, because normalisation strips it from the request.
    """
    values: dict[str, str] = {}
    for message in template.messages:
        for i, part in enumerate(message.parts):
            if not isinstance(part, Slot):
                continue
            after = message.parts[i + 1] if i + 1 < len(message.parts) else None
            if after is None:
                value = draw(VALUE.filter(lambda v: v == v.rstrip()))
            else:
                assert isinstance(after, str)
                value = draw(VALUE.filter(stops_at(after)))
            values[part.name] = value
    return values


def as_request(template: PromptTemplate, values: dict[str, str]) -> list[tuple[str, str]]:
    rendered = template.render(values)
    if isinstance(rendered, str):
        return [(COMPLETION_ROLE, rendered)]
    return [(m["role"], m["content"]) for m in rendered]


def detect(matcher: Matcher, template: PromptTemplate, request: list[tuple[str, str]]) -> Match | None:
    if template.kind == "completion":
        return matcher.match_completion(request[0][1])
    return matcher.match_chat(request)


def single(template: PromptTemplate, name: str = "t") -> Matcher:
    matcher = Matcher()
    matcher.add(name, template)
    return matcher


@PROPERTY
@given(st.data())
def test_render_then_match_gives_the_values_back(data: st.DataObject) -> None:
    template = data.draw(templates())
    values = data.draw(slot_values(template))
    request = as_request(template, values)
    found = detect(single(template), template, request)
    assert found is not None and found.name == "t" and found.values == values
    # Windows line ends and trailing whitespace are normalised away before matching.
    tail = data.draw(st.text(alphabet=" \t\n", max_size=3))
    crlf = [(role, text.replace("\n", "\r\n") + tail) for role, text in request]
    found = detect(single(template), template, crlf)
    assert found is not None and found.values == values


@dataclass
class Span:
    message: int
    start: int
    end: int


@PROPERTY
@given(st.data())
def test_one_character_changed_in_static_text_does_not_match(data: st.DataObject) -> None:
    template = data.draw(templates())
    values = data.draw(slot_values(template))
    request = as_request(template, values)
    spans: list[Span] = []
    for index, message in enumerate(template.messages):
        offset = 0
        for part in message.parts:
            size = len(values[part.name]) if isinstance(part, Slot) else len(part)
            if isinstance(part, str):
                spans.append(Span(index, offset, offset + size))
            offset += size
    assume(spans)
    span = data.draw(st.sampled_from(spans))
    at = data.draw(st.integers(span.start, span.end - 1))
    text = request[span.message][1]
    edit = data.draw(st.sampled_from(["insert", "delete", "replace"]))
    char = data.draw(st.sampled_from("ab:.cdé1 \n{}x"))
    changed = {
        "insert": text[:at] + char + text[at:],
        "delete": text[:at] + text[at + 1 :],
        "replace": text[:at] + char + text[at + 1 :],
    }[edit]
    # The edit may still be a rendering (e.g. a deleted space that a value supplies); the regex,
    # an independent reading of the template, decides that case.
    assume(template.messages[span.message].pattern.fullmatch(normalize(changed)) is None)
    request[span.message] = (request[span.message][0], changed)
    assert detect(single(template), template, request) is None


@PROPERTY
@given(st.data())
def test_other_roles_or_message_counts_do_not_match(data: st.DataObject) -> None:
    template = data.draw(templates().filter(lambda t: t.kind == "chat"))
    request = as_request(template, data.draw(slot_values(template)))
    matcher = single(template)
    assert matcher.match_chat(request) is not None
    index = data.draw(st.integers(0, len(request) - 1))
    role = data.draw(st.sampled_from(sorted(CHAT_ROLES - {request[index][0]})))
    assert matcher.match_chat([*request[:index], (role, request[index][1]), *request[index + 1 :]]) is None
    assert matcher.match_chat([*request, ("user", "more")]) is None
    assert matcher.match_chat([("system", "more"), *request]) is None
    assert matcher.match_chat(request[:-1]) is None
    assert matcher.match_completion("\n".join(text for _, text in request)) is None


@PROPERTY
@given(st.data())
def test_linear_matching_agrees_with_the_regex(data: st.DataObject) -> None:
    """`MessageTemplate.match` avoids regex backtracking but must read text exactly as the regex does."""
    template = data.draw(templates())
    message = data.draw(st.sampled_from(template.messages))
    text = data.draw(st.text(alphabet="ab:. \n{}c", max_size=30))
    if data.draw(st.booleans()):  # a rendering with unfiltered values, ambiguous ones included
        text = message.render({name: data.draw(VALUE) for name in message.slots})
    expected = message.pattern.fullmatch(text)
    found = message.match(text)
    event("regex matches" if expected else "regex does not match")
    if expected is None:
        assert found is None
    else:
        assert found == dict(zip(message.slots, expected.groups(), strict=True))


def chat(*messages: tuple[str, str]) -> PromptTemplate:
    return parse_template(messages=[{"role": r, "content": c} for r, c in messages])


def test_more_static_characters_win() -> None:
    matcher = Matcher()
    matcher.add("short", chat(("user", "Summarise: {text}")))
    matcher.add("long", chat(("user", "Summarise: {text}. Be brief.")))
    matcher.add("prefix", parse_template(messages=[{"role": "user", "content": "Sum{text}"}]))
    found = matcher.match_chat([("user", "Summarise: the report. Be brief.")])
    assert found is not None and found.name == "long" and found.values == {"text": "the report"}
    found = matcher.match_chat([("user", "Summarise: the report.")])
    assert found is not None and found.name == "short"
    found = matcher.match_chat([("user", "Summary")])
    assert found is not None and found.name == "prefix" and found.values == {"text": "mary"}


def test_equal_static_characters_tie_break_on_name_whatever_the_order_added() -> None:
    for order in (["beta", "alpha"], ["alpha", "beta"]):
        matcher = Matcher()
        for name in order:
            matcher.add(name, chat(("user", "Q: {q}")))
        found = matcher.match_chat([("user", "Q: why")])
        assert found is not None and found.name == "alpha"


def test_nested_static_prefixes_pick_the_longest() -> None:
    matcher = Matcher()
    for prefix in ("A", "AB", "ABC", "ABCDEFGHIJ"):
        matcher.add(prefix, parse_template(prompt=prefix + "{q}"))
    found = matcher.match_completion("ABCx")
    assert found is not None and found.name == "ABC" and found.values == {"q": "x"}
    found = matcher.match_completion("ABCDEFGHIJK")
    assert found is not None and found.name == "ABCDEFGHIJ"


def test_remove_replace_len_and_names() -> None:
    matcher = Matcher()
    matcher.add("a", chat(("user", "Translate: {text}")))
    matcher.add("b", chat(("system", "Be kind."), ("user", "{q}")))
    assert len(matcher) == 2 and matcher.names() == ["a", "b"]
    matcher.add("a", chat(("user", "Traduis : {text}")))
    assert len(matcher) == 2
    assert matcher.match_chat([("user", "Translate: hi")]) is None
    found = matcher.match_chat([("user", "Traduis : salut")])
    assert found is not None and found.name == "a"
    matcher.remove("a")
    matcher.remove("a")
    matcher.remove("never-added")
    assert matcher.names() == ["b"] and matcher.match_chat([("user", "Traduis : salut")]) is None
    matcher.remove("b")
    assert len(matcher) == 0 and matcher.match_chat([("system", "Be kind."), ("user", "x")]) is None


def test_completion_and_chat_never_cross() -> None:
    matcher = Matcher()
    matcher.add("completion", parse_template(prompt="Q: {q}"))
    matcher.add("chat", chat(("user", "Q: {q}")))
    completion = matcher.match_completion("Q: hi")
    assert completion is not None and completion.name == "completion"
    found = matcher.match_chat([("user", "Q: hi")])
    assert found is not None and found.name == "chat"
    assert matcher.match_chat([(COMPLETION_ROLE, "Q: hi")]) is None
    matcher.remove("chat")
    assert matcher.match_chat([("user", "Q: hi")]) is None


@pytest.mark.parametrize(
    ("source", "text"),
    [("Q: {q}", "Q: "), ("Q: {q}", "Q:"), ("Q: {q}!", "Q: !"), ("{a}-{b}", "-x"), ("{a}-{b}", "x-"),
     ("{a}-{b}", "x-  \r\n"), ("{q}", ""), ("{q}", " \n ")],
)
def test_empty_slot_values_never_match(source: str, text: str) -> None:
    assert single(parse_template(prompt=source)).match_completion(text) is None
    assert single(chat(("user", source))).match_chat([("user", text)]) is None


def test_crlf_and_trailing_whitespace_in_template_and_request() -> None:
    matcher = single(chat(("system", "Rules:\r\n- be brief  \r\n"), ("user", "Text:\r\n{text}\r\n")))
    found = matcher.match_chat([("system", "Rules:\n- be brief"), ("user", "Text:\r\nline 1\r\nline 2 \t\r\n")])
    assert found is not None and found.values == {"text": "line 1\nline 2"}


def test_many_templates_sharing_a_long_prefix() -> None:
    shared = "You are a careful assistant. Follow the house style guide exactly, and never guess. " * 3
    matcher = Matcher()
    for i in range(300):
        matcher.add(f"p{i}", chat(("system", shared), ("user", f"{shared}Task {i}: {{query}} (ref {i})")))
    matcher.add("loose", chat(("system", shared), ("user", f"{shared}{{query}}")))
    for i in (0, 7, 150, 299):
        found = matcher.match_chat([("system", shared), ("user", f"{shared}Task {i}: do it (ref {i})")])
        assert found is not None and found.name == f"p{i}" and found.values == {"query": "do it"}
    found = matcher.match_chat([("system", shared), ("user", f"{shared}Task 7: do it (ref 8)")])
    assert found is not None and found.name == "loose"
    assert matcher.match_chat([("system", shared + "!"), ("user", f"{shared}Task 7: do it (ref 7)")]) is None


def test_three_slots_on_a_long_adversarial_request_stay_linear() -> None:
    # A backtracking regex needs minutes here (cubic in the length); the linear matcher does not.
    template = parse_template(prompt="{a}, {b}, {c}.")
    assert single(template).match_completion("x, " * 3000) is None
    found = single(template).match_completion("a, b, c, d.")
    assert found is not None and found.values == {"a": "a", "b": "b", "c": "c, d"}


def test_concurrent_updates_while_matching() -> None:
    matcher = Matcher()
    matcher.add("stable", chat(("system", "Stable rules."), ("user", "Ask: {q}")))
    flapping = chat(("system", "Stable rules."), ("user", "Ask: {q} (urgent)"))
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            i = 0
            while not stop.is_set():
                matcher.add("flapping", flapping)
                matcher.add(f"other{i % 50}", chat(("user", f"Other {i}: {{q}}")))
                matcher.remove("flapping")
                i += 1
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(3000):
            found = matcher.match_chat([("system", "Stable rules."), ("user", "Ask: why")])
            assert found is not None and found.name == "stable" and found.values == {"q": "why"}
            found = matcher.match_chat([("system", "Stable rules."), ("user", "Ask: why (urgent)")])
            assert found is not None
            assert (found.name, found.values) in [("flapping", {"q": "why"}), ("stable", {"q": "why (urgent)"})]
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert "stable" in matcher.names() and "flapping" not in matcher.names()


# --- the index against a brute-force reading of every template ----------------------------------


def best_by_brute_force(registered: dict[str, PromptTemplate], request: list[tuple[str, str]],
                        completion: bool) -> tuple[str, dict[str, str]] | None:
    """What matching means, without an index: the template with the most static text, then the first name."""
    texts = [normalize(text) for _, text in request]
    found: list[tuple[tuple[int, str], dict[str, str]]] = []
    for name, template in registered.items():
        if completion != (template.kind == "completion"):
            continue
        if not completion and template.roles != tuple(role for role, _ in request):
            continue
        values = template.match(texts)
        if values is not None:
            found.append(((-template.static_chars, name), values))
    if not found:
        return None
    (_, name), values = min(found, key=lambda item: item[0])
    return name, values


@PROPERTY
@given(st.data())
def test_the_index_finds_what_reading_every_template_finds(data: st.DataObject) -> None:
    """Several templates at once (sharing anchors, or whole messages, often): the index must give the same best
    template and values as trying each template's own `match`, for renderings and near-renderings alike."""
    registered = {f"t{i}": t for i, t in enumerate(data.draw(st.lists(templates(), min_size=1, max_size=6)))}
    matcher = Matcher()
    matcher.add_many(registered.items())
    for name in data.draw(st.lists(st.sampled_from(sorted(registered)), max_size=2, unique=True)):
        matcher.remove(name)
        del registered[name]
    assume(registered)
    template = data.draw(st.sampled_from(list(registered.values())))
    request = as_request(template, data.draw(slot_values(template)))
    if data.draw(st.booleans()):  # an edit anywhere: often no match, sometimes another template's
        index = data.draw(st.integers(0, len(request) - 1))
        text = request[index][1]
        at = data.draw(st.integers(0, len(text)))
        request[index] = (request[index][0], text[:at] + data.draw(st.sampled_from("ab:. \n{}c\r")) + text[at:])
    completion = template.kind == "completion"
    found = detect(matcher, template, request)
    expected = best_by_brute_force(registered, request, completion)
    event("matched" if expected else "no match")
    assert (None if found is None else (found.name, found.values)) == expected
    if found is not None:
        assert found.template is registered[found.name]


@PROPERTY
@given(st.data())
def test_the_compiled_reading_of_a_message_is_its_own(data: st.DataObject) -> None:
    from gateway.matcher import _Reader

    template = data.draw(templates())
    message = data.draw(st.sampled_from([m for m in template.messages if not m.is_static]))
    text = data.draw(st.text(alphabet="ab:. \n{}c", max_size=30))
    if data.draw(st.booleans()):  # a rendering with unfiltered values, ambiguous ones included
        text = message.render({name: data.draw(VALUE) for name in message.slots})
    assert _Reader(message).read(text) == message.match(text)


@given(st.text(alphabet="a \t\r\n\x0b\u00a0", max_size=12))
def test_request_normalisation_is_the_templates_own(text: str) -> None:
    from gateway.matcher import _normalize

    assert _normalize(text) == normalize(text)


def test_add_many_is_add_one_by_one() -> None:
    pairs = [(f"p{i}", chat(("system", f"Rules {i % 3}."), ("user", f"Task {i % 5}: {{q}}"))) for i in range(30)]
    one_by_one, bulk = Matcher(), Matcher()
    for name, template in pairs:
        one_by_one.add(name, template)
    bulk.add_many(pairs)
    assert bulk.names() == one_by_one.names() and len(bulk) == 30
    for i in range(30):
        request = [("system", f"Rules {i % 3}."), ("user", f"Task {i % 5}: go")]
        hit, expected = bulk.match_chat(request), one_by_one.match_chat(request)
        assert hit is not None and expected is not None and hit.name == expected.name


def test_removing_everything_leaves_an_empty_index() -> None:
    """Buckets and shapes are dropped with their last template, so a long-lived gateway does not grow."""
    matcher = Matcher()
    names = []
    for i in range(40):
        names.append(f"p{i}")
        matcher.add(names[-1], chat(("system", "S" * (i + 1)), ("user", f"{'x' * i}{{q}}{'y' * (40 - i)}")))
    matcher.add("p0", parse_template(prompt="Q: {q}"))  # replaced: filed elsewhere, the old place emptied
    for name in names:
        matcher.remove(name)
    assert len(matcher) == 0 and matcher.names() == []
    assert not (matcher._index.shapes or matcher._filed or matcher._shape_of)
    assert not any(leaf for row in matcher._index.table for leaf in row)


def test_a_replaced_template_is_never_missing() -> None:
    """A replacement is one new generation of the index: a request that both versions fill in always matches."""
    matcher = Matcher()
    plain = chat(("user", "Ask: {q}"))
    urgent = chat(("user", "Ask: {q} (urgent)"))  # another suffix anchor: another bucket
    matcher.add("a", plain)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            while not stop.is_set():
                matcher.add("a", urgent)
                matcher.add("a", plain)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(3000):
            found = matcher.match_chat([("user", "Ask: why (urgent)")])
            assert found is not None and found.name == "a"
            assert found.values in ({"q": "why (urgent)"}, {"q": "why"})
    finally:
        stop.set()
        thread.join()
    assert not errors and len(matcher) == 1
