"""Shared parts of the engine's tests: a tiny random Llama base with a real tokenizer and chat
template, PEFT adapters of several ranks and targets for it, and a real registry holding them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hotswap.hub import Registry
from hotswap.serve.engine import Engine, EngineConfig

BASE = "tiny"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["select name from users where id = 1", "the quick brown fox jumps over the lazy dog",
          "hello world, how are you today?", "translate english to french: good morning",
          "SELECT count(*) FROM orders GROUP BY customer", "once upon a time there was a tiny model"] * 4
PROMPTS = ["select name from", "the quick brown fox", "hello world", "once upon a time there",
           "translate english to french: good", "SELECT count(*)", "how are you", "tiny model"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes) with merges learnt from a fixed corpus."""
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


def save_model(folder: Path, seed: int = 0, layers: int = 3, max_len: int = 256, tie: bool = True) -> Path:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_len, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init give peaked, decisive logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    r: int
    targets: tuple[str, ...]
    alpha: int = 16
    rslora: bool = False
    seed: int = 1
    extra: tuple[tuple[str, object], ...] = ()


ADAPTERS = [
    AdapterSpec("sql", 8, ("q_proj", "v_proj"), seed=1),
    AdapterSpec("chat", 16, tuple(ALL), alpha=8, seed=2),
    AdapterSpec("mlp", 4, ("gate_proj", "up_proj", "down_proj"), alpha=4, seed=3),
    AdapterSpec("attn", 12, ("q_proj", "k_proj", "v_proj", "o_proj"), rslora=True, seed=4),
    AdapterSpec("odd", 6, ("k_proj", "down_proj"), alpha=12, seed=5,
                extra=(("rank_pattern", {"down_proj": 2}), ("alpha_pattern", {"k_proj": 3}))),
]


def save_adapter(base_dir: Path, folder: Path, spec: AdapterSpec) -> Path:
    base = LlamaForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(spec.seed)
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                     use_rslora=spec.rslora, init_lora_weights=False, **dict(spec.extra))
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.4)
    model.save_pretrained(folder)
    return folder


def publish(world: "World", folders: dict[str, Path]) -> None:
    """Publish adapter folders for the tiny base under their names; they join ``world.adapter_dirs``."""
    registry = Registry(world.home)
    try:
        for name, folder in folders.items():
            registry.publish(folder, name=name, kind="adapter", base=BASE)
            world.adapter_dirs[name] = folder
    finally:
        registry.close()


def publish_specs(world: "World", root: Path, specs: list[AdapterSpec]) -> None:
    """Save each spec's PEFT adapter under ``root`` and publish it."""
    publish(world, {spec.name: save_adapter(world.base_dir, root / spec.name, spec) for spec in specs})


def edit_config(folder: Path, **changes) -> Path:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder


@dataclass
class World:
    home: Path
    base_dir: Path
    adapter_dirs: dict[str, Path]


def build_world(root: Path) -> World:
    """A registry with the base ``tiny`` and every adapter of ``ADAPTERS`` published."""
    base_dir = save_model(root / "base")
    registry = Registry(root / "home")
    registry.publish(base_dir, name=BASE, kind="base")
    dirs = {}
    for spec in ADAPTERS:
        dirs[spec.name] = save_adapter(base_dir, root / spec.name, spec)
        registry.publish(dirs[spec.name], name=spec.name, kind="adapter", base=BASE)
    registry.close()
    return World(root / "home", base_dir, dirs)


def small_config(**overrides) -> EngineConfig:
    values = dict(device="cpu", max_batch_tokens=64, max_running=16, kv_cache_bytes=4 << 20,
                  lora_capacity_bytes=1 << 20, host_cache_bytes=64 << 20, max_rank=32)
    values.update(overrides)
    return EngineConfig(**values)


def start_engine(home: Path, **overrides) -> Engine:
    engine = Engine(Registry(home), BASE, small_config(**overrides))
    engine.start_sync()
    return engine


def peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new: int) -> list[int]:
    """The oracle: HF generate with PEFT running one adapter alone (or the bare base)."""
    model = LlamaForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def prompt_requests(models: list[str | None], prompts=None, new: int = 8) -> list:
    """One greedy request per model (None: the bare base), prompt ``PROMPTS[prompts[i]]`` (default: i)."""
    from hotswap.serve.engine import GenerationRequest, SamplingParams

    tok = tiny_tokenizer()
    prompts = prompts or range(len(models))
    return [GenerationRequest(prompt_token_ids=tok(PROMPTS[p])["input_ids"], model=m,
                              sampling=SamplingParams(max_tokens=new)) for m, p in zip(models, prompts)]


def peft_rows(world: World, models: list[str | None], prompts=None, new: int = 8) -> list[list[int]]:
    """PEFT's greedy continuation of each of ``prompt_requests``' requests, each adapter alone."""
    tok = tiny_tokenizer()
    prompts = prompts or range(len(models))
    return [peft_greedy(world.base_dir, world.adapter_dirs[m] if m else None, tok(PROMPTS[p])["input_ids"], new)
            for m, p in zip(models, prompts)]


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("engine-world"))


@pytest.fixture
def engine(world):
    eng = start_engine(world.home)
    yield eng
    eng.stop_sync()


def preload(engine: Engine, refs) -> None:
    """Bring adapters to device slots first, so the requests that follow share their first step."""
    for ref in refs:
        engine.load_future(ref).result(timeout=30)


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)
