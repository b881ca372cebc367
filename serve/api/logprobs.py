"""Token log-probabilities in OpenAI's two layouts: chat's ``logprobs.content`` list and the legacy
completions object (parallel lists), built from the engine's ``TokenLogprobs``.

Values are the model's own distribution at each step (before logit bias, penalties, temperature and
top-k/top-p, as vLLM returns them by default); one entry per generated token, the end-of-sequence token included,
and with ``echo`` one per prompt token before them (the first without a value: nothing predicts it).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from ..engine import Logprob, TokenLogprobs

FLOOR = -9999.0  # JSON has no -inf; vLLM writes a probability that underflowed as this value too


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description=(
        "The token's raw bytes: exact for byte-level BPE vocabularies even when the token holds only part "
        "of a character (its text is then U+FFFD); else its text's UTF-8, null when that text is not whole."))


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for an echoed prompt's first token.")
    top_logprobs: list[dict[str, float] | None] = Field(description=(
        "Per token: the most likely tokens' texts and log-probabilities, the chosen one always among them."))
    text_offset: list[int] = Field(description="Where each token's text starts in the choice's text.")


def _value(logprob: float | None) -> float | None:
    return None if logprob is None else max(logprob, FLOOR)


def _top(entry: Logprob) -> TopLogprob:
    raw = entry.token_bytes
    return TopLogprob(token=entry.token, logprob=_value(entry.logprob), bytes=None if raw is None else list(raw))


def chat_logprobs(entries: list[TokenLogprobs]) -> ChatLogprobs:
    return ChatLogprobs(content=[ChatTokenLogprob(**_top(e.chosen).model_dump(), top_logprobs=[_top(t) for t in e.top])
                                 for e in entries])


def completion_logprobs(entries: list[TokenLogprobs], offset: int,
                        prompt: list[TokenLogprobs] = ()) -> CompletionLogprobs:
    """``prompt``: an echoed prompt's entries, which come first, from offset 0; ``offset``: where the
    first generated token starts in the choice's text (after the echoed prompt, or after the tokens
    of earlier chunks when streaming)."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])

    def add(part: list[TokenLogprobs], at: int) -> None:
        for e in part:
            chosen = _value(e.chosen.logprob)
            out.tokens.append(e.chosen.token)
            out.token_logprobs.append(chosen)
            top = None
            if chosen is not None:
                top = {t.token: _value(t.logprob) for t in e.top}
                top.setdefault(e.chosen.token, chosen)
            out.top_logprobs.append(top)
            out.text_offset.append(at)
            at += len(e.chosen.token)

    add(list(prompt), 0)
    add(entries, offset)
    return out
