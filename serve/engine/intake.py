"""Request validation and prompt tokenisation, done on the caller's thread at submit time."""

from __future__ import annotations

import math
from typing import Callable

from .errors import InvalidRequest, PromptTooLong
from .requests import GenerationRequest, SamplingParams

MAX_LOGPROBS = 20  # most likely tokens a request may ask for per generated token (OpenAI's limit)
MAX_LOGIT_BIAS = 300  # tokens a request's logit_bias may name (OpenAI's limit)


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
    if len(p.stop) > 16 or any(not isinstance(s, str) or not s for s in p.stop):
        raise bad("stop", "stop must be at most 16 non-empty strings")
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


def prompt_ids(tokenizer, request: GenerationRequest, vocab_size: int) -> list[int]:
    given = [x is not None for x in (request.prompt, request.messages, request.prompt_token_ids)]
    if sum(given) != 1:
        raise InvalidRequest("give exactly one of prompt, messages or prompt_token_ids", param="prompt")
    if request.prompt is not None:
        if not isinstance(request.prompt, str):
            raise InvalidRequest("prompt must be a string", param="prompt")
        ids = tokenizer(request.prompt)["input_ids"]
    elif request.messages is not None:
        ids = chat_ids(tokenizer, request.messages, request.add_generation_prompt)
    else:
        ids = list(request.prompt_token_ids)
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest(f"prompt_token_ids holds ids outside [0, {vocab_size}): {bad[:5]}", param="prompt")
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    return list(ids)


def chat_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidRequest(f"messages[{i}] must have a string 'role' and 'content'", param="messages")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model has no chat template; send a plain prompt", param="messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # the template's own validation (roles, ordering)
        raise InvalidRequest(f"the chat template rejected the messages: {exc}", param="messages") from exc
    # The template writes the special tokens itself; do not add them twice.
    return tokenizer(text, add_special_tokens=False)["input_ids"]
