"""Fixtures of the trainer tests: a tiny Llama with SmolLM2's tokenizer, and a small NL2Bash-like prompt.

Import the fixtures into a test module (`from tests.trainer_fixtures import trainer_tiny_model, ...`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

SERVED = "HuggingFaceTB/SmolLM2-135M-Instruct"

PAIRS = [
    ("list files in the current directory", "ls"),
    ("list all files including hidden ones", "ls -a"),
    ("show the current working directory", "pwd"),
    ("count lines in notes.txt", "wc -l notes.txt"),
    ("print the first 5 lines of notes.txt", "head -n 5 notes.txt"),
    ("print the last 5 lines of notes.txt", "tail -n 5 notes.txt"),
    ("find all python files under src", "find src -name '*.py'"),
    ("delete the file old.log", "rm old.log"),
    ("create a directory named build", "mkdir build"),
    ("show disk usage of the home directory", "du -sh ~"),
    ("search for error in app.log", "grep error app.log"),
    ("copy a.txt to b.txt", "cp a.txt b.txt"),
    ("move a.txt into the backup folder", "mv a.txt backup/"),
    ("show running processes", "ps aux"),
    ("print the date", "date"),
    ("sort names.txt alphabetically", "sort names.txt"),
]
EXAMPLES = [
    {"query": "list files with details", "response": "ls -l"},
    {"query": "print the kernel name", "response": "uname -s"},
]
INSTRUCTIONS = (
    "You translate requests into one Bash command. Answer with the command only, with no explanation "
    "and no code fences. Keep paths and file names exactly as given."
)


def tiny_messages() -> list[dict[str, str]]:
    shots = "\n\n".join(f"Input: {e['query']}\nOutput: {e['response']}" for e in EXAMPLES)
    return [
        {"role": "system", "content": f"{INSTRUCTIONS}\n\nExamples:\n\n{shots}"},
        {"role": "user", "content": "Input: {query}\nOutput:"},
    ]


def tiny_rows() -> list[dict[str, Any]]:
    return [{"query": q, "response": r} for q, r in PAIRS]


@pytest.fixture(scope="session")
def smollm_dir(base_model_path: Path) -> Path:
    """The real SmolLM2 folder (conftest's, materialised once); tests use its tokenizer and, rarely, its weights."""
    return base_model_path


@pytest.fixture(scope="session")
def trainer_tiny_model(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 64, 4 heads of 16) with random weights and SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("trainer-tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(trainer_tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(trainer_tiny_model)


@pytest.fixture(scope="session")
def tiny_lm(trainer_tiny_model: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trainer_tiny_model)
    model.eval()
    return model
