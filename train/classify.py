"""Classification recipes (a recipe with ``labels``): texts to classes with a sequence-classification
adapter, the kind the server answers on /v1/classify.

Each example is ``{"prompt": text, "completion": label}``. The text is tokenized as the server
tokenizes a classification request's text (the tokenizer's own special tokens, no chat template), the
base is loaded as ``LlamaForSequenceClassification`` with a new head over the labels, and PEFT trains
the LoRA and that head together (``task_type`` SEQ_CLS); with method full every weight trains, head
included, and the result is a whole ``LlamaForSequenceClassification`` checkpoint. Held-out scoring
reads the head's most likely label at the last token of each text, as the server does, and the
result is saved with ``labels.json`` so the server names the labels."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from hotswap.hub import classifier_label_names, classifier_labels, is_classifier

from .data import Example
from .encode import EncodeStats, Encoded
from .errors import DataError

LABELS_FILE = "labels.json"


def encode_labelled(tokenizer, examples: list[Example], labels: list[str], max_length: int, what: str
                    ) -> tuple[list[Encoded], EncodeStats]:
    encoded, cut = [], 0
    for number, example in enumerate(examples, start=1):
        label = example.completion.strip()
        if label not in labels:
            raise DataError(f"{what}: example {number} has label {label!r}, not one of the recipe's {labels}")
        ids = text_ids(tokenizer, example.messages[-1]["content"])
        cut += len(ids) > max_length
        encoded.append(Encoded(ids[:max_length], [labels.index(label)], classify=True))
    return encoded, EncodeStats(len(encoded), cut, 0, max(len(e.input_ids) for e in encoded))


def text_ids(tokenizer, text: str) -> list[int]:
    """A text's ids as the server reads a classification request's text."""
    return list(tokenizer(text)["input_ids"])


def load_classifier(folder: Path, labels: list[str], pad_id: int, device: torch.device):
    """The base with a new classification head over ``labels`` (fp32), on ``device``."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        folder, dtype=torch.float32, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}, pad_token_id=pad_id)
    model.to(device)
    model.config.use_cache = False
    return model


def load_scored_classifier(base_folder: Path, adapter: Path | None, model_folder: Path | None, labels: list[str],
                           seed: int, what: str, pad_id: int, device: torch.device):
    """What ``hotswap train eval`` scores for a classification recipe: the base with the untrained
    head a run starts from (drawn with the recipe's seed, so it scores what the run's base score
    was), a sequence-classification adapter on it, or a full classifier checkpoint. Each is refused,
    naming ``what``, unless it classifies into the recipe's labels in the recipe's order."""
    from transformers import AutoModelForSequenceClassification

    if model_folder is not None:
        found = classifier_labels(json.loads((model_folder / "config.json").read_text()))
        if found is None:
            raise DataError(f"{what} is not a sequence classifier (a *ForSequenceClassification checkpoint)")
        _check_labels(what, list(found), labels)
        model = AutoModelForSequenceClassification.from_pretrained(model_folder, dtype=torch.float32)
        if model.config.pad_token_id is None:  # batches of texts need one to pool at (the server then uses none)
            model.config.pad_token_id = pad_id
        return model.to(device)
    if adapter is not None:
        if not is_classifier(adapter):
            raise DataError(f"{what} is not a sequence-classification adapter (PEFT task_type SEQ_CLS)")
        if (adapter / LABELS_FILE).is_file():
            _check_labels(what, json.loads((adapter / LABELS_FILE).read_text()), labels)
        elif len(rows := classifier_label_names(adapter) or labels) != len(labels):  # unnamed: count the head's rows
            raise DataError(f"{what} has a head over {len(rows)} labels, but the recipe names {len(labels)}")
    torch.manual_seed(seed)
    model = load_classifier(base_folder, labels, pad_id, device)
    if adapter is None:
        return model
    from .model import load_adapter

    return load_adapter(model, adapter, what).to(device)


def _check_labels(what: str, found: list[str], labels: list[str]) -> None:
    if found != labels:
        raise DataError(f"{what} classifies into {found}, but the recipe's labels are {labels}")


def predict(model: nn.Module, tokenizer, examples: list[Example], labels: list[str], batch_size: int,
            pad_id: int, place) -> list[str]:
    """The head's most likely label for each example's text (right padding: the model pools at the
    last token that is not padding)."""
    from .encode import collate

    was_training = model.training
    model.eval()
    found: list[str] = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = [Encoded(text_ids(tokenizer, e.messages[-1]["content"]), [0], classify=True)
                     for e in examples[start:start + batch_size]]
            batch = {k: v.to(place.device) for k, v in collate(chunk, pad_id).items() if k != "labels"}
            with place.autocast():
                logits = model(**batch).logits
            found += [labels[i] for i in logits.argmax(-1).tolist()]
    model.train(was_training)
    return found


def write_labels(folder: Path, labels: list[str]) -> None:
    (folder / LABELS_FILE).write_text(json.dumps(labels, ensure_ascii=False) + "\n")
