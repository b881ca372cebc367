"""Classification requests: a sequence classifier's head on the prompt's pooled token. The classifier
is a PEFT sequence-classification adapter on the base, or a full fine-tuned sequence-classification
model served beside it (its ``score`` head then ends its own forward, see ``LlamaRunner``).

transformers' sequence classifiers (``LlamaForSequenceClassification``) apply their head ``score``
to the final-norm hidden state of the last prompt token that is not padding. In a causal model that
state depends only on the tokens up to it, so the engine cuts the prompt there and runs it as a
prompt-only request (``max_tokens`` 0) in the same batches as everything else: the step that
computes its last token also hands that row's hidden state to the adapter's head, which the
adapter's slot holds on the device (``Slot.head``), or the full model's worker holds.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .errors import InvalidRequest
from .requests import Classification, SamplingParams

# a classification computes its prompt and generates nothing
CLASSIFY_SAMPLING = SamplingParams(max_tokens=0)


def pooled_prompt(ids: list[int], pad_id: int | None) -> list[int]:
    """The prompt up to its last token that is not ``pad_id`` (transformers pools there; the first
    token when every one is padding, as its argmax over zeros picks)."""
    if pad_id is None:
        return ids
    last = max((i for i, t in enumerate(ids) if t != pad_id), default=0)
    return ids[:last + 1]


NO_HEAD = ("classification needs an adapter trained for sequence classification (PEFT task_type SEQ_CLS) "
           "or a full sequence-classification model")


def head_mismatch(ref: str, kind: str, classify: bool, has_head: bool) -> InvalidRequest | None:
    """Why a request cannot run on its adapter or model (``kind``): a classification needs a head,
    and a classifier's weights were trained for its head, not for generating text."""
    if classify and not has_head:
        return InvalidRequest(f"{ref} has no classification head: {NO_HEAD}", param="model")
    if not classify and has_head:
        return InvalidRequest(f"{ref} is a sequence-classification {kind}: send it classification requests",
                              param="model")
    return None


def classify_rows(hidden: Tensor, heads: list[tuple[Tensor, tuple[str, ...]] | None]) -> list[Classification | None]:
    """``hidden [N, H]``: the final-norm hidden states of a step's sampled rows; ``heads[i]``: row i's
    head ``[labels, H]`` and label names, None for a row that is not a classification."""
    return [None if head is None else Classification(tuple(F.linear(hidden[i], head[0]).float().tolist()), head[1])
            for i, head in enumerate(heads)]
