"""Incremental detokenisation and stop strings: text deltas that never split a character or leak a stop."""

from __future__ import annotations


class Detokenizer:
    """Turns one request's generated ids into text deltas.

    Decodes a short window of recent tokens (as TGI and vLLM do) so the cost per token stays flat;
    text ending in U+FFFD (an incomplete UTF-8 sequence) waits for the next token. Text that could
    still become a stop string is held back until it cannot.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into text
        self.text = ""  # all text produced so far (stop strings cut off)
        self._sent = 0  # characters of ``text`` already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return (text delta to emit now, whether a stop string was hit)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self) -> tuple[str, bool]:
        if self._cut_at_stop():
            return self._rest(), True
        hold = max((_held(self.text, s) for s in self.stop), default=0)
        end = max(self._sent, len(self.text) - hold)
        delta, self._sent = self.text[self._sent:end], end
        return delta, False

    def _cut_at_stop(self) -> bool:
        # the stop string that begins first in the text ends it, whatever their order in `stop`
        found = [at for s in self.stop if (at := self.text.find(s, max(0, self._sent - len(s) + 1))) >= 0]
        if found:
            self.text = self.text[:min(found)]
        return bool(found)

    def _rest(self) -> str:
        delta, self._sent = self.text[self._sent:], len(self.text)
        return delta

    def flush(self) -> tuple[str, bool]:
        """At the end of the request: everything not yet emitted, and whether a stop string ended it.
        Tokens still waiting for the rest of a character count too, as the tokenizer decodes them
        (U+FFFD), so the whole text is the decode of the generated ids, as ``tokenizer.decode`` gives."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        whole = self._decode(self.ids[self._prefix:])
        if len(whole) > len(prefix_text):
            self.text += whole[len(prefix_text):]
            self._prefix = self._read = len(self.ids)
        hit = self._cut_at_stop()
        return self._rest(), hit


def _held(text: str, stop: str) -> int:
    """The length of the longest tail of ``text`` that is a proper prefix of ``stop``. Only the places
    where ``stop``'s first character occurs are tried, leftmost (longest) first, instead of one slice
    per possible length (long stop strings cost quadratic time per token that way; stop strings are
    capped at MAX_STOP_CHARS besides)."""
    tail = text[max(0, len(text) - len(stop) + 1):]
    at = tail.find(stop[0])
    while at >= 0:
        if stop.startswith(tail[at:]):
            return len(tail) - at
        at = tail.find(stop[0], at + 1)
    return 0
