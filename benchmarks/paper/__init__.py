"""`promptintern bench paper`: the paper's table on this machine, every row side by side in one run.

NL2Bash (icalfa's pairs, the trainer's deterministic split and worked-example prompt) on the base
model, all rows served by one engine: vLLM when `.venv-vllm` is set up, else the embedded engine.
Prefix caching is off for every row except row 4, which gets a second vLLM start with it on.
Quality and latency come from the same greedy generations at concurrency 1; throughput from a
second pass at concurrency 8. Adapters come from the trainer's cache (same data, schedule and base
model give the same key) and are trained only when missing. `--quick` runs the same pipeline on a
few test rows with vLLM in eager mode.

Modules, in the order a run uses them: `options` (what was asked, progress lines), `conditions`
(the table's rows and what each measured), `adapters` (cached lookup or training), `inputs` (full,
bare and compressed prompts), `measure` (requests on the engine or through the gateway), `scoring`
(BLEU and its bootstrap interval), `table` (figures, ratios, `paper.json`), `findings`, `report`
and `plots` (pure functions of `paper.json`), and `run`, which ties them together.
"""
