"""What callers hand the engine and what they get back: requests, sampling, token events, streams."""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator, Literal

from .errors import EngineError

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """Decoding settings of one request. temperature 0 (the default) is greedy and deterministic."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1.0: off; CTRL-style, as in HF transformers
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per earlier occurrence in the generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, bias in [-100, 100]) added to its logit
    stop: tuple[str, ...] = ()  # stop strings; the matched string is not returned
    seed: int | None = None  # per-request generator seed; same seed -> same sample
    min_tokens: int = 0  # EOS is not sampled before this many tokens (as HF's min_new_tokens)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    logprobs: int | None = None  # None: off; k: each token's log-probability and the k most likely tokens
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (scoring a text;
    # max_tokens may then be 0: the request ends after its prompt, with no token generated)


@dataclass(slots=True)
class GenerationRequest:
    """One completion or chat request.

    Exactly one of ``prompt``, ``messages`` (chat, formatted with the chat template of the model that
    serves it) or ``prompt_token_ids`` is given. ``model`` is a registry reference resolved at submit
    time: the base itself, an adapter of it ("sql", "sql@2", "sql@prod"), or a full fine-tuned model;
    None means the bare base.
    """

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_token_ids: list[int] | None = None
    model: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None  # assigned by the engine when None; one an unfinished request holds is refused
    add_generation_prompt: bool = True  # chat only
    # prefix caching: requests share KV of equal prompt prefixes only when their salts are equal too, so
    # a tenant's salt keeps others from timing which prompts it sent (vLLM's cache_salt)
    cache_salt: str | None = None
    # classify the prompt with the adapter's classification head (a PEFT SEQ_CLS adapter) instead of
    # generating: the completion carries ``classification`` and no tokens; sampling is ignored
    classify: bool = False


@dataclass(slots=True, frozen=True)
class Classification:
    """A classification request's result: the head's logits over the adapter's labels, read at the
    prompt's last token that is not padding (as transformers' sequence classifiers pool)."""

    logits: tuple[float, ...]
    labels: tuple[str, ...]

    @property
    def probs(self) -> tuple[float, ...]:
        top = max(self.logits)
        weights = [math.exp(v - top) for v in self.logits]
        total = sum(weights)
        return tuple(w / total for w in weights)

    @property
    def label(self) -> str:
        """The most likely label (the first of equals)."""
        return self.labels[self.logits.index(max(self.logits))]


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache, not computed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True, frozen=True)
class Target:
    """What a request's ``model`` resolved to; the digest, never the name, keys every cache."""

    kind: Literal["base", "adapter", "model"]
    ref: str  # "name@version" of the resolved entry
    digest: str


@dataclass(slots=True, frozen=True)
class Tokenized:
    """What ``Engine.tokenize`` returns: the ids, their vocabulary strings, and the context length of
    the model that would read them."""

    target: Target
    token_ids: tuple[int, ...]
    token_strs: tuple[str, ...]
    max_model_len: int


@dataclass(slots=True, frozen=True)
class Logprob:
    """A token, its text alone (``tokenizer.decode([token_id])``) and its log-probability (None only
    for a prompt's first token, which nothing predicts)."""

    token_id: int
    token: str
    logprob: float | None
    token_bytes: bytes | None = None  # its raw bytes (a token may hold part of a character); None: unknown


@dataclass(slots=True, frozen=True)
class TokenLogprobs:
    """What a request with ``logprobs=k`` gets for each generated token: the token chosen and the k
    most likely ones, most likely first, under the model's own distribution at that step (the
    log-softmax of its logits, before logit bias, penalties, temperature or top-k/top-p)."""

    chosen: Logprob
    top: tuple[Logprob, ...]


@dataclass(slots=True, frozen=True)
class TokenEvent:
    """One step of output. The last event of a stream has ``finish_reason`` and ``usage`` set."""

    request_id: str
    token_ids: tuple[int, ...]  # tokens produced since the previous event
    text: str  # text delta (stop strings and incomplete UTF-8 held back)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token id, when the request asked for them
    # on the first event, when the request asked for them: one per prompt token (the first: no logprob)
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()
    classification: Classification | None = None  # on the only event of a classification request


@dataclass(slots=True, frozen=True)
class Completion:
    """A whole finished request, as gathered by ``RequestStream.collect``."""

    request_id: str
    target: Target
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token id, when the request asked for them
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()  # one per prompt token (the first: no logprob)
    classification: Classification | None = None  # a classification request's result


class RequestStream:
    """Token events of one request, fed by the engine thread; iterate with ``async for`` or ``for``.

    Errors found after submit (an adapter refused at load, say) are raised from the iteration as the
    engine's typed exceptions. ``cancel()`` stops the request and frees its KV and adapter pin at once.
    A consumer that stops reading without ``cancel()`` leaves the request running to its end (its KV
    held meanwhile); one whose task is cancelled while it waits for the next event (a timeout around
    ``collect()``, say) cancels the request.
    """

    def __init__(self, request_id: str, target: Target, prompt_tokens: int,
                 on_cancel: Callable[[RequestStream], None], step_thread: threading.Thread | None = None) -> None:
        self.request_id = request_id
        self.target = target
        self.prompt_tokens = prompt_tokens
        self._on_cancel = on_cancel
        self._step_thread = step_thread  # the thread that feeds this stream: waiting on it would never end
        self._items: deque[TokenEvent | EngineError] = deque()
        self._cond = threading.Condition()
        self._done = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # --- engine side (any thread) ---
    def _push(self, item: TokenEvent | EngineError) -> None:
        with self._cond:
            self._items.append(item)
            if isinstance(item, EngineError) or item.finish_reason is not None:
                self._done = True
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the caller's loop is closed; nobody is listening
                pass

    # --- caller side ---
    @property
    def finished(self) -> bool:
        return self._done

    def cancel(self) -> None:
        """Stop the request; the stream ends with finish_reason "cancelled" (idempotent)."""
        if not self._done:
            self._on_cancel(self)

    def _pop(self) -> TokenEvent | EngineError | None:
        with self._cond:
            return self._items.popleft() if self._items else None

    def _check_may_wait(self) -> None:
        if threading.current_thread() is self._step_thread:
            raise EngineError(f"waiting for request {self.request_id} on the engine's step thread (inside "
                              "call_on_step_thread) would never end: that thread is what runs it")

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            with self._cond:
                while not self._items:
                    self._check_may_wait()
                    self._cond.wait()
                item = self._items.popleft()
            if isinstance(item, EngineError):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._cond:
            self._waiters.append((loop, event))
        try:
            while True:
                item = self._pop()
                if item is None:
                    self._check_may_wait()
                    try:
                        await event.wait()
                    except asyncio.CancelledError:  # the consumer is going away: nobody reads the rest
                        self.cancel()
                        raise
                    event.clear()
                    continue
                if isinstance(item, EngineError):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            with self._cond:
                self._waiters.remove((loop, event))

    def _gather(self, events: list[TokenEvent]) -> Completion:
        last = events[-1]
        assert last.finish_reason is not None and last.usage is not None
        return Completion(
            request_id=self.request_id, target=self.target,
            text="".join(e.text for e in events),
            token_ids=tuple(t for e in events for t in e.token_ids),
            finish_reason=last.finish_reason, usage=last.usage,
            logprobs=tuple(lp for e in events for lp in e.logprobs),
            prompt_logprobs=tuple(lp for e in events for lp in e.prompt_logprobs),
            classification=last.classification)

    async def collect(self) -> Completion:
        """Wait for the end of the request and return it whole."""
        return self._gather([e async for e in self])

    def result(self) -> Completion:
        """Blocking ``collect`` for callers without an event loop."""
        return self._gather(list(self))
