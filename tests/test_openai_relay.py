"""What the gateway relays from an engine besides text: tool calls and log probabilities, streamed pieces
joined into whole answers (pure parts; the real vLLM round trip is in test_vllm_engine.py)."""

from __future__ import annotations

from gateway.engines.base import Finished, TextDelta, ToolCallDelta, Usage
from gateway.engines.vllm import chunk_events
from gateway.openai_api.shaping import Outcome, merge_logprobs, merge_tool_calls

TOP = [{"token": "ls", "logprob": -0.1, "bytes": [108, 115], "top_logprobs": []}]


def test_vllm_chunks_become_text_logprob_and_tool_call_events() -> None:
    chunk = {"choices": [
        {"index": 0, "delta": {"content": "ls"}, "logprobs": {"content": TOP}, "finish_reason": None},
        {"index": 1, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                               "function": {"name": "run", "arguments": ""}}]},
         "finish_reason": None},
    ]}
    assert chunk_events(chunk, "chat") == [
        TextDelta(0, "ls", {"content": TOP}),
        ToolCallDelta(1, [{"index": 0, "id": "call_1", "type": "function",
                           "function": {"name": "run", "arguments": ""}}]),
    ]
    completion = {"choices": [{"index": 0, "text": " -la", "logprobs": {"tokens": [" -la"]},
                               "finish_reason": "length"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    assert chunk_events(completion, "completion") == [TextDelta(0, " -la", {"tokens": [" -la"]}), Finished(0, "length"),
                                                       Usage(3, 1)]
    assert chunk_events({"choices": [{"index": 0, "delta": {"content": ""}, "logprobs": None}]}, "chat") == []


def test_tool_call_deltas_join_into_whole_calls_in_index_order() -> None:
    deltas = [
        {"index": 1, "id": "call_b", "type": "function", "function": {"name": "grep", "arguments": '{"p'}},
        {"index": 0, "id": "call_a", "type": "function", "function": {"name": "ls", "arguments": ""}},
        {"index": 1, "function": {"arguments": 'attern": "x"}'}},
        {"index": 0, "function": {"arguments": "{}"}},
    ]
    assert merge_tool_calls(deltas) == [
        {"id": "call_a", "type": "function", "function": {"name": "ls", "arguments": "{}"}},
        {"id": "call_b", "type": "function", "function": {"name": "grep", "arguments": '{"pattern": "x"}'}},
    ]


def test_logprob_pieces_join_per_endpoint() -> None:
    second = [{"token": " -l", "logprob": -0.5, "bytes": [32, 45, 108], "top_logprobs": []}]
    assert merge_logprobs("chat", [{"content": TOP}, {"content": second}]) == {"content": TOP + second,
                                                                              "refusal": None}
    parts = [{"tokens": ["a"], "token_logprobs": [-1.0], "top_logprobs": [{"a": -1.0}], "text_offset": [0]},
             {"tokens": ["b"], "token_logprobs": [-2.0], "top_logprobs": [{"b": -2.0}], "text_offset": [1]}]
    assert merge_logprobs("completion", parts) == {"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0],
                                                   "top_logprobs": [{"a": -1.0}, {"b": -2.0}], "text_offset": [0, 1]}


def test_outcome_gathers_every_event_kind() -> None:
    outcome = Outcome()
    for event in (TextDelta(0, "l", {"content": TOP}), TextDelta(0, "s"), ToolCallDelta(1, [{"index": 0}]),
                  Finished(0, "stop"), Finished(1, "tool_calls"), Usage(5, 2)):
        outcome.add(event)
    assert outcome.texts == {0: ["l", "s"]} and outcome.logprobs == {0: [{"content": TOP}]}
    assert outcome.tool_calls == {1: [{"index": 0}]} and outcome.finish == {0: "stop", 1: "tool_calls"}
    assert outcome.usage == Usage(5, 2)
