"""The report's findings: sentences whose every number is read from `paper.json`, comparing rows that differ
in one thing (prompt length, adapter, prefix cache, gateway) and the headline against the paper's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.paper.formatting import fmt, pct, speed, times
from benchmarks.paper.table import BASELINE, PAPER_HEADLINE, PAPER_SHOWN, ratio


def _compare(ours: float | None, key: str) -> str:
    target = PAPER_SHOWN[key]
    if ours is None:
        return f"not measured (paper: {target})"
    shown = f"{times(ours)} ({speed(ours)})" if key == "speedup" else pct(ours)
    verdict = "at or above" if ours >= PAPER_HEADLINE[key] else "below"
    return f"{shown} — {verdict} the paper's {target}"


def findings(doc: dict[str, Any]) -> list[str]:
    """Sentences whose every number is read from the document."""
    by_id = {r["id"]: r for r in doc["rows"]}
    out: list[str] = []
    pi, base = by_id.get("promptintern"), by_id.get(BASELINE)
    head = doc["headline"]
    if pi and base and pi["input_tokens"] is not None:
        out.append(
            f"PromptIntern (row 7) against the full prompt (row 1): input tokens "
            f"{_compare(head['ours']['token_reduction'], 'token_reduction')}; "
            f"median-latency speed-up {_compare(head['ours']['speedup'], 'speedup')}; "
            f"cost {_compare(head['ours']['cost_saving'], 'cost_saving')}.")
    out += _where_time_goes(by_id)
    out += _merged(by_id)
    out += _against_fine_tuned(by_id)
    out += _under_load(by_id)
    out += _quality(by_id)
    gw = by_id.get("promptintern_gateway")
    if pi and gw and gw["latency_p50_s"] is not None and pi["latency_p50_s"] is not None:
        out.append(
            f"End to end (row 8): the app sent {fmt(gw.get('original_input_tokens'), '.0f')} prompt tokens, the "
            f"model processed {fmt(gw['input_tokens'], '.0f')} (row 7: {fmt(pi['input_tokens'], '.0f')}); median "
            f"latency {gw['latency_p50_s']:.2f} s vs {pi['latency_p50_s']:.2f} s on the engine directly "
            f"({gw['latency_p50_s'] / pi['latency_p50_s']:.2f}×); {gw.get('note') or ''}".rstrip("; ") + ".")
    apc = by_id.get("base_full_prefix_cache")
    if apc and apc["latency_p50_s"] is not None and pi and pi["latency_p50_s"] is not None:
        out.append(
            f"Prefix caching (row 4) makes the full prompt {speed(apc['speedup'])} than row 1 without removing a "
            f"token ({apc['latency_p50_s']:.2f} s median); PromptIntern is "
            f"{speed(apc['latency_p50_s'] / pi['latency_p50_s'])} than that ({pi['latency_p50_s']:.2f} s), and its "
            f"billed input is {pct(_reduction(pi['input_tokens'], apc['input_tokens']))} smaller (an API bills "
            "cached tokens at a discount at best; this table bills them in full).")
    elif apc:
        out.append(f"Row 4 (prefix caching) was not measured: {apc.get('note') or 'no vLLM'}.")
    for rid in ("compressed_keep0.5", "compressed_keep0.2"):
        c = by_id.get(rid)
        if c and base and c["bleu"] is not None and base["bleu"] is not None:
            out.append(
                f"Prompt compression at keep_ratio {c['keep_ratio']} (row {c['row']}): "
                f"{pct(c['token_reduction'])} fewer tokens, BLEU {c['bleu']:.1f} (row 1: {base['bleu']:.1f}), "
                f"{speed(c['speedup'])} than row 1.")
    return out


def _merged(by_id: dict[str, dict[str, Any]]) -> list[str]:
    """Row 9 against row 7 (same adapter, LoRA), row 2 (same bare input, plain weights), rows 1 and 4."""
    keys = ("latency_p50_s", "output_tokens")
    merged, pi, bare, apc = (by_id.get(k) for k in ("promptintern_merged", "promptintern", "base_bare",
                                                      "base_full_prefix_cache"))
    if merged is None:
        return []
    if not _have(merged, *keys):
        return [f"Row 9 (the adapter merged into the weights) was not measured: {merged.get('note') or 'no vLLM'}."]
    assert merged is not None
    per_token = 1000 * merged["latency_p50_s"] / merged["output_tokens"] if merged["output_tokens"] else None
    text = (f"Merged serving (row 9), the best serving option here: {merged['latency_p50_s']:.2f} s median, "
            f"{speed(merged['speedup'])} than the full prompt (row 1)")
    if _have(pi, *keys):
        assert pi is not None
        text += f" and {speed(ratio(pi['latency_p50_s'], merged['latency_p50_s']))} than row 7's LoRA route"
    if _have(apc, "latency_p50_s"):
        assert apc is not None
        text += (f"; against prefix caching (row 4, {apc['latency_p50_s']:.2f} s) it is "
                 f"{speed(ratio(apc['latency_p50_s'], merged['latency_p50_s']))}")
    if per_token is not None and _have(bare, *keys) and bare["output_tokens"]:  # type: ignore[index]
        assert bare is not None
        plain = 1000 * bare["latency_p50_s"] / bare["output_tokens"]
        text += (f"; about {per_token:.0f} ms per answer token against {plain:.0f} ms for the bare query on the "
                 f"base model (row 2, {100 * (per_token / plain - 1):+.0f}%)")
    note = merged.get("note") or ""
    same = note.rsplit("; ", 1)[-1] if "identical" in note else ""
    return [text + (f"; {same}" if same else "") + "."]


def _against_fine_tuned(by_id: dict[str, dict[str, Any]]) -> list[str]:
    """The second speed-up column in words: rows 7 and 9 against row 5, which answers as well with the prompt kept."""
    ft = by_id.get("full_prompt_ft")
    if not _have(ft, "latency_p50_s", "bleu"):
        return []
    assert ft is not None
    parts = [f"row {r['row']} {speed(r['speedup_vs_ft'])}" + (f" (BLEU {r['bleu']:.1f})" if r.get("bleu") is not None
                                                              else "")
             for r in (by_id.get("promptintern"), by_id.get("promptintern_merged"))
             if r is not None and r.get("speedup_vs_ft") is not None]
    if not parts:
        return []
    return [f"Against full-prompt fine-tuning (row 5: a trained adapter that keeps the prompt, BLEU {ft['bleu']:.1f}, "
            f"{ft['latency_p50_s']:.2f} s median), the column \"speed-up vs 5\": " + ", ".join(parts)
            + ": trained answers without paying for the prompt, worth it where the BLEU beside each is close to "
              "row 5's."]


def _under_load(by_id: dict[str, dict[str, Any]]) -> list[str]:
    """Throughput at concurrency 8, where the removed prefill shows even when single-request latency does not."""
    pi, base, apc = (by_id.get(k) for k in ("promptintern", BASELINE, "base_full_prefix_cache"))
    if not (_have(pi, "throughput_rps_c8") and _have(base, "throughput_rps_c8")):
        return []
    assert pi is not None and base is not None
    ours, theirs = pi["throughput_rps_c8"], base["throughput_rps_c8"]
    text = (f"Under load ({pi.get('throughput_requests') or '?'} requests at concurrency 8): PromptIntern serves "
            f"{ours:.2f} requests/s against row 1's {theirs:.2f} ({ours / theirs:.2f}×)")
    if _have(apc, "throughput_rps_c8"):
        assert apc is not None
        text += f" and prefix caching's {apc['throughput_rps_c8']:.2f} ({ours / apc['throughput_rps_c8']:.2f}×)"
    return [text + ": when the engine batches requests, each one without the long prompt takes less of a step, "
                   "so the token saving shows more in throughput than in one request's latency."]


def _quality(by_id: dict[str, dict[str, Any]]) -> list[str]:
    pi = by_id.get("promptintern")
    out = []
    for other, name in (("direct_ft", "direct fine-tuning (row 6)"),
                        ("full_prompt_ft", "full-prompt fine-tuning (row 5)"),
                        (BASELINE, "the base model with the full prompt (row 1)")):
        o = by_id.get(other)
        if pi and o and pi["bleu"] is not None and o["bleu"] is not None:
            overlap = _overlap(pi.get("bleu_ci95"), o.get("bleu_ci95"))
            out.append(
                f"Quality, PromptIntern vs {name}: BLEU {pi['bleu']:.1f} vs {o['bleu']:.1f}, exact match "
                f"{pi['exact_match']:.1f}% vs {o['exact_match']:.1f}% on {pi['n']} test rows"
                + (" (their 95% bootstrap intervals overlap: the difference is within what the choice of test "
                   "rows moves)" if overlap else " (their 95% bootstrap intervals do not overlap)") + ".")
    return out


def _have(row: dict[str, Any] | None, *keys: str) -> bool:
    return row is not None and all(row.get(k) is not None for k in keys)


def _where_time_goes(by_id: dict[str, dict[str, Any]]) -> list[str]:
    """Prompt tokens against answer tokens and adapter overhead, from rows that differ in one thing."""
    full, bare, pi, ft = (by_id.get(k) for k in (BASELINE, "base_bare", "promptintern", "full_prompt_ft"))
    keys = ("input_tokens", "latency_p50_s", "output_tokens")
    out = []
    if _have(full, *keys) and _have(bare, *keys):
        assert full is not None and bare is not None
        extra = full["input_tokens"] - bare["input_tokens"]
        cheap = full["latency_p50_s"] < 1.5 * bare["latency_p50_s"]
        out.append(
            f"Rows 1 and 2 (same weights, only the prompt differs): {full['latency_p50_s']:.2f} s median with the "
            f"{full['input_tokens']:.0f}-token prompt and {full['output_tokens']:.1f} answer tokens on average, "
            f"{bare['latency_p50_s']:.2f} s with the {bare['input_tokens']:.0f}-token bare query and "
            f"{bare['output_tokens']:.1f} answer tokens: "
            + (f"on this engine prefilling the {extra:.0f} extra prompt tokens costs little next to decoding the "
               "answer, so removing them cannot buy much speed here." if cheap else
               f"the {extra:.0f} extra prompt tokens are a large share of a request's time here."))
    if _have(full, *keys) and _have(pi, *keys) and pi["output_tokens"] > full["output_tokens"]:  # type: ignore[index]
        assert full is not None and pi is not None
        out.append(
            f"PromptIntern's answers are longer than row 1's ({pi['output_tokens']:.1f} against "
            f"{full['output_tokens']:.1f} tokens on average), and every answer token is decoded one at a time, "
            "which lowers its speed-up and its cost saving.")
    if _have(bare, *keys) and _have(pi, *keys) and bare["output_tokens"] and pi["output_tokens"]:  # type: ignore[index]
        assert bare is not None and pi is not None
        ours = 1000 * pi["latency_p50_s"] / pi["output_tokens"]
        plain = 1000 * bare["latency_p50_s"] / bare["output_tokens"]
        out.append(
            f"Rows 2 and 7 get the same bare input: about {plain:.0f} ms per answer token on the base model against "
            f"{ours:.0f} ms with the PromptIntern adapter (median latency over mean answer length)"
            + (": the extra cost of serving a LoRA adapter on this engine." if ours > plain
               else ": the adapter adds no per-token cost visible here."))
    if _have(full, *keys) and _have(ft, *keys):
        assert full is not None and ft is not None
        out.append(
            f"Rows 1 and 5 get the same full prompt: {full['latency_p50_s']:.2f} s median on the base model, "
            f"{ft['latency_p50_s']:.2f} s through the full-prompt adapter ({ft['output_tokens']:.1f} vs "
            f"{full['output_tokens']:.1f} answer tokens): an adapter that keeps the long prompt pays for both.")
    return out


def _reduction(ours: float | None, other: float | None) -> float | None:
    r = ratio(ours, other)
    return None if r is None else 1.0 - r


def _overlap(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    return bool(a and b and a[0] <= b[1] and b[0] <= a[1])
