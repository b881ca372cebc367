"""Next-token choice from logits, per request settings; greedy rows take one vectorised argmax.

Order of processors follows HF transformers: repetition penalty (then OpenAI's presence and
frequency penalties, as vLLM applies them), temperature, top-k, top-p; a request's logit bias and
the tokens it may not take yet come before all of them. A seeded request owns a
``torch.Generator``, so its samples repeat whatever else shares the batch. Log-probabilities that a
request asks for come from the logits before any of these (what the model itself predicts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tokenizers import decoders
from torch import Tensor
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .requests import Logprob, SamplingParams, TokenLogprobs


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL penalty on a ``[V]`` row for token ids ``seen``: positive logits / p, negative * p."""
    scores = logits.gather(0, seen)
    logits.scatter_(0, seen, torch.where(scores < 0, scores * penalty, scores / penalty))
    return logits


def apply_presence_frequency(logits: Tensor, generated: Tensor, presence: float, frequency: float) -> Tensor:
    """OpenAI's penalties on a ``[V]`` row: each token already generated (ids ``generated``) loses
    ``presence`` once and ``frequency`` per occurrence."""
    counts = torch.bincount(generated, minlength=logits.shape[-1]).to(logits.dtype)
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


# Temperatures below this are greedy, as in vLLM: dividing logits by less overflows float32.
SAMPLING_EPS = 1e-5
_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}  # byte-level BPE's alphabet -> bytes


def token_piece(tokenizer, token_id: int) -> tuple[str, bytes | None]:
    """One token's text on its own (special tokens written out) and its raw bytes.

    Byte-level BPE vocabularies (GPT-2's scheme, used by SmolLM2 and Llama 3) spell each byte with
    one character, so the bytes are exact even for a token that holds part of a character (its
    text is then U+FFFD); for other vocabularies they are the text's UTF-8, or None when the text
    is not whole."""
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(getattr(backend, "decoder", None), decoders.ByteLevel):
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and all(c in _BYTE_OF_CHAR for c in piece):
            return text, bytes(_BYTE_OF_CHAR[c] for c in piece)
    return text, None if "\ufffd" in text else text.encode()


def token_logprobs(logprobs: Tensor, token: int, k: int,
                   describe: Callable[[int], tuple[str, bytes | None]]) -> TokenLogprobs:
    """The chosen ``token``'s entry and the ``k`` most likely, from a ``[V]`` row of log-probabilities;
    ``describe(id)``: a token's text and bytes (``token_piece``)."""
    values, ids = logprobs.topk(k) if k else (logprobs[:0], logprobs[:0])

    def entry(token_id: int, value: float) -> Logprob:
        text, raw = describe(token_id)
        return Logprob(token_id, text, value, raw)

    return TokenLogprobs(chosen=entry(token, float(logprobs[token])),
                         top=tuple(entry(t, v) for v, t in zip(values.tolist(), ids.tolist())))


def filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Mask a ``[V]`` row to its top-k tokens, then to the smallest set with probability >= top_p."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[-1] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits


def sample(logits: Tensor, params: list[SamplingParams], history: list[list[int]],
           generators: list[torch.Generator | None], banned: list[frozenset[int]] | None = None,
           prompt_lens: Sequence[int] | None = None) -> list[int]:
    """``logits[N, V]`` (float32) -> one token id per row; ``banned[i]``: ids row i may not take now.

    ``history[i]``: row i's tokens so far, the first ``prompt_lens[i]`` of them its prompt (the
    presence and frequency penalties count only the rest; None: no prompt)."""
    for i, p in enumerate(params):
        if p.logit_bias:
            ids, bias = zip(*p.logit_bias)  # index_add_: a token named twice gets both biases
            logits[i].index_add_(0, torch.tensor(ids, device=logits.device),
                                 torch.tensor(bias, dtype=logits.dtype, device=logits.device))
    if banned is not None and any(banned):
        for i, ids in enumerate(banned):
            if ids:
                logits[i, list(ids)] = float("-inf")
    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        penalised = p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        greedy = p.temperature < SAMPLING_EPS
        if greedy and not penalised:
            continue
        row = logits[i].clone()
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(history[i])), dtype=torch.long, device=row.device)
            row = apply_repetition_penalty(row, seen, p.repetition_penalty)
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            generated = torch.tensor(history[i][prompt_lens[i] if prompt_lens else 0:], dtype=torch.long,
                                     device=row.device)
            row = apply_presence_frequency(row, generated, p.presence_penalty, p.frequency_penalty)
        # extreme settings overflow float32 (a repetition penalty of 1e-30 divides logits past its
        # range): an infinite logit becomes the largest finite one, so the row stays samplable and
        # no request sharing the step fails with it
        row = torch.nan_to_num(row, nan=float("-inf"), posinf=torch.finfo(row.dtype).max)
        if greedy:
            out[i] = int(row.argmax())
            continue
        row = torch.nan_to_num(row / p.temperature, nan=float("-inf"), posinf=torch.finfo(row.dtype).max)
        row = filter_top_k_top_p(row, p.top_k, p.top_p)
        probs = row.softmax(-1)
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return out
