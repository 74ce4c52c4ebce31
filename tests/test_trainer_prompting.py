"""Cutting a template into instructions, declared example blocks and query frames; stage inputs."""

from __future__ import annotations

import pytest

from core.templates import parse_template
from tests.trainer_fixtures import EXAMPLES, INSTRUCTIONS, tiny_messages
from trainer.data import TrainDataError
from trainer.prompting import PromptLayout


def identity(text: str) -> str:
    return text


def test_declared_examples_format_is_inferred_from_the_template() -> None:
    layout = PromptLayout.build(parse_template(messages=tiny_messages()), EXAMPLES)
    fmt = layout.example_format
    assert (fmt.prefix, fmt.joins, fmt.separator, fmt.declared) == ("Input: ", ("\nOutput: ",), "\n\n", True)
    assert layout.instruction_texts() == [f"{INSTRUCTIONS}\n\nExamples:"]
    user = layout.messages[1]
    assert [(s.kind, s.text) for s in user.segments] == [
        ("frame", "Input: "), ("slot", "query"), ("frame", "\nOutput:"),
    ]


def test_rendering_the_declared_examples_uncompressed_gives_back_the_full_prompt() -> None:
    template = parse_template(messages=tiny_messages())
    layout = PromptLayout.build(template, EXAMPLES)
    values = {"query": "print the date"}
    assert layout.render(values, examples=EXAMPLES, compress=identity) == template.render(values)


def test_stage_input_swaps_examples_and_compresses_only_instructions() -> None:
    template = parse_template(messages=tiny_messages())
    layout = PromptLayout.build(template, EXAMPLES)
    shown = [{"query": "show running processes", "response": "ps aux"}]
    out = layout.render({"query": "Q?"}, examples=shown, compress=lambda t: "SHORT")
    assert out == [
        {"role": "system", "content": "SHORT\n\nInput: show running processes\nOutput: ps aux"},
        {"role": "user", "content": "Input: Q?\nOutput:"},
    ]
    none = layout.render({"query": "Q?"}, examples=[], compress=lambda t: "SHORT")
    assert none[0] == {"role": "system", "content": "SHORT"}


def test_other_example_formats_and_headers() -> None:
    shots = [{"query": "2+2", "response": "4"}, {"query": "3+5", "response": "8"}, {"query": "1+1", "response": "2"}]
    text = "Do arithmetic.\n\n" + "\n\n".join(f"### Example\nQ: {s['query']}\nA: {s['response']}" for s in shots)
    template = parse_template(prompt=text + "\n\n### Task\nQ: {query}\nA:")
    layout = PromptLayout.build(template, shots)
    assert layout.example_format.prefix == "### Example\nQ: "
    assert layout.example_format.joins == ("\nA: ",)
    out = layout.render({"query": "9+1"}, examples=shots[:1], compress=identity)
    assert out == "Do arithmetic.\n\n### Example\nQ: 2+2\nA: 4\n\n### Task\nQ: 9+1\nA:"


def test_multi_slot_examples() -> None:
    shots = [
        {"source": "en", "text": "hello", "response": "bonjour"},
        {"source": "de", "text": "danke", "response": "merci"},
    ]
    content = "Translate into French.\n\n" + "\n\n".join(
        f"From {s['source']}: {s['text']}\nFrench: {s['response']}" for s in shots
    )
    template = parse_template(messages=[{"role": "system", "content": content},
                                        {"role": "user", "content": "From {source}: {text}\nFrench:"}])
    layout = PromptLayout.build(template, shots)
    assert layout.example_format.prefix == "From "
    assert layout.example_format.joins == (": ", "\nFrench: ")
    values = {"source": "it", "text": "grazie"}
    assert layout.render(values, examples=shots, compress=identity) == template.render(values)


def test_without_declared_examples_the_default_format_goes_before_the_query() -> None:
    template = parse_template(messages=[{"role": "system", "content": "Be terse."},
                                        {"role": "user", "content": "{query}"}])
    layout = PromptLayout.build(template, [])
    assert not layout.example_format.declared
    out = layout.render({"query": "Q"}, examples=[{"query": "a", "response": "b"}], compress=identity)
    assert out == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Input: a\nOutput: b\n\nQ"},
    ]
    assert layout.render({"query": "Q"}, examples=[], compress=identity)[1] == {"role": "user", "content": "Q"}


def test_long_instructions_around_a_slot_are_compressed_but_its_line_is_kept() -> None:
    long = "Please read carefully. " * 20
    template = parse_template(prompt=long + "\nQuestion: {query}\nAnswer:")
    layout = PromptLayout.build(template, [])
    out = layout.render({"query": "why"}, examples=[], compress=lambda t: "X")
    assert out == "X \nQuestion: why\nAnswer:"  # the whitespace around instructions stays


def test_an_example_missing_from_the_template_is_a_clear_error() -> None:
    template = parse_template(messages=tiny_messages())
    with pytest.raises(TrainDataError, match="example 0 does not appear verbatim"):
        PromptLayout.build(template, [{"query": "not there", "response": "nope"}])


def test_examples_split_over_two_messages_are_refused() -> None:
    template = parse_template(messages=[
        {"role": "system", "content": "Input: a\nOutput: b"},
        {"role": "user", "content": "Input: c\nOutput: d\n\nInput: {query}\nOutput:"},
    ])
    with pytest.raises(TrainDataError, match="together in one message"):
        PromptLayout.build(template, [{"query": "a", "response": "b"}, {"query": "c", "response": "d"}])
