"""Examples to token ids and labels, and labelled batches.

The prompt is rendered with the base's chat template and a generation prompt, exactly as at
inference; the answer is what the template adds after that (content, end-of-turn token). The
two halves are tokenized apart and joined, so the boundary the model learns is the one it sees
when generating. Prompt tokens and padding get label -100: the loss is on the answer only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Example
from .errors import DataError

IGNORE_INDEX = -100


@dataclass(frozen=True, slots=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens; a classifier's example: [its class]
    classify: bool = False  # a classifier's example: the loss is on the class, not on tokens

    @property
    def num_answer_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass(frozen=True, slots=True)
class EncodeStats:
    num_examples: int
    num_truncated: int  # answer cut short by max_length
    num_dropped: int  # prompt alone filled max_length: nothing left to learn
    max_tokens: int


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the base's tokenizer has no chat template; hotswap trains chat-formatted examples")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def answer_text(tokenizer, messages: list[dict[str, str]], completion: str) -> str:
    """What the template puts after the generation prompt for this answer (content + end of turn)."""
    prompt = render_prompt(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
    if full.startswith(prompt):
        return full[len(prompt):]
    # A template whose generation prompt is not a prefix of the answered chat: end the answer ourselves.
    return completion + (tokenizer.eos_token or "")


def token_ids(tokenizer, text: str) -> list[int]:
    # The template already wrote every special token the model expects; add none.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_example(tokenizer, example: Example, system: str | None, max_length: int) -> tuple[Encoded | None, bool]:
    """(encoded example or None when nothing of the answer fits, whether it was truncated)."""
    messages = example.prompt_messages(system)
    prompt_ids = token_ids(tokenizer, render_prompt(tokenizer, messages))
    answer_ids = token_ids(tokenizer, answer_text(tokenizer, messages, example.completion))
    ids = prompt_ids + answer_ids
    truncated = len(ids) > max_length
    ids = ids[:max_length]  # right truncation: the prompt is kept, the answer's tail goes
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    labels = labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None, truncated
    return Encoded(ids, labels), truncated


def encode_all(tokenizer, examples: list[Example], system: str | None, max_length: int, what: str
               ) -> tuple[list[Encoded], EncodeStats]:
    encoded, cut, dropped = [], 0, 0
    for example in examples:
        item, truncated = encode_example(tokenizer, example, system, max_length)
        cut += truncated and item is not None
        if item is None:
            dropped += 1
        else:
            encoded.append(item)
    if not encoded:
        raise DataError(f"{what}: no example leaves room for its answer within max_length={max_length}")
    stats = EncodeStats(len(encoded), cut, dropped, max(len(e.input_ids) for e in encoded))
    return encoded, stats


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: padding has attention 0 and label -100 (a classifier's batch: one class
    per example, ``labels [B]``)."""
    width = max(len(e.input_ids) for e in batch)
    classify = batch[0].classify
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, T]
    attention = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
    if classify:
        labels = torch.tensor([e.labels[0] for e in batch], dtype=torch.long)  # [B]
    else:
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        attention[row, :n] = 1
        if not classify:
            labels[row, :n] = torch.tensor(item.labels)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the base's tokenizer has neither a pad nor an end-of-sequence token")
    return int(pad)
