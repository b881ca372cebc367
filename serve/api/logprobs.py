"""Token log-probabilities in OpenAI's two layouts: chat's ``logprobs.content`` list and the legacy
completions object (parallel lists), built from the engine's ``TokenLogprobs``.

Values are the model's own distribution at each step (before penalties, temperature and top-k/top-p,
as vLLM returns them by default); one entry per generated token, the end-of-sequence token included.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from ..engine import Logprob, TokenLogprobs

FLOOR = -9999.0  # JSON has no -inf; vLLM writes a probability that underflowed as this value too


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="The token's UTF-8 bytes; null when it holds only part of a "
                                                "character (its text is then U+FFFD).")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] = Field(description="Per token: the most likely tokens' texts and "
                                                              "log-probabilities, the chosen one always among them.")
    text_offset: list[int] = Field(description="Where each token's text starts in the choice's text.")


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


def _top(entry: Logprob) -> TopLogprob:
    text = entry.token
    return TopLogprob(token=text, logprob=_value(entry.logprob), bytes=None if "\ufffd" in text else list(text.encode()))


def chat_logprobs(entries: list[TokenLogprobs]) -> ChatLogprobs:
    return ChatLogprobs(content=[ChatTokenLogprob(**_top(e.chosen).model_dump(), top_logprobs=[_top(t) for t in e.top])
                                 for e in entries])


def completion_logprobs(entries: list[TokenLogprobs], offset: int) -> CompletionLogprobs:
    """``offset``: where the first entry's token starts in the choice's text (after an echoed prompt,
    or after the tokens of earlier chunks when streaming)."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for e in entries:
        out.tokens.append(e.chosen.token)
        out.token_logprobs.append(_value(e.chosen.logprob))
        top = {t.token: _value(t.logprob) for t in e.top}
        top.setdefault(e.chosen.token, _value(e.chosen.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(e.chosen.token)
    return out
