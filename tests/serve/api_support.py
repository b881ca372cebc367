"""Shared parts of the HTTP server's tests: a tiny random Llama base with a real tokenizer and chat
template, PEFT adapters for it, a registry holding them, the real engine, and a real uvicorn.

Imported by the `test_api_*.py` modules (fixtures are re-exported there by import).
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch
import uvicorn
from litestar import Litestar
from litestar.testing import TestClient
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hotswap.hub import Registry
from hotswap.serve.api import ApiKeySpec, ServerSettings, create_app
from hotswap.serve.engine import Engine, EngineConfig

BASE = "tiny"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    "select name from users where id = 1", "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today?", "translate english to french: good morning",
    "SELECT count(*) FROM orders GROUP BY customer", "once upon a time there was a tiny model",
] * 4

ADMIN_KEY = "sk-admin-0123456789abcdef"
ACME_KEY = "sk-acme-0123456789abcdef"
GLOBEX_KEY = "sk-globex-0123456789abcdef"
KEYS = [
    ApiKeySpec(name="ops", key=ADMIN_KEY, role="admin"),
    ApiKeySpec(name="acme", key=ACME_KEY, role="user", adapters=["acme-*"]),
    ApiKeySpec(name="globex", key=GLOBEX_KEY, role="user", adapters=["globex-*"]),
]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


ADMIN = bearer(ADMIN_KEY)
ACME = bearer(ACME_KEY)
GLOBEX = bearer(GLOBEX_KEY)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes) with a few merges learnt from a fixed corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_base(folder: Path, hidden: int = 64, seed: int = 0, max_len: int = 2048) -> Path:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_len, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def save_adapter(base_dir: Path, folder: Path, seed: int, rank: int = 4,
                 targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    model = LlamaForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                                  init_lora_weights=False))
    # random LoRA weights large enough that greedy outputs differ visibly from the base's
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(4.0)
    peft_model.save_pretrained(folder)
    return folder


def save_full_model(base_dir: Path, folder: Path, seed: int) -> Path:
    """A 'fine-tuned' full checkpoint: the base with perturbed weights, plus the tokenizer."""
    model = LlamaForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    PreTrainedTokenizerFast.from_pretrained(base_dir).save_pretrained(folder)
    return folder


@dataclass
class Store:
    home: Path
    base_dir: Path
    adapters: dict[str, Path]  # "name@version" -> the folder published


def build_store(root: Path) -> Store:
    """tiny (base); acme-sql@1,@2 (prod -> 1); acme-chat; globex-sql; other-fit (made for another base);
    tiny-ft (a full model)."""
    base_dir = save_base(root / "base")
    other_base = save_base(root / "other-base", hidden=32, seed=1)
    reg = Registry(root / "home")
    reg.publish(base_dir, name=BASE, kind="base", source="org/tiny")
    reg.publish(other_base, name="other", kind="base", source="org/other")
    made: dict[str, Path] = {}
    for name, seed in [("acme-sql", 11), ("acme-sql", 12), ("acme-chat", 13), ("globex-sql", 14)]:
        folder = save_adapter(base_dir, root / f"{name}-{seed}", seed)
        made[reg.publish(folder, name=name, base=BASE, task="demo").version.ref] = folder
    reg.alias("acme-sql@1", "prod")
    folder = save_adapter(other_base, root / "other-fit", 15)
    made[reg.publish(folder, name="other-fit", base="other").version.ref] = folder
    folder = save_full_model(base_dir, root / "tiny-ft", 16)
    made[reg.publish(folder, name="tiny-ft", kind="model", base=BASE).version.ref] = folder
    reg.close()
    return Store(root / "home", base_dir, made)


def small_config(**overrides) -> EngineConfig:
    """Small capacities; a 256-token context (the base allows 2048: tests that need long runs raise it)."""
    fields = dict(device="cpu", max_model_len=256, max_batch_tokens=256, max_running=8, max_queue=64, kv_cache_bytes=8 << 20,
                  lora_capacity_bytes=4 << 20, host_cache_bytes=16 << 20, model_memory_bytes=256 << 20)
    return EngineConfig(**(fields | overrides))


def make_app(home: Path, keys=KEYS, config: EngineConfig | None = None, **settings) -> tuple[Litestar, Engine]:
    registry = Registry(home)
    engine = Engine(registry, BASE, config or small_config())
    return create_app(engine, registry, ServerSettings(keys=list(keys), **settings)), engine


def wait_ready(get, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if get("/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server did not become ready: {get('/ready').text}")


@contextmanager
def running_client(app: Litestar) -> Iterator[TestClient]:
    with TestClient(app, timeout=60) as client:
        wait_ready(client.get)
        yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def uvicorn_server(app: Litestar) -> Iterator[str]:
    """A real uvicorn on loopback, on a free port, in a thread; yields its base URL once ready."""
    import httpx

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise AssertionError("uvicorn did not start")
            time.sleep(0.02)
        wait_ready(lambda path: httpx.get(url + path))
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# --- fixtures (import them into a test module to use them) ------------------------------------------
@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Store:
    return build_store(tmp_path_factory.mktemp("api-store"))


@pytest.fixture(scope="module")
def served(store) -> Iterator[tuple[TestClient, Engine]]:
    """One app with auth (admin, acme, globex keys) over the shared store, started and ready."""
    app, engine = make_app(store.home)
    with running_client(app) as client:
        yield client, engine


@pytest.fixture(scope="module")
def client(served) -> TestClient:
    return served[0]
