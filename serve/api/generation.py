"""From an OpenAI request to engine requests and back: one `Run` per HTTP request.

A request with several prompts or `n > 1` becomes several engine requests ("jobs"); their token events
are merged in arrival order. A `Run` cancels every job it started when it is closed early (an error, a
client that went away), so the engine frees their KV blocks and adapter pins at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from litestar import Request

from ..engine import (Classification, Engine, GenerationRequest, InvalidRequest, RequestStream,
                      SamplingParams, Target, TokenEvent, TokenLogprobs, Usage)
from .exceptions import ApiProblem, ClientGone
from .metrics import ApiMetrics
from .openai_schemas import MAX_CHOICES, ChatCompletionRequest, CompletionRequest

T = TypeVar("T")


def sampling(body: CompletionRequest | ChatCompletionRequest, max_tokens: int, sample: int,
             logprobs: int | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
    if body.stream_options is not None and not body.stream:  # OpenAI's and vLLM's rule: not silently dropped
        raise ApiProblem("stream_options is only allowed with stream: true", "stream_options")
    top_k = body.top_k if body.top_k and body.top_k > 0 else 0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=top_k,
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=tuple((int(token), bias) for token, bias in (body.logit_bias or {}).items()),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        stop=body.stop_strings(),
        seed=None if body.seed is None else body.seed + sample,  # n samples of one seed differ, reproducibly
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos)


def completion_jobs(body: CompletionRequest, target: Target) -> list[GenerationRequest]:
    prompts = body.prompts()
    if len(prompts) * body.n > MAX_CHOICES:
        raise ApiProblem(f"{len(prompts)} prompts x n={body.n} asks for more than {MAX_CHOICES} choices", "n")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not (body.echo and body.logprobs is not None):
        raise ApiProblem("max_tokens 0 generates nothing: it is for scoring the prompt, with echo and logprobs",
                         "max_tokens")
    jobs = []
    for prompt in prompts:
        for sample in range(body.n):
            text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
            jobs.append(GenerationRequest(prompt=text, prompt_token_ids=ids, model=target.ref,
                                          sampling=sampling(body, max_tokens, sample, body.logprobs,
                                                            body.logprobs if body.echo else None),
                                          cache_salt=body.cache_salt))
    return jobs


def echo_texts(engine: Engine, jobs: list[GenerationRequest]) -> list[str]:
    """What each job's choice echoes: a text prompt as sent, token ids as the serving model's tokenizer reads
    them back (evaluation harnesses score pre-tokenized prompts: echo + logprobs over token ids, as vLLM does)."""
    texts = []
    for job in jobs:
        if job.prompt is not None:
            texts.append(job.prompt)
            continue
        try:
            texts.append(engine.detokenize(job.model, list(job.prompt_token_ids or ()))[1])
        except InvalidRequest as exc:  # ids outside the vocabulary: the field is the endpoint's prompt
            raise InvalidRequest(str(exc), param="prompt") from None
    return texts


def chat_jobs(body: ChatCompletionRequest, target: Target, default_max_tokens: int) -> list[GenerationRequest]:
    messages = [m.as_dict() for m in body.messages]
    limit = body.token_limit() or default_max_tokens
    if body.top_logprobs and not body.logprobs:
        raise ApiProblem("top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return [GenerationRequest(messages=messages, model=target.ref, sampling=sampling(body, limit, sample, logprobs),
                              add_generation_prompt=body.add_generation_prompt, cache_salt=body.cache_salt)
            for sample in range(body.n)]


async def off_loop(fn: Callable[[], T], on_abandon: Callable[[], None] | None = None) -> T:
    """``fn()`` on a worker thread: tokenizing a long prompt takes seconds, during which the event loop
    must go on serving every other request. Should the caller be cancelled meanwhile, ``on_abandon``
    runs once ``fn`` has finished (to cancel the engine requests it queued)."""
    work = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        def abandoned(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None and on_abandon is not None:
                on_abandon()
        work.add_done_callback(abandoned)
        raise


async def submit_chat(run: Run, body: ChatCompletionRequest, target: Target, default_max_tokens: int) -> None:
    """Queue a chat's jobs. A chat that sets no max_tokens is not refused for a limit it never asked for:
    when the server's default does not fit beside the prompt, it gets what the prompt leaves of the
    context instead (vLLM's and OpenAI's default). The prompt is measured first, so such a chat is
    not counted as a rejected request before it is served."""
    limit = body.token_limit()
    if limit is None:
        prompt = await off_loop(lambda: run.engine.tokenize(chat_jobs(body, target, 1)[0]))
        room = prompt.max_model_len - len(prompt.token_ids)
        limit = room if 0 < room < default_max_tokens else default_max_tokens
    await run.submit(chat_jobs(body, target, limit), n=body.n)


@dataclass(slots=True)
class Choice:
    """What one job produced so far."""

    index: int
    stream: RequestStream
    echo: str = ""
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # echo with logprobs
    finish_reason: str | None = None
    usage: Usage | None = None
    first_token_at: float | None = None
    classification: Classification | None = None  # a classification job's answer
    generated: int = 0  # token ids streamed so far
    recorded: bool = False  # counted in the metrics (finished, or abandoned by `Run.cancel`)


class Run:
    """The engine requests of one HTTP request, their merged events, metrics and cancellation."""

    def __init__(self, engine: Engine, metrics: ApiMetrics, target: Target, endpoint: str) -> None:
        self.engine, self.metrics, self.target, self.endpoint = engine, metrics, target, endpoint
        self.started = time.perf_counter()
        self.created = int(time.time())
        self.choices: list[Choice] = []
        self.n = 1

    async def submit(self, jobs: list[GenerationRequest], n: int = 1, echoes: list[str] | None = None) -> None:
        """Queue every job, or none: a refusal cancels the jobs already queued and is re-raised.
        The engine tokenizes each job's prompt as it is queued, so this runs off the event loop.

        Job ``i`` is sample ``i % n`` of prompt ``i // n`` (OpenAI's choice order)."""
        await off_loop(lambda: self._submit(jobs, n, echoes), self.cancel)

    def _submit(self, jobs: list[GenerationRequest], n: int, echoes: list[str] | None) -> None:
        if len(jobs) > (room := self.engine.config.max_queue):  # a 429 would have the client retry in vain
            what, param = ("inputs", "input") if self.endpoint == "classify" else ("choices (prompts x n)", "n")
            raise ApiProblem(f"{len(jobs)} {what} are more than this server queues at once (max_queue {room})",
                             param)
        self.n = n
        try:
            for i, job in enumerate(jobs):
                self.choices.append(Choice(i, self.engine.submit(job), (echoes or [""] * len(jobs))[i]))
        except BaseException:
            self.cancel()
            raise

    @property
    def id_suffix(self) -> str:
        return self.choices[0].stream.request_id if self.choices else "none"

    def cancel(self) -> None:
        """Cancel every job. The tokens of jobs left unfinished still count in the token metrics: the engine
        computed them (a client that leaves mid-stream is counted as an error, not as a finished request)."""
        for choice in self.choices:
            choice.stream.cancel()
            if not choice.recorded and choice.first_token_at is not None:
                choice.recorded = True
                prompt_tokens = choice.stream.prompt_tokens if choice.index % self.n == 0 else 0
                self.metrics.abandoned(self.target.ref, prompt_tokens, choice.generated)

    async def events(self) -> AsyncIterator[tuple[Choice, TokenEvent]]:
        """Every job's events, merged in arrival order; ends when all jobs have finished."""
        if len(self.choices) == 1:
            async for event in self.choices[0].stream:
                yield self._note(self.choices[0], event), event
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                async for event in choice.stream:
                    await queue.put((choice, event))
            except Exception as exc:  # handed to the consumer, which raises it
                await queue.put((choice, exc))
            await queue.put((choice, None))

        tasks = [asyncio.ensure_future(pump(c)) for c in self.choices]
        try:
            remaining = len(tasks)
            while remaining:
                choice, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield self._note(choice, item), item
        finally:
            for task in tasks:
                task.cancel()

    def _note(self, choice: Choice, event: TokenEvent) -> Choice:
        if choice.first_token_at is None and event.token_ids:
            choice.first_token_at = time.perf_counter()
        choice.generated += len(event.token_ids)
        choice.text.append(event.text)
        choice.logprobs.extend(event.logprobs)
        choice.prompt_logprobs.extend(event.prompt_logprobs)
        if event.classification is not None:
            choice.classification = event.classification
        if event.finish_reason is not None:
            choice.finish_reason, choice.usage = event.finish_reason, event.usage
            if not choice.recorded:
                choice.recorded = True
                self._record(choice)
        return choice

    def _record(self, choice: Choice) -> None:
        usage = choice.usage or Usage(choice.stream.prompt_tokens, 0)
        ttft = None if choice.first_token_at is None else choice.first_token_at - self.started
        prompt_tokens = usage.prompt_tokens if choice.index % self.n == 0 else 0  # n samples share a prompt, as in usage
        self.metrics.finished(self.target.ref, self.endpoint, choice.finish_reason or "stop", prompt_tokens,
                              usage.completion_tokens, ttft, time.perf_counter() - self.started)

    def usage(self) -> Usage:
        """Prompt tokens once per prompt (its n samples share it), completion tokens of every choice."""
        firsts = [c for c in self.choices if c.index % self.n == 0]
        return Usage(sum(c.stream.prompt_tokens for c in firsts),
                     sum(c.usage.completion_tokens for c in self.choices if c.usage),
                     sum(c.usage.cached_tokens for c in firsts if c.usage))


async def drain(run: Run) -> None:
    """Consume every job's events (recorded on the run's choices); cancel them all on any error."""
    try:
        async for _ in run.events():
            pass
    except BaseException:
        run.cancel()
        raise


async def until_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_gone(request: Request, run: Run, awaitable):
    """Await `awaitable`; if the client leaves first, cancel the run's jobs and raise ClientGone."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(until_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work in done:
        return work.result()
    work.cancel()
    run.cancel()
    raise ClientGone("the client closed the connection; its requests were cancelled")
