"""Train fixtures: a tiny randomly initialised chat Llama (character tokenizer, ChatML template)
published as a base in a real registry, and a recipe writer."""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hotswap.hub import Registry

TINY_SOURCE = "org/tiny-chat"
SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, plus the ChatML special tokens."""
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()  # characters join without spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|im_end|>", bos_token="<|im_start|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def save_tiny_chat_base(folder: Path, seed: int = 0) -> Path:
    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.config._name_or_path = TINY_SOURCE
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory) -> Path:
    return save_tiny_chat_base(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture
def home(tmp_path, tiny_chat_dir) -> Path:
    """A registry folder holding the tiny base as `tiny`."""
    folder = tmp_path / "home"
    registry = Registry(folder)
    registry.publish(tiny_chat_dir, name="tiny", kind="base", source=TINY_SOURCE)
    registry.close()
    return folder


@pytest.fixture
def registry(home) -> Registry:
    return Registry(home)


# A task a tiny model learns in a few dozen steps: name the colour of a fruit.
FRUITS = {"apple": "red", "banana": "yellow", "lime": "green", "plum": "purple", "orange": "orange",
          "cherry": "red", "kiwi": "brown", "grape": "green"}


def fruit_records() -> list[dict]:
    return [{"prompt": f"colour of {fruit}?", "completion": colour} for fruit, colour in FRUITS.items()]


RecipeWriter = Callable[..., Path]

RECIPE_TEMPLATE = """\
name = "{name}"
base = "{base}"
task = "colours"
language = "en"
method = "{method}"
metric = "{metric}"
system = "One word."
{head}

[data]
train = "train.jsonl"
eval = "eval.jsonl"

[lora]
rank = 4
alpha = 8
dropout = {dropout}
target_modules = {targets}

[train]
lr = {lr}
full_lr = {full_lr}
max_steps = {steps}
batch_size = 4
max_length = 128
seed = {seed}
checkpoint_every = {checkpoint_every}

[eval]
every = {eval_every}
patience = {patience}
max_new_tokens = 4
batch_size = 8
{extra}"""


@pytest.fixture
def write_recipe(tmp_path) -> RecipeWriter:
    """Write data + recipe into a fresh folder and return the folder."""
    counter = iter(range(1000))

    def write(name: str = "colours", base: str = "tiny", method: str = "lora", steps: int = 20, lr: float = 1e-2,
              full_lr: float = 3e-3, seed: int = 0, dropout: float = 0.0, targets: str = '["q_proj", "v_proj"]',
              checkpoint_every: int = 0, eval_every: int = 0, patience: int = 0, extra: str = "",
              metric: str = "sql_exact_match", head: str = "",
              train: list[dict] | None = None, eval_records: list[dict] | None = None) -> Path:
        folder = tmp_path / f"recipe-{next(counter)}"
        folder.mkdir()
        for file, records in (("train.jsonl", train or fruit_records()), ("eval.jsonl", eval_records or fruit_records()[:4])):
            (folder / file).write_text("".join(json.dumps(r) + "\n" for r in records))
        (folder / "recipe.toml").write_text(RECIPE_TEMPLATE.format(
            name=name, base=base, method=method, steps=steps, lr=lr, full_lr=full_lr, seed=seed, dropout=dropout,
            targets=targets, checkpoint_every=checkpoint_every, eval_every=eval_every, patience=patience, extra=extra,
            metric=metric, head=head))
        return folder

    return write


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine an idle
    OpenMP worker waiting for a busy core makes a 15 ms step take close to a second."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
