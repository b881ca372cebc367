"""Request validation and prompt tokenisation, done on the caller's thread at submit time."""

from __future__ import annotations

import functools
import math
from typing import Callable

from .errors import InvalidRequest, PromptTooLong
from .requests import GenerationRequest, SamplingParams

MAX_LOGPROBS = 20  # most likely tokens a request may ask for per generated token (OpenAI's limit)
MAX_LOGIT_BIAS = 300  # tokens a request's logit_bias may name (OpenAI's limit)
MAX_STOPS = 16
# Each generated token looks for every stop string's start in the text's tail: longer stop strings
# would make one request slow down every step of the shared engine.
MAX_STOP_CHARS = 256


def check_sampling(p: SamplingParams, max_tokens_limit: int) -> None:
    def bad(param: str, msg: str) -> InvalidRequest:
        return InvalidRequest(msg, param=param)

    if not isinstance(p.max_tokens, int) or p.max_tokens < (0 if p.prompt_logprobs is not None else 1):
        raise bad("max_tokens", "max_tokens must be a positive integer (0 only with prompt_logprobs: scoring the "
                  f"prompt), got {p.max_tokens!r}")
    if p.max_tokens > max_tokens_limit:
        raise bad("max_tokens", f"max_tokens {p.max_tokens} is above this server's limit of {max_tokens_limit}")
    if not math.isfinite(p.temperature) or p.temperature < 0:
        raise bad("temperature", f"temperature must be >= 0, got {p.temperature!r}")
    if not (0.0 < p.top_p <= 1.0):
        raise bad("top_p", f"top_p must be in (0, 1], got {p.top_p!r}")
    if not isinstance(p.top_k, int) or p.top_k < 0:
        raise bad("top_k", f"top_k must be an integer >= 0 (0: off), got {p.top_k!r}")
    if not math.isfinite(p.repetition_penalty) or p.repetition_penalty <= 0:
        raise bad("repetition_penalty", f"repetition_penalty must be > 0, got {p.repetition_penalty!r}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        if not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
            raise bad(name, f"{name} must be in [-2, 2], got {value!r}")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(p, name)
        if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
            raise bad(name, f"{name} must be an integer in [0, {MAX_LOGPROBS}] (or None: off), got {value!r}")
    if not isinstance(p.logit_bias, tuple) or len(p.logit_bias) > MAX_LOGIT_BIAS or any(
            not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], int)
                 and isinstance(pair[1], (int, float)) and -100 <= pair[1] <= 100) for pair in p.logit_bias):
        raise bad("logit_bias", f"logit_bias must be at most {MAX_LOGIT_BIAS} (token id, bias in [-100, 100]) pairs")
    if len(p.stop) > MAX_STOPS or any(not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS for s in p.stop):
        raise bad("stop", f"stop must be at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")
    if not isinstance(p.min_tokens, int) or not 0 <= p.min_tokens <= p.max_tokens:
        raise bad("min_tokens", f"min_tokens must be an integer in [0, max_tokens], got {p.min_tokens!r}")
    if p.seed is not None and not isinstance(p.seed, int):
        raise bad("seed", f"seed must be an integer, got {p.seed!r}")


def check_logit_bias(p: SamplingParams, vocab_size: int) -> None:
    outside = [t for t, _ in p.logit_bias if not 0 <= t < vocab_size]
    if outside:
        raise InvalidRequest(f"logit_bias names token ids outside [0, {vocab_size}): {outside[:5]}", param="logit_bias")


def check_fits(prompt_len: int, max_tokens: int, limit: int, fits_kv: Callable[[int], bool]) -> None:
    """A prompt and its max_tokens must fit the model's context and its KV cache."""
    total = prompt_len + max_tokens
    if total > limit:
        raise PromptTooLong(f"prompt of {prompt_len} tokens + max_tokens {max_tokens} = {total} "
                            f"exceeds the context of {limit} tokens", param="prompt")
    if not fits_kv(total):
        raise PromptTooLong(f"{total} tokens (prompt + max_tokens) do not fit the KV cache; raise kv_cache_bytes",
                            param="prompt")


def prompt_ids(tokenizer, request: GenerationRequest, vocab_size: int, context: int | None = None) -> list[int]:
    """The prompt's token ids. With ``context`` (the model's length), a prompt that cannot fit it is
    refused before it is tokenized: tokenizing a body of megabytes would take seconds. Every id must be
    below ``vocab_size``."""
    given = [x is not None for x in (request.prompt, request.messages, request.prompt_token_ids)]
    if sum(given) != 1:
        raise InvalidRequest("give exactly one of prompt, messages or prompt_token_ids", param="prompt")
    if request.prompt is not None:
        if not isinstance(request.prompt, str):
            raise InvalidRequest("prompt must be a string", param="prompt")
        _check_text_size(tokenizer, len(request.prompt), context)
        ids = tokenizer(request.prompt)["input_ids"]
    elif request.messages is not None:
        ids = chat_ids(tokenizer, request.messages, request.add_generation_prompt, context)
    else:
        ids = list(request.prompt_token_ids)
        if context is not None and len(ids) > context:
            raise PromptTooLong(f"prompt of {len(ids)} tokens exceeds the context of {context} tokens", param="prompt")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest(f"prompt_token_ids holds ids outside [0, {vocab_size}): {bad[:5]}", param="prompt")
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    if request.prompt_token_ids is None and (bad := [t for t in ids if t >= vocab_size]):
        # a tokenizer that knows more tokens than the model has embeddings for
        raise InvalidRequest(f"the prompt encodes to token ids {bad[:5]}, beyond the {vocab_size} the model "
                             f"has embeddings for", param="prompt" if request.prompt is not None else "messages")
    return list(ids)


def chat_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool,
             context: int | None = None) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidRequest(f"messages[{i}] must have a string 'role' and 'content'", param="messages")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model has no chat template; send a plain prompt", param="messages")
    _check_text_size(tokenizer, sum(len(m["content"]) for m in messages), context, "messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # the template's own validation (roles, ordering)
        raise InvalidRequest(f"the chat template rejected the messages: {exc}", param="messages") from exc
    _check_text_size(tokenizer, len(text), context, "messages")
    # The template writes the special tokens itself; do not add them twice.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _check_text_size(tokenizer, num_chars: int, context: int | None, param: str = "prompt") -> None:
    """Refuse a text that has more characters than ``context`` tokens can hold. A token stands for at
    most as many characters as its vocabulary form has (byte-level BPE: one per byte; SentencePiece:
    one per character); twice that leaves room for normalizers that compose characters (NFC)."""
    if context is None:
        return
    most = 2 * context * longest_token(tokenizer)
    if num_chars > most:
        raise PromptTooLong(f"{param} of {num_chars} characters cannot fit the context of {context} tokens "
                            f"(at most {most} characters, as the vocabulary's longest token is "
                            f"{longest_token(tokenizer)})", param=param)


@functools.lru_cache(maxsize=16)
def longest_token(tokenizer) -> int:
    """Characters of the longest entry of ``tokenizer``'s vocabulary (read once per tokenizer)."""
    return max(map(len, tokenizer.get_vocab()), default=1)
