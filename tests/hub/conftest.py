"""Hub fixtures: a tiny Llama base folder, a registry holding it, and a PEFT adapter factory."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hotswap.hub import Registry
from hotswap.hub.index import Index

TINY_SOURCE = "org/tiny-llama"


def tiny_config(hidden: int = 64) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)


def save_tiny_base(folder: Path, hidden: int = 64, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(hidden))
    model.config._name_or_path = TINY_SOURCE
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture
def registry(tmp_path, tiny_base_dir) -> Registry:
    reg = Registry(tmp_path / "home")
    reg.publish(tiny_base_dir, name="tiny", kind="base", source=TINY_SOURCE)
    return reg


AdapterFactory = Callable[..., Path]


@pytest.fixture
def make_adapter(tmp_path, tiny_base_dir) -> AdapterFactory:
    """Save a PEFT LoRA adapter for the tiny base; different seeds give different weights."""
    counter = iter(range(10_000))

    def make(rank: int = 4, targets=("q_proj", "v_proj"), seed: int = 0, base_dir: Path | None = None,
             folder: Path | None = None) -> Path:
        model = LlamaForCausalLM.from_pretrained(base_dir or tiny_base_dir)
        model.name_or_path = TINY_SOURCE  # as if loaded from the Hub by its id (PEFT records this)
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                                      init_lora_weights=False))
        out = folder or tmp_path / f"adapter-{next(counter)}"
        peft_model.save_pretrained(out)
        return out

    return make


def first_in(registry, action):
    """Index.transaction that runs `action` once, just before `registry` opens its first transaction."""
    real, done = Index.transaction, []

    def transaction(self):
        if self is registry._index and not done:
            done.append(True)
            action()
        return real(self)
    return transaction
