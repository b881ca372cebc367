"""OpenAI response bodies and server-sent-event chunks, built from a `Run`.

Chunks are written with `json.dumps` in exactly OpenAI's layout (`"finish_reason": null` present,
unset delta fields absent); whole responses are the pydantic models of `openai_schemas`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from ..engine import TokenEvent, Usage
from .errors import describe
from .exceptions import ClientGone
from .generation import Choice, Run
from .logprobs import chat_logprobs, completion_logprobs
from .openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    PromptTokensDetails,
    UsageInfo,
)

DONE = b"data: [DONE]\n\n"


def usage_info(usage: Usage) -> UsageInfo:
    return UsageInfo(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                     total_tokens=usage.total_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens))


def _finish(reason: str | None) -> str | None:
    return reason if reason in (None, "stop", "length", "cancelled") else "stop"


def completion_body(run: Run) -> CompletionResponse:
    return CompletionResponse(
        id=f"cmpl-{run.id_suffix}", created=run.created, model=run.target.ref, system_fingerprint=run.target.digest,
        choices=[CompletionChoice(index=c.index, text=c.echo + "".join(c.text), finish_reason=_finish(c.finish_reason),
                                  logprobs=completion_logprobs(c.logprobs, len(c.echo), c.prompt_logprobs)
                                  if c.logprobs or c.prompt_logprobs else None)
                 for c in run.choices],
        usage=usage_info(run.usage()))


def chat_body(run: Run) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=f"chatcmpl-{run.id_suffix}", created=run.created, model=run.target.ref, system_fingerprint=run.target.digest,
        choices=[ChatChoice(index=c.index, message=AssistantMessage(content="".join(c.text)),
                            logprobs=chat_logprobs(c.logprobs) if c.logprobs else None,
                            finish_reason=_finish(c.finish_reason) or "stop") for c in run.choices],
        usage=usage_info(run.usage()))


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class ChunkWriter:
    """Turns token events into the chunks of one streamed completion or chat completion."""

    def __init__(self, run: Run, chat: bool, include_usage: bool) -> None:
        self.run, self.chat, self.include_usage = run, chat, include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{run.id_suffix}"
        self._opened: set[int] = set()
        self._offsets: dict[int, int] = {}  # choice -> characters of its token texts sent (completions' text_offset)

    def _chunk(self, choices: list[dict], usage: Usage | None = None, last: bool = False) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.run.created, "model": self.run.target.ref, "choices": choices,
                "system_fingerprint": self.run.target.digest}
        if self.include_usage:
            body["usage"] = usage_info(usage).model_dump() if last and usage else None
        return sse(body)

    def event(self, choice: Choice, event: TokenEvent) -> list[bytes]:
        """The event's chunks; a token whose text is held back (a possible stop string) still sends
        its log-probabilities, in a chunk with empty text."""
        out = []
        finish = _finish(event.finish_reason)
        entries = list(event.logprobs)
        if self.chat:
            if choice.index not in self._opened:
                self._opened.add(choice.index)
                out.append(self._chunk([{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]))
            if event.text or entries:
                logprobs = chat_logprobs(entries).model_dump() if entries else None
                out.append(self._chunk([{"index": choice.index, "delta": {"content": event.text},
                                         "logprobs": logprobs, "finish_reason": None}]))
            if finish is not None:
                out.append(self._chunk([{"index": choice.index, "delta": {}, "logprobs": None,
                                         "finish_reason": finish}]))
        else:
            text = event.text
            if choice.index not in self._opened:
                self._opened.add(choice.index)
                text = choice.echo + text
                self._offsets[choice.index] = len(choice.echo)
            logprobs = None
            if entries or event.prompt_logprobs:
                offset = self._offsets[choice.index]
                logprobs = completion_logprobs(entries, offset, list(event.prompt_logprobs)).model_dump()
                self._offsets[choice.index] = offset + sum(len(e.chosen.token) for e in entries)
            if text or entries or finish is not None:
                out.append(self._chunk([{"index": choice.index, "text": text, "logprobs": logprobs,
                                         "finish_reason": finish}]))
        return out

    def end(self) -> list[bytes]:
        tail = [self._chunk([], self.run.usage(), last=True)] if self.include_usage else []
        return tail + [DONE]

    def error(self, exc: Exception, path: str) -> list[bytes]:
        """An error after the stream began: one `error` event (the openai client raises it), then [DONE]."""
        _status, detail, _retry = describe(exc, path)
        return [sse({"error": detail.model_dump()}), DONE]


async def chunk_stream(writer: ChunkWriter, first: tuple[Choice, TokenEvent] | None,
                       rest: AsyncIterator[tuple[Choice, TokenEvent]], path: str,
                       on_error) -> AsyncIterator[bytes]:
    """The SSE body: the event already awaited (`first`), the rest, then [DONE]; cancels the run on exit.
    A client that leaves mid-stream is counted as a 499, as one that leaves before a whole answer is."""
    ended = False
    try:
        if first is not None:
            for data in writer.event(*first):
                yield data
        try:
            async for choice, event in rest:
                for data in writer.event(choice, event):
                    yield data
        except Exception as exc:  # noqa: BLE001 - every error becomes an error event
            ended = True
            on_error(exc)
            for data in writer.error(exc, path):
                yield data
            return
        ended = True
        for data in writer.end():
            yield data
    finally:
        if not ended:  # closed from outside (the client left) before every choice finished
            on_error(ClientGone("the client closed the connection mid-stream; its requests were cancelled"))
        writer.run.cancel()  # a no-op for finished jobs; frees the engine's work when the client left
