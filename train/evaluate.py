"""Scoring a model on the held-out set: greedy generation from the chat-formatted prompt (a
classifier: its head's most likely label), then the recipe's metric on each answer. The same function scores the base (adapter disabled) and
the trained result, so the two numbers are comparable."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .classify import predict
from .data import Example
from .encode import pad_id_of, render_prompt, token_ids
from .metrics import METRICS, Scores, aggregate
from .model import Placement


@dataclass(frozen=True, slots=True)
class EvalReport:
    metric: str
    scores: Scores  # headline metric first, then its explanatory parts
    answers: list[str]

    @property
    def score(self) -> float:
        return self.scores[self.metric]

    def write_answers(self, path: Path, examples: list[Example]) -> None:
        with open(path, "w", encoding="utf-8") as out:
            for example, answer in zip(examples, self.answers):
                out.write(json.dumps({"prompt": example.messages[-1]["content"], "reference": example.completion,
                                      "answer": answer}, ensure_ascii=False) + "\n")


def generate(model: nn.Module, tokenizer, examples: list[Example], system: str | None, max_new_tokens: int,
             batch_size: int, place: Placement) -> list[str]:
    """Greedy answers, batched with left padding so every prompt ends where generation starts."""
    pad = pad_id_of(tokenizer)
    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    answers: list[str] = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            prompts = [token_ids(tokenizer, render_prompt(tokenizer, e.prompt_messages(system)))
                       for e in examples[start:start + batch_size]]
            width = max(map(len, prompts))
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=place.device)
            attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=place.device)
            with place.autocast():
                out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=pad, eos_token_id=eos, use_cache=True)
            for row in out[:, width:]:
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def score_answers(metric: str, answers: list[str], examples: list[Example], language: str) -> EvalReport:
    per_example = [METRICS[metric].score(a, e, language) for a, e in zip(answers, examples)]
    return EvalReport(metric, aggregate(per_example), answers)


def evaluate(model: nn.Module, tokenizer, examples: list[Example], recipe, place: Placement) -> EvalReport:
    """Score `model` on `examples` with the recipe's metric, prompt and generation budget."""
    limit = recipe.eval.limit
    chosen = examples[:limit] if limit else examples
    if recipe.classifier:  # the head's label, not generated text
        answers = predict(model, tokenizer, chosen, recipe.labels, recipe.eval.batch_size, pad_id_of(tokenizer), place)
    else:
        answers = generate(model, tokenizer, chosen, recipe.system, recipe.eval.max_new_tokens,
                           recipe.eval.batch_size, place)
    return score_answers(recipe.metric, answers, chosen, recipe.language)
