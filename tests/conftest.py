"""Shared fixtures: the real base model, a tiny model built offline, LoRA adapters, a live gateway."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from gateway.local_server import LocalGateway, free_port

torch.set_num_threads(int(os.environ.get("PROMPTINTERN_TEST_THREADS", "2")))

REPO = Path(__file__).resolve().parents[1]
# A throwaway PostgreSQL server (`postgresql`, `pg_url`, `database_url` over SQLite and PostgreSQL).
pytest_plugins = ["tests.pg"]
ADMIN_KEY = "test-admin-key-0123456789"


@pytest.fixture(scope="session")
def base_model_path() -> Path:
    """The real SmolLM2-135M-Instruct, materialised once into the repo's data dir (as `make model` does)."""
    from core.basemodel import base_model_dir
    from core.config import Settings

    return base_model_dir(Settings(data_dir=REPO / "data"))


@pytest.fixture(scope="session")
def tiny_model_path(base_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer, random weights: fast tests of real code paths."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class LiveServer(LocalGateway):
    """The gateway on a free loopback port for a test module."""


def gateway_settings(tmp: Path, model_path: Path, **overrides: Any) -> Any:
    from core.config import Settings

    values: dict[str, Any] = dict(
        data_dir=tmp / "data", adapter_dir=tmp / "adapters", base_model=model_path, admin_key=ADMIN_KEY,
        port=free_port(), torch_threads=int(os.environ.get("PROMPTINTERN_TEST_THREADS", "2")),
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway")


@pytest.fixture(scope="module")
def tiny_server(tiny_model_path: Path, module_tmp: Path) -> Iterator[LiveServer]:
    """The gateway on the tiny model: for routing, registry and error tests."""
    with LiveServer(gateway_settings(module_tmp, tiny_model_path, model_aliases=["gpt-4o-mini"])) as server:
        yield server
