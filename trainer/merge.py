"""Merge a LoRA adapter into its base model's weights (peft `merge_and_unload`): a plain HF model folder, with
the tokenizer, that any server loads without LoRA support, so its requests pay no adapter cost.

`python -m trainer.merge --base DIR --adapter DIR --out DIR` (the gateway runs it as a child process for a prompt
served merged; an operator can run it by hand for a merged engine in a cluster). The folder appears whole or not
at all: written beside its place, then renamed. Progress goes to stdout, one line per step.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from core.adapter_store import make_staging_dir, publish_dir


def merge_adapter(base: Path, adapter: Path, out: Path, *, progress: bool = True) -> Path:
    """Write `base` with `adapter` merged into it to `out` (which must not exist yet), in the base's own dtype."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()

    def step(message: str) -> None:
        if progress:
            print(f"[merge {time.monotonic() - started:5.1f} s] {message}", flush=True)

    if out.exists():
        raise FileExistsError(f"{out} already exists")
    step(f"loading the base model from {base}")
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(base)
    step(f"applying the adapter {adapter}")
    with torch.no_grad():
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    staging = make_staging_dir(out.parent, out.name)
    try:
        step("saving the merged model")
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    step(f"done: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the base model's HF folder")
    parser.add_argument("--adapter", type=Path, required=True, help="a PEFT LoRA folder trained on that base")
    parser.add_argument("--out", type=Path, required=True, help="the merged model's folder (must not exist)")
    args = parser.parse_args(argv)
    try:
        merge_adapter(args.base, args.adapter, args.out)
    except (OSError, ValueError) as exc:
        print(f"merge failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
